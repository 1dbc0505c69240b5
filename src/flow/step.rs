//! The per-item API: write a stage as a [`Step`] and let streamz run it.
//!
//! A `Step` sees one value at a time and emits zero or more outputs through
//! an [`Emit`]. The runner around it does everything else: it moves chunks,
//! passes upstream errors on unchanged, counts, catches panics and turns
//! them into [`ErrorKind::Panicked`](crate::ErrorKind::Panicked) error items
//! that carry the item, and calls [`Step::on_end`] when the input ends.
//!
//! The item arrives as an [`Item`] guard that lends it (`Deref`) until the
//! step [`take`](Item::take)s it. While the step has not taken the item, the
//! runner still owns it, so a failure reported with [`Emit::fail`] and any
//! panic hand the original item back without a clone. An item the step
//! neither takes, fails nor emits anything for is counted as dropped:
//! nothing vanishes uncounted.

use std::cell::Cell;
use std::ops::Deref;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::base::ack::Ack;
use crate::base::chunk::{Chunk, place_errors};
use crate::base::counters::{Counters, Local};
use crate::base::error::{BoxError, StreamError};

/// A stage written one item at a time.
///
/// Run it fused into the previous stage with [`Flow::step`](crate::Flow::step),
/// or on its own task with [`Stage`](crate::Stage).
///
/// # Examples
///
/// A step that parses numbers and splits lines, in about ten lines:
///
/// ```
/// use streamz::{Emit, Item, Step};
///
/// struct ParseWords;
///
/// impl Step<String, u64> for ParseWords {
///     fn on_item(&mut self, line: Item<'_, String>, out: &mut Emit<'_, u64>) {
///         for word in line.split_whitespace() {
///             match word.parse() {
///                 Ok(n) => out.emit(n),
///                 Err(e) => return out.fail(line, e),
///             }
///         }
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = streamz::iter(["1 2".to_string(), "3 x".to_string()])
///     .step("parse", ParseWords)
///     .collect()
///     .await;
/// assert_eq!(out.len(), 4); // 1, 2, 3, then the error for "3 x"
/// let mut err = out.into_iter().last().unwrap().unwrap_err();
/// assert_eq!(err.stage(), "parse");
/// assert_eq!(err.take_item::<String>().as_deref(), Some("3 x"));
/// # }
/// ```
pub trait Step<In, Out>: Send + 'static {
    /// Handles one value. Emit outputs with [`Emit::emit`], report a failure
    /// with [`Emit::fail`]. An item for which the step emits nothing and
    /// which it does not take is counted as dropped.
    fn on_item(&mut self, item: Item<'_, In>, out: &mut Emit<'_, Out>);

    /// Checks the step's settings before it runs ([`Flow::step`](crate::Flow::step)
    /// and [`Stage`](crate::Stage) call it; an invalid one starts nothing,
    /// as for [`Processor::validate`](crate::Processor::validate)). Name
    /// the step's type with [`ConfigError::in_operator`](crate::ConfigError::in_operator);
    /// the stage name is added where it is known. The default accepts
    /// everything.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`](crate::ConfigError) naming the field.
    fn validate(&self) -> Result<(), crate::ConfigError> {
        Ok(())
    }

    /// Handles an error item from upstream. The default passes it on
    /// unchanged, which is what almost every stage should do. An error the
    /// step does not take is passed on unchanged too, also when the step
    /// panics before taking it: upstream errors are never lost.
    fn on_error(&mut self, error: Item<'_, StreamError>, out: &mut Emit<'_, Out>) {
        out.pass(error.take());
    }

    /// Called once when the input ends (also after a graceful shutdown),
    /// to flush any state. Not called when the pipeline is aborted or the
    /// stage's output goes away: what the step then holds is counted as
    /// aborted (see [`held`](Step::held)).
    ///
    /// If it panics, what it emitted before the panic still goes on,
    /// followed by a `panicked` error, and what it had received and not yet
    /// emitted is counted as aborted.
    fn on_end(&mut self, out: &mut Emit<'_, Out>) {
        let _ = out;
    }

    /// How many received items the step holds to emit later (for example
    /// in [`on_end`](Step::on_end)). The runner counts them as aborted when
    /// the stage stops before they were emitted, so the stage's counters
    /// stay exact. The default, zero, is right for every step that emits
    /// for an item while it handles it.
    ///
    /// ```
    /// use streamz::{Emit, Item, Step};
    ///
    /// /// Emits the values in reverse order at the end of the input.
    /// struct Reverse(Vec<u32>);
    ///
    /// impl Step<u32, u32> for Reverse {
    ///     fn on_item(&mut self, item: Item<'_, u32>, _out: &mut Emit<'_, u32>) {
    ///         self.0.push(item.take());
    ///     }
    ///     fn on_end(&mut self, out: &mut Emit<'_, u32>) {
    ///         while let Some(v) = self.0.pop() {
    ///             out.emit(v);
    ///         }
    ///     }
    ///     fn held(&self) -> u64 {
    ///         self.0.len() as u64
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let out = streamz::iter([1, 2, 3]).step("reverse", Reverse(Vec::new())).collect().await;
    /// let out: Vec<u32> = out.into_iter().map(Result::unwrap).collect();
    /// assert_eq!(out, [3, 2, 1]);
    /// # }
    /// ```
    fn held(&self) -> u64 {
        0
    }

    /// Runs the step over a whole chunk. The built-in one-in-one-out steps
    /// replace the per-item loop with a tighter one; the default calls
    /// [`on_item`](Step::on_item) per item.
    ///
    /// Sealed: its `ChunkCtx` parameter is a type no path outside the crate
    /// names, so only the crate's own steps can override it, and the
    /// counting it does for them stays the crate's business.
    #[doc(hidden)]
    fn on_chunk(&mut self, chunk: Chunk<In>, ctx: ChunkCtx<'_>) -> Chunk<Out>
    where
        Self: Sized,
        In: Send + 'static,
    {
        run_chunk(self, chunk, ctx.counters)
    }
}

/// What [`Step::on_chunk`] needs from the runner; opaque outside the crate.
#[derive(Debug, Clone, Copy)]
pub struct ChunkCtx<'a> {
    pub(crate) counters: &'a Counters,
}

/// An item lent to a [`Step`]: read it through `Deref`, or take it.
///
/// While the item has not been taken, the runner can give it back inside an
/// error if the step fails or panics.
#[derive(Debug)]
pub struct Item<'a, T> {
    slot: &'a mut Option<T>,
    current: &'a Current,
}

impl<T> Item<'_, T> {
    /// Takes ownership of the item. After this a panic in the step can no
    /// longer hand the item back; take it last.
    pub fn take(self) -> T {
        self.slot.take().expect("an Item always holds its value")
    }

    /// Takes the item with its acknowledgement (see [`Ack`]), for a step
    /// that keeps items to emit later with [`Emit::emit_acked`]. A step
    /// that only [`take`](Item::take)s an item and emits nothing for it
    /// leaves its acknowledgement unmet (the item is its to account for).
    ///
    /// ```
    /// use streamz::{Ack, Emit, Item, Step};
    ///
    /// /// Emits the values in reverse order at the end of the input.
    /// struct Reverse(Vec<(u32, Ack)>);
    ///
    /// impl Step<u32, u32> for Reverse {
    ///     fn on_item(&mut self, item: Item<'_, u32>, _out: &mut Emit<'_, u32>) {
    ///         self.0.push(item.take_acked());
    ///     }
    ///     fn on_end(&mut self, out: &mut Emit<'_, u32>) {
    ///         while let Some((v, ack)) = self.0.pop() {
    ///             out.emit_acked(v, ack);
    ///         }
    ///     }
    ///     fn held(&self) -> u64 {
    ///         self.0.len() as u64
    ///     }
    /// }
    /// # let _ = Reverse(Vec::new());
    /// ```
    pub fn take_acked(self) -> (T, Ack) {
        let ack = self.current.take();
        (self.take(), ack)
    }
}

/// The acknowledgement of the item a step is handling: the first output
/// for the item takes it, every further output a fork of it. Shared by the
/// item's [`Item`] and the step's [`Emit`], hence cells.
#[derive(Default)]
pub(crate) struct Current {
    ack: Cell<Ack>,
    /// Where the first output for the item put the ack (a value's or an
    /// error's index in the output chunk): further outputs fork it there.
    first: Cell<Option<First>>,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
enum First {
    Value(usize),
    Error(usize),
}

impl Current {
    fn set(&self, ack: Ack) {
        self.ack.set(ack);
        self.first.set(None);
    }

    /// The ack to give away whole (a step taking it).
    fn take(&self) -> Ack {
        self.ack.take()
    }

    /// The ack for the next output for the item.
    #[inline]
    fn next<T>(&self, out: &Chunk<T>, first: First) -> Ack {
        let ack = self.ack.take();
        if !ack.is_none() {
            self.first.set(Some(first));
            return ack;
        }
        match self.first.get() {
            None => Ack::none(),
            Some(First::Value(i)) => out.acks.as_ref().map_or_else(Ack::none, |a| a[i].fork()),
            Some(First::Error(i)) => out.errors[i].1.fork_ack(),
        }
    }
}

impl<T> Deref for Item<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.slot.as_ref().expect("an Item always holds its value")
    }
}

/// Where a [`Step`] sends its results.
#[derive(Debug)]
pub struct Emit<'a, T> {
    out: &'a mut Chunk<T>,
    local: &'a mut Local,
    stage: &'a Arc<str>,
    current: &'a Current,
}

impl<T> Emit<'_, T> {
    /// Sends a value downstream. It carries the acknowledgement of the item
    /// being handled (the first output for an item takes it, each further
    /// one a fork: see [`Ack`]).
    #[inline]
    pub fn emit(&mut self, value: T) {
        self.local.emitted += 1;
        let ack = self
            .current
            .next(self.out, First::Value(self.out.values.len()));
        self.out.push_acked(value, ack);
    }

    /// Sends a value downstream with the acknowledgement it was taken with
    /// ([`Item::take_acked`]), instead of the current item's.
    pub fn emit_acked(&mut self, value: T, ack: Ack) {
        self.local.emitted += 1;
        self.out.push_acked(value, ack);
    }

    /// Reports that `item` failed with `error`: an
    /// [`ErrorKind::Failed`](crate::ErrorKind::Failed) error stamped with
    /// this stage's name and carrying the item goes downstream.
    pub fn fail<I: Send + 'static>(&mut self, item: Item<'_, I>, error: impl Into<BoxError>) {
        let item = item.take();
        self.fail_owned(item, error);
    }

    /// Like [`fail`](Emit::fail), for an item the step has already taken.
    pub fn fail_owned<I: Send + 'static>(&mut self, item: I, error: impl Into<BoxError>) {
        let err = StreamError::failed(self.stage.to_string(), error).with_item(item);
        self.error(err);
    }

    /// Sends an error of the step's own making downstream, counted as failed.
    pub fn error(&mut self, error: StreamError) {
        self.local.failed += 1;
        let ack = self
            .current
            .next(self.out, First::Error(self.out.errors.len()));
        self.out.push_error(error.with_ack(ack));
    }

    /// Passes an upstream error on unchanged.
    pub fn pass(&mut self, error: StreamError) {
        self.local.errors_passed += 1;
        self.out.push_error(error);
    }

    /// Counts `n` items as dropped on purpose (for a step that consumes
    /// items without output and wants its counters to say so).
    pub fn count_dropped(&mut self, n: u64) {
        self.local.dropped += n;
    }

    /// The name of the running stage.
    pub fn stage(&self) -> &str {
        self.stage
    }
}

/// Runs `step` item by item over one chunk.
///
/// Panics are caught once per chunk, not once per item: the happy path pays
/// for one `catch_unwind`. After a panic the runner records the error with
/// the item (if the step had not taken it), discards that item's partial
/// output, and resumes with the next item.
pub(crate) fn run_chunk<In, Out, S>(
    step: &mut S,
    chunk: Chunk<In>,
    counters: &Counters,
) -> Chunk<Out>
where
    S: Step<In, Out>,
    In: Send + 'static,
{
    let stage = counters.name();
    let mut local = Local {
        received: chunk.len() as u64,
        ..Local::default()
    };
    let mut out = Chunk::with_capacity(chunk.values.len());
    let mut items = chunk.into_acked();
    let mut slot: Option<In> = None;
    let mut err_slot: Option<StreamError> = None;
    let current = Current::default();
    // Output lengths and counts before the current item, to undo its
    // partial output if it panics.
    let mut mark = (0, 0);
    let mut saved = local;
    loop {
        let finished = catch_unwind(AssertUnwindSafe(|| {
            for (item, ack) in items.by_ref() {
                mark = (out.values.len(), out.errors.len());
                saved = local;
                match item {
                    Ok(value) => {
                        slot = Some(value);
                        current.set(ack);
                        let mut emit = Emit {
                            out: &mut out,
                            local: &mut local,
                            stage,
                            current: &current,
                        };
                        step.on_item(
                            Item {
                                slot: &mut slot,
                                current: &current,
                            },
                            &mut emit,
                        );
                        // Untaken and nothing emitted: a deliberate drop
                        // (a filter's reject), acknowledged as such.
                        // Untaken but emitted: a map that borrowed the
                        // item; it is simply released.
                        if slot.take().is_some() && (out.values.len(), out.errors.len()) == mark {
                            local.dropped += 1;
                            current.take().ack();
                        }
                    }
                    Err(mut error) => {
                        // The error's acknowledgement goes with what the
                        // step makes of it (a recovered value), or back
                        // into the error if it passes on.
                        current.set(error.take_ack());
                        err_slot = Some(error);
                        let mut emit = Emit {
                            out: &mut out,
                            local: &mut local,
                            stage,
                            current: &current,
                        };
                        step.on_error(
                            Item {
                                slot: &mut err_slot,
                                current: &current,
                            },
                            &mut emit,
                        );
                        if let Some(error) = err_slot.take() {
                            local.errors_passed += 1;
                            out.push_error(error.with_ack(current.take()));
                        }
                    }
                }
            }
        }));
        let Err(payload) = finished else { break };
        // Undo the partial output of the item that panicked; an item the
        // step had already put into a failure comes back from there, and
        // every acknowledgement of that output goes into the error.
        local = saved;
        let mut acks = vec![current.take()];
        let mut recovered = None;
        for partial in out.truncate(mark.0, mark.1, &mut acks) {
            if let Err(mut e) = partial {
                acks.push(e.take_ack());
                if recovered.is_none() {
                    recovered = e.take_payload();
                }
            }
        }
        let ack = Ack::merge(acks);
        if let Some(error) = err_slot.take() {
            // An upstream error passes on unchanged; the panic is logged.
            tracing::error!(
                stage = %stage,
                panic = %crate::base::error::PanicError::from_payload(payload),
                "on_error panicked; the upstream error is passed on unchanged"
            );
            local.errors_passed += 1;
            out.push_error(error.with_ack(ack));
            continue;
        }
        local.failed += 1;
        let mut err = StreamError::panicked(stage, payload).with_ack(ack);
        if let Some(item) = slot.take() {
            err = err.with_item(item);
        } else if let Some(item) = recovered {
            err = err.with_payload(item);
        }
        out.push_error(err);
    }
    counters.add(&local);
    out
}

/// Calls [`Step::on_end`] with the same panic protection.
///
/// If `on_end` panics, what it emitted before the panic is kept and
/// counted, a `panicked` error follows it, and what the step received and
/// had not accounted for is counted as aborted. The error stands for no
/// input item, so it is not counted (the conservation law stays exact).
pub(crate) fn run_end<In, Out, S>(step: &mut S, out: &mut Chunk<Out>, counters: &Counters)
where
    S: Step<In, Out>,
{
    let stage = counters.name();
    let mut local = Local::default();
    let current = Current::default();
    let result = catch_unwind(AssertUnwindSafe(|| {
        step.on_end(&mut Emit {
            out,
            local: &mut local,
            stage,
            current: &current,
        })
    }));
    counters.add(&local);
    if let Err(payload) = result {
        // Whatever the step received and did not account for is lost with
        // the panic: the items it held, and one it was emitting. Only this
        // task updates these counters, so the snapshot is exact.
        let m = counters.snapshot();
        let accounted = m.emitted + m.failed + m.errors_passed + m.dropped + m.aborted;
        counters.add_aborted(m.received.saturating_sub(accounted));
        out.push_error(StreamError::panicked(stage, payload));
    }
}

pub(crate) type PanicPayload = Box<dyn std::any::Any + Send>;

/// Runs `run` over borrowed values with panic protection.
///
/// `run(buf, at)` processes `values[at..]`, extending `buf` by one entry per
/// value. After a panic the length of `buf` locates the value that
/// panicked; it is recorded with its payload, `skip(buf)` stands in for it,
/// and processing resumes after it. The values stay in their vector while
/// borrowed, so the happy path needs no per-item bookkeeping.
#[inline]
pub(crate) fn guarded<B>(
    len: usize,
    buf: &mut Vec<B>,
    mut run: impl FnMut(&mut Vec<B>, usize),
    mut skip: impl FnMut(&mut Vec<B>),
) -> Vec<(usize, PanicPayload)> {
    let mut panicked = Vec::new();
    let mut at = 0;
    while at < len {
        let before = buf.len();
        match catch_unwind(AssertUnwindSafe(|| run(buf, at))) {
            Ok(()) => break,
            Err(payload) => {
                let failed = at + (buf.len() - before);
                panicked.push((failed, payload));
                skip(buf);
                at = failed + 1;
            }
        }
    }
    panicked
}

/// The fast path of a map: the values are only borrowed while `f` runs, and
/// `Vec::extend` over a slice keeps the output length in a register, so the
/// loop vectorises like a plain iterator map. A map is one value in, one
/// value out, so the chunk's errors keep their positions unless a value
/// panicked.
#[inline]
pub(crate) fn map_values<In, Out>(
    chunk: Chunk<In>,
    counters: &Counters,
    f: &mut impl FnMut(&In) -> Out,
) -> Chunk<Out>
where
    In: Send + 'static,
    Out: 'static,
{
    if std::any::TypeId::of::<In>() == std::any::TypeId::of::<Out>() {
        return map_in_place(chunk, counters, f);
    }
    let Chunk {
        values,
        errors,
        acks,
    } = chunk;
    let inputs = values.len();
    let mut out = Vec::with_capacity(inputs);
    let panicked = guarded(
        inputs,
        &mut out,
        |out, at| out.extend(values[at..].iter().map(&mut *f)),
        |_| {},
    );
    let at: Vec<usize> = panicked.iter().map(|(i, _)| *i).collect();
    let mut panicked = panicked.into_iter().peekable();
    let mut failures = Vec::with_capacity(at.len());
    if !at.is_empty() {
        for (i, v) in values.into_iter().enumerate() {
            if let Some((_, payload)) = panicked.next_if(|(p, _)| *p == i) {
                failures.push((
                    i,
                    StreamError::panicked(counters.name(), payload).with_item(v),
                ));
            }
        }
    }
    let kept = |i: usize| at.binary_search(&i).is_err();
    let acks = keep_acks(acks, &mut failures, kept);
    finish(out, errors, acks, failures, inputs, counters, kept)
}

/// `T` as `U` when they are the same type (checked at run time through
/// `Any`, which the compiler folds away after monomorphisation).
#[inline]
fn same_type<T: 'static, U: 'static>(v: &mut T) -> &mut U {
    (v as &mut dyn std::any::Any)
        .downcast_mut::<U>()
        .expect("called only when the types are equal")
}

/// A map whose output type is its input type rewrites the chunk's vector
/// in place: no allocation per chunk, which is most of what a light map
/// stage costs besides the loop itself. Each value is replaced only after
/// `f` returns, so a panic leaves the panicking value intact at the index
/// the loop counter holds.
fn map_in_place<In, Out>(
    chunk: Chunk<In>,
    counters: &Counters,
    f: &mut impl FnMut(&In) -> Out,
) -> Chunk<Out>
where
    In: Send + 'static,
    Out: 'static,
{
    let Chunk {
        mut values,
        errors,
        mut acks,
    } = chunk;
    let inputs = values.len();
    let mut failures: Vec<(usize, StreamError)> = Vec::new();
    let mut at = 0; // next value to map
    while at < values.len() {
        let mut done = 0;
        let run = catch_unwind(AssertUnwindSafe(|| {
            for v in values[at..].iter_mut() {
                let mut new = f(v);
                std::mem::swap(v, same_type::<Out, In>(&mut new));
                done += 1;
            }
        }));
        let Err(payload) = run else { break };
        let k = at + done;
        let item = values.remove(k);
        // Its index among the inputs: earlier failures were removed too.
        let index = k + failures.len();
        let mut err = StreamError::panicked(counters.name(), payload).with_item(item);
        if let Some(acks) = &mut acks {
            err = err.with_ack(acks.remove(k));
        }
        failures.push((index, err));
        at = k;
    }
    let mut values = Some(values);
    let values: Vec<Out> = same_type::<Option<Vec<In>>, Option<Vec<Out>>>(&mut values)
        .take()
        .expect("just set");
    let failed: Vec<usize> = failures.iter().map(|(i, _)| *i).collect();
    finish(values, errors, acks, failures, inputs, counters, |i| {
        failed.binary_search(&i).is_err()
    })
}

/// The fast path of a filter or tap: decide for every borrowed value first
/// (the number of decisions locates a panic), then move the kept values on
/// in one pass.
#[inline]
pub(crate) fn keep_values<T>(
    chunk: Chunk<T>,
    counters: &Counters,
    keep: &mut Vec<bool>,
    decide: &mut impl FnMut(&T) -> bool,
) -> Chunk<T>
where
    T: Send + 'static,
{
    let Chunk {
        values,
        errors,
        acks,
    } = chunk;
    let inputs = values.len();
    keep.clear();
    keep.reserve(inputs);
    let panicked = guarded(
        inputs,
        keep,
        |keep, at| keep.extend(values[at..].iter().map(&mut *decide)),
        // The panicked value is not kept.
        |keep| keep.push(false),
    );
    let mut out = Vec::with_capacity(inputs);
    let mut failures = Vec::with_capacity(panicked.len());
    let mut panicked = panicked.into_iter().peekable();
    for (i, (v, &k)) in values.into_iter().zip(keep.iter()).enumerate() {
        if k {
            out.push(v);
        } else if let Some((_, payload)) = panicked.next_if(|(p, _)| *p == i) {
            failures.push((
                i,
                StreamError::panicked(counters.name(), payload).with_item(v),
            ));
        }
    }
    let acks = keep_acks(acks, &mut failures, |i| keep[i]);
    finish(out, errors, acks, failures, inputs, counters, |i| keep[i])
}

/// The acknowledgements of a one-in-one-out step's kept values; a failed
/// value's goes into its error (`failures`, by input index), and a value
/// dropped on purpose is acknowledged.
fn keep_acks(
    acks: Option<Vec<Ack>>,
    failures: &mut [(usize, StreamError)],
    kept: impl Fn(usize) -> bool,
) -> Option<Vec<Ack>> {
    let acks = acks?;
    if failures.is_empty() && (0..acks.len()).all(&kept) {
        return Some(acks);
    }
    let mut out = Vec::with_capacity(acks.len());
    let mut failures = failures.iter_mut().peekable();
    for (i, ack) in acks.into_iter().enumerate() {
        if kept(i) {
            out.push(ack);
        } else if let Some((_, e)) = failures.next_if(|(f, _)| *f == i) {
            e.add_ack(ack);
        } else {
            ack.ack();
        }
    }
    Some(out)
}

/// Assembles the output chunk of a one-in-one-out step and adds its counts.
fn finish<Out>(
    values: Vec<Out>,
    errors: Vec<(usize, StreamError)>,
    acks: Option<Vec<Ack>>,
    failures: Vec<(usize, StreamError)>,
    inputs: usize,
    counters: &Counters,
    kept: impl Fn(usize) -> bool,
) -> Chunk<Out> {
    let emitted = values.len();
    let kept_all = emitted == inputs;
    counters.add(&Local {
        received: (inputs + errors.len()) as u64,
        emitted: emitted as u64,
        failed: failures.len() as u64,
        errors_passed: errors.len() as u64,
        dropped: (inputs - emitted - failures.len()) as u64,
        ..Local::default()
    });
    // When every input value became an output value, errors keep their
    // positions; with no errors and no failures there is nothing to place.
    let errors = if kept_all || (failures.is_empty() && errors.is_empty()) {
        errors
    } else {
        place_errors(errors, failures, kept, inputs)
    };
    Chunk {
        values,
        errors,
        acks,
    }
}
