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

use std::borrow::Cow;
use std::ops::Deref;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::counters::{Counters, Local};
use crate::error::{BoxError, Result, StreamError};

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

    /// Handles an error item from upstream. The default passes it on
    /// unchanged, which is what almost every stage should do.
    fn on_error(&mut self, error: StreamError, out: &mut Emit<'_, Out>) {
        out.pass(error);
    }

    /// Called once when the input ends, to flush any state. Not called when
    /// the pipeline is aborted.
    fn on_end(&mut self, out: &mut Emit<'_, Out>) {
        let _ = out;
    }
}

/// An item lent to a [`Step`]: read it through `Deref`, or take it.
///
/// While the item has not been taken, the runner can give it back inside an
/// error if the step fails or panics.
#[derive(Debug)]
pub struct Item<'a, T> {
    slot: &'a mut Option<T>,
}

impl<T> Item<'_, T> {
    /// Takes ownership of the item. After this a panic in the step can no
    /// longer hand the item back; take it last.
    pub fn take(self) -> T {
        self.slot.take().expect("an Item always holds its value")
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
    buf: &'a mut Vec<Result<T>>,
    local: &'a mut Local,
    stage: &'a Arc<str>,
}

impl<T> Emit<'_, T> {
    /// Sends a value downstream.
    pub fn emit(&mut self, value: T) {
        self.local.emitted += 1;
        self.buf.push(Ok(value));
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
        let err = StreamError::failed(self.stage_name(), error).with_item(item);
        self.local.failed += 1;
        self.buf.push(Err(err));
    }

    /// Sends an error of the step's own making downstream, counted as failed.
    pub fn error(&mut self, error: StreamError) {
        self.local.failed += 1;
        self.buf.push(Err(error));
    }

    /// Passes an upstream error on unchanged.
    pub fn pass(&mut self, error: StreamError) {
        self.local.errors_passed += 1;
        self.buf.push(Err(error));
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

    fn stage_name(&self) -> Cow<'static, str> {
        Cow::Owned(self.stage.to_string())
    }
}

/// Runs `step` over one chunk, appending results to `out`.
///
/// Panics are caught once per chunk, not once per item: the happy path pays
/// for one `catch_unwind`. After a panic the runner records the error with
/// the item (if the step had not taken it), discards that item's partial
/// output, and resumes with the next item.
pub(crate) fn run_chunk<In, Out, S>(
    step: &mut S,
    chunk: Vec<Result<In>>,
    out: &mut Vec<Result<Out>>,
    counters: &Counters,
) where
    S: Step<In, Out>,
    In: Send + 'static,
{
    let stage = counters.name();
    let mut local = Local {
        received: chunk.len() as u64,
        ..Local::default()
    };
    let mut items = chunk.into_iter();
    let mut slot: Option<In> = None;
    loop {
        let mut mark = (out.len(), local);
        let finished = catch_unwind(AssertUnwindSafe(|| {
            for item in items.by_ref() {
                mark = (out.len(), local);
                let mut emit = Emit {
                    buf: out,
                    local: &mut local,
                    stage,
                };
                match item {
                    Ok(value) => {
                        slot = Some(value);
                        step.on_item(Item { slot: &mut slot }, &mut emit);
                        // Untaken and nothing emitted: a deliberate drop
                        // (a filter's reject). Untaken but emitted: a map
                        // that borrowed the item; it is simply released.
                        if slot.take().is_some() && out.len() == mark.0 {
                            local.dropped += 1;
                        }
                    }
                    Err(error) => step.on_error(error, &mut emit),
                }
            }
        }));
        match finished {
            Ok(()) => break,
            Err(payload) => {
                // Undo the partial output of the item that panicked.
                out.truncate(mark.0);
                local = mark.1;
                local.failed += 1;
                let mut err = StreamError::panicked(stage, payload);
                if let Some(item) = slot.take() {
                    err = err.with_item(item);
                }
                out.push(Err(err));
            }
        }
    }
    counters.add(&local);
}

/// Calls [`Step::on_end`] with the same panic protection.
pub(crate) fn run_end<In, Out, S>(step: &mut S, out: &mut Vec<Result<Out>>, counters: &Counters)
where
    S: Step<In, Out>,
{
    let stage = counters.name();
    let mut local = Local::default();
    let mark = out.len();
    let result = catch_unwind(AssertUnwindSafe(|| {
        step.on_end(&mut Emit {
            buf: out,
            local: &mut local,
            stage,
        })
    }));
    if let Err(payload) = result {
        out.truncate(mark);
        local = Local {
            failed: 1,
            ..Local::default()
        };
        out.push(Err(StreamError::panicked(stage, payload)));
    }
    counters.add(&local);
}
