//! [`ParMap`]: a map for CPU-bound functions, run on several cores.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;

use crate::base::ack::Ack;
use crate::base::chunk::Chunk;
use crate::base::config::{ConfigError, EdgeConfig, nonzero};
use crate::base::error::{ErrorKind, StreamError};
use crate::flow::Flow;
use crate::flow::driver::{self, Demand, Operator, Out};
use crate::flow::processor::Processor;
use crate::flow::step::guarded;

/// Applies a CPU-bound function to each value on `workers` threads at once
/// (parsing, hashing, compression: work that keeps a core busy), where
/// [`Map`](crate::Map) and a [`Stage`](crate::Stage) use one core.
///
/// Each chunk of input is cut into one piece per worker; a piece runs on
/// rayon's thread pool (one thread per core, shared by every `ParMap` of
/// the process), so the runtime's own workers stay free for I/O. Up to
/// `workers` pieces run at once, and their results leave in input order
/// (or as they finish, with [`unordered`](Self::unordered)). Rayon was
/// chosen over tokio's blocking pool by measurement (docs/performance.md,
/// "ParMap"): 1.95x against 1.33x the serial stage on 2 cores.
///
/// A cheap function gains nothing from other threads: handing a piece over
/// costs some microseconds. So the stage times its work, and a chunk
/// expected to take less than [`INLINE_BELOW`] runs in the stage's own
/// task. The first chunk runs there until it has been measured: one call,
/// then two, four..., and as soon as `INLINE_BELOW` has passed, the rest
/// goes to the workers. So a trivial function costs about what a
/// [`Stage`](crate::Stage) map costs, and a heavy one uses every worker.
/// The estimate is the last chunk's: a function that turns slow after a
/// run of cheap calls runs one chunk in the stage's task before the next
/// goes to the workers.
/// One call always runs where it started: a call that blocks for a second
/// blocks that thread for a second, the stage's task included the first
/// time. Keep blocking I/O out of the function (it also takes a pool
/// thread from every other `ParMap`); use an
/// [`AsyncMapper`](crate::AsyncMapper) for it.
///
/// Guarantees, as every stage: a panic in the function becomes a `panicked`
/// error item carrying its input; upstream errors pass in their place;
/// input is taken only while fewer than `workers` pieces run and fewer
/// than twice that many are in hand (backpressure; a bound in items, so
/// size the edge for large items); a shutdown lets the pieces in hand
/// finish; an abort counts what they hold as aborted (a piece already
/// running finishes on its thread and its results are dropped).
///
/// # Examples
///
/// ```
/// use streamz::ParMap;
///
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)] async fn main() {
/// // A stand-in for real work: a few thousand rounds of a hash.
/// let digest = |n: &u64| (0..5_000u64).fold(*n, |h, i| h.rotate_left(5) ^ i.wrapping_mul(0x9e37_79b9));
/// let out = streamz::iter(0..1_000u64)
///     .pipe(ParMap::new(digest).with_workers(2))
///     .collect()
///     .await;
/// assert_eq!(out.len(), 1_000);
/// assert_eq!(*out[7].as_ref().unwrap(), digest(&7)); // in order
/// # }
/// ```
pub struct ParMap<F> {
    name: Cow<'static, str>,
    f: Arc<F>,
    workers: usize,
    ordered: bool,
    edge: Option<EdgeConfig>,
}

/// The most workers a `ParMap` takes: each may hold a piece, so the
/// bound keeps what is in hand bounded.
const MAX_WORKERS: usize = 1024;

/// A piece whose expected duration is below this runs in the stage's own
/// task rather than on another thread (see [`ParMap`]).
pub const INLINE_BELOW: Duration = Duration::from_micros(50);

impl<F> fmt::Debug for ParMap<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParMap")
            .field("name", &self.name)
            .field("workers", &self.workers)
            .field("ordered", &self.ordered)
            .finish_non_exhaustive()
    }
}

impl<F> ParMap<F> {
    /// A parallel map applying `f`, with as many workers as the machine
    /// has cores ([`std::thread::available_parallelism`]).
    pub fn new<In, Out>(f: F) -> Self
    where
        F: Fn(&In) -> Out + Send + Sync + 'static,
    {
        ParMap {
            name: Cow::Borrowed("par_map"),
            f: Arc::new(f),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ordered: true,
            edge: None,
        }
    }

    /// How many pieces run at once. The pieces share rayon's pool, one
    /// thread per core for the whole process, so more workers than cores
    /// queue rather than run. Zero, and more than 1,024, are refused when
    /// the stage is piped ([`ConfigError`], field `workers`).
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Results leave as their pieces finish, not in input order.
    pub fn unordered(mut self) -> Self {
        self.ordered = false;
        self
    }

    crate::flow::processor::name_and_edge!("Sets the stage's output edge.");
}

impl<In, Out, F> Processor<In, Out> for ParMap<F>
where
    In: Send + 'static,
    Out: Send + 'static,
    F: Fn(&In) -> Out + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let at_most = if self.workers > MAX_WORKERS {
            Err(ConfigError::new("workers", "must be at most 1024"))
        } else {
            Ok(())
        };
        nonzero(self.workers, "workers")
            .and(at_most)
            .and(self.edge.map_or(Ok(()), |e| e.validate()))
            .map_err(|e| e.in_stage("ParMap", &self.name))
    }

    fn process(self, input: Flow<In>) -> Flow<Out> {
        let op = Par {
            f: self.f,
            workers: self.workers,
            ordered: self.ordered,
            stage: Arc::from(self.name.as_ref()),
            pieces: VecDeque::new(),
            per_item: None,
        };
        driver::spawn(input, &self.name, self.edge, op)
    }
}

/// What became of one input item.
enum Done<Out> {
    Value(Out, Ack),
    Failed(StreamError),
    Passed(StreamError),
}

/// A piece's results: all values (the usual case, emitted in bulk), or
/// item by item when the piece held errors or a call panicked.
enum Results<Out> {
    Values(Vec<Out>, Option<Vec<Ack>>),
    Mixed(Vec<Done<Out>>),
}

impl<Out> Results<Out> {
    fn len(&self) -> usize {
        match self {
            Results::Values(values, _) => values.len(),
            Results::Mixed(done) => done.len(),
        }
    }
}

/// A piece in hand: finished (run inline, or collected), or running on a
/// worker thread.
enum Piece<Out> {
    Done(Results<Out>),
    Running {
        task: tokio::sync::oneshot::Receiver<(Results<Out>, Duration)>,
        items: u64,
    },
}

impl<Out> Piece<Out> {
    fn items(&self) -> u64 {
        match self {
            Piece::Done(results) => results.len() as u64,
            Piece::Running { items, .. } => *items,
        }
    }
}

/// One item through `f`, a panic becoming an error carrying it.
fn one<In, Out, F>(f: &F, stage: &str, item: crate::Result<In>, ack: Ack) -> Done<Out>
where
    In: Send + 'static,
    F: Fn(&In) -> Out,
{
    match item {
        Ok(value) => match catch_unwind(AssertUnwindSafe(|| f(&value))) {
            Ok(out) => Done::Value(out, ack),
            Err(payload) => Done::Failed(
                StreamError::panicked(stage, payload)
                    .with_item(value)
                    .with_ack(ack),
            ),
        },
        Err(e) => Done::Passed(e.with_ack(ack)),
    }
}

/// Applies `f` to a piece, each call under `catch_unwind`; returns the
/// results and how long it took.
fn work<In, Out, F>(f: &F, stage: &str, piece: Chunk<In>) -> (Results<Out>, Duration)
where
    In: Send + 'static,
    F: Fn(&In) -> Out,
{
    let started = Instant::now();
    if piece.has_errors() {
        let done = piece
            .into_acked()
            .map(|(item, ack)| one(f, stage, item, ack))
            .collect();
        return (Results::Mixed(done), started.elapsed());
    }
    let Chunk { values, acks, .. } = piece;
    // One catch_unwind around the whole loop (resumed after a panic), so
    // the loop is a plain `extend` the compiler can vectorise.
    let mut outs = Vec::with_capacity(values.len());
    let panicked = guarded(
        values.len(),
        &mut outs,
        |outs, at| outs.extend(values[at..].iter().map(f)),
        |_| {},
    );
    if panicked.is_empty() {
        return (Results::Values(outs, acks), started.elapsed());
    }
    // Calls panicked: each fails carrying its item, in its place.
    let mut acks = acks.map(Vec::into_iter);
    let mut next_ack = move || acks.as_mut().and_then(Iterator::next).unwrap_or_default();
    let mut outs = outs.into_iter();
    let mut panicked = panicked.into_iter().peekable();
    let done = values
        .into_iter()
        .enumerate()
        .map(|(i, value)| match panicked.next_if(|(at, _)| *at == i) {
            Some((_, payload)) => Done::Failed(
                StreamError::panicked(stage, payload)
                    .with_item(value)
                    .with_ack(next_ack()),
            ),
            None => Done::Value(
                outs.next().expect("one output per call that returned"),
                next_ack(),
            ),
        })
        .collect();
    (Results::Mixed(done), started.elapsed())
}

struct Par<F, Out> {
    f: Arc<F>,
    workers: usize,
    ordered: bool,
    stage: Arc<str>,
    /// The pieces in hand, in input order.
    pieces: VecDeque<Piece<Out>>,
    /// The function's time per item, as last measured.
    per_item: Option<Duration>,
}

/// Measures a function not measured yet: runs a chunk without errors here,
/// in the stage's task, until [`INLINE_BELOW`] has passed. Returns the
/// results of the items done, how many, how long they took, and the items
/// left (for the workers). The clock is read after 1, 2, 4, 8... calls,
/// so one slow call is enough to send the rest to the workers.
fn work_inline<In, Out, F>(
    f: &F,
    stage: &str,
    chunk: Chunk<In>,
) -> (Results<Out>, usize, Duration, Option<Chunk<In>>)
where
    In: Send + 'static,
    F: Fn(&In) -> Out,
{
    let started = Instant::now();
    let Chunk {
        mut values, acks, ..
    } = chunk;
    let mut outs = Vec::with_capacity(values.len());
    let mut check = 1usize;
    let mut stop = values.len();
    let mut panicked = None;
    for (i, value) in values.iter().enumerate() {
        match catch_unwind(AssertUnwindSafe(|| f(value))) {
            Ok(out) => outs.push(out),
            Err(payload) => {
                panicked = Some(payload);
                stop = i + 1;
                break;
            }
        }
        if i + 1 == check {
            check = check.saturating_mul(2);
            if started.elapsed() >= INLINE_BELOW {
                stop = i + 1;
                break;
            }
        }
    }
    // What is left goes to the workers, with its acknowledgements.
    let mut acks = acks;
    let rest_values = values.split_off(stop);
    let rest_acks = acks.as_mut().map(|a| a.split_off(stop));
    let rest = (!rest_values.is_empty()).then(|| {
        let mut rest = Chunk::from_values(rest_values);
        rest.acks = rest_acks;
        rest
    });
    let results = match panicked {
        None => Results::Values(outs, acks),
        Some(payload) => {
            // The last item done panicked: it fails carrying its item.
            let mut acks = acks.map(Vec::into_iter);
            let mut next_ack = move || acks.as_mut().and_then(Iterator::next).unwrap_or_default();
            let mut done: Vec<Done<Out>> = outs
                .into_iter()
                .map(|out| Done::Value(out, next_ack()))
                .collect();
            if let Some(value) = values.pop() {
                let error = StreamError::panicked(stage, payload)
                    .with_item(value)
                    .with_ack(next_ack());
                done.push(Done::Failed(error));
            }
            Results::Mixed(done)
        }
    };
    (results, stop, started.elapsed(), rest)
}

impl<F, O> Par<F, O> {
    fn learn(&mut self, items: usize, took: Duration) {
        if let Ok(items) = u32::try_from(items) {
            if items > 0 {
                self.per_item = Some(took / items);
            }
        }
    }

    /// Results made here: out at once if no piece is ahead of them.
    fn finished(&mut self, results: Results<O>, out: &mut Out<O>) {
        if self.pieces.is_empty() {
            emit(results, out);
        } else {
            self.pieces.push_back(Piece::Done(results));
        }
    }

    /// Polls the piece at `i` if it runs. `Ready(Some)` with its results
    /// once done; `Ready(None)` if it was lost (then counted here).
    fn poll_piece(
        &mut self,
        i: usize,
        cx: &mut Context<'_>,
        out: &mut Out<O>,
    ) -> Poll<Option<Results<O>>> {
        let Piece::Running { task, items } = &mut self.pieces[i] else {
            return Poll::Ready(match self.pieces.remove(i) {
                Some(Piece::Done(results)) => Some(results),
                _ => None,
            });
        };
        let items = *items;
        let joined = std::task::ready!(task.poll_unpin(cx));
        self.pieces.remove(i);
        match joined {
            Ok((results, took)) => {
                self.learn(results.len(), took);
                Poll::Ready(Some(results))
            }
            Err(_) => {
                // The worker dropped the piece without an answer (it cannot
                // panic: every call is caught): its items are gone; one
                // error stands for them, counted as failed.
                let error = StreamError::new(ErrorKind::Panicked, self.stage.to_string())
                    .with_source(std::io::Error::other(format!(
                        "a ParMap piece of {items} items was lost"
                    )));
                out.push_error(error, items);
                Poll::Ready(None)
            }
        }
    }
}

fn emit<O>(results: Results<O>, out: &mut Out<O>) {
    match results {
        Results::Values(values, acks) => out.emit_all(values, acks),
        Results::Mixed(done) => {
            for done in done {
                match done {
                    Done::Value(v, ack) => out.emit(v, ack),
                    Done::Failed(e) => out.fail(e),
                    Done::Passed(e) => out.pass(e),
                }
            }
        }
    }
}

impl<In, O, F> Operator<In, O> for Par<F, O>
where
    In: Send + 'static,
    O: Send + 'static,
    F: Fn(&In) -> O + Send + Sync + 'static,
{
    fn on_chunk(&mut self, chunk: Chunk<In>, out: &mut Out<O>) {
        // Work known to be cheap runs here, in the stage's task: handing it
        // to another thread would cost more. Work not measured yet runs
        // here one call at first, to measure it, and stops once
        // INLINE_BELOW has passed. What is left, like work known to be
        // heavy, is cut into one piece per worker.
        let n = chunk.len();
        let small = self
            .per_item
            .is_some_and(|t| u32::try_from(n).is_ok_and(|n| t.saturating_mul(n) < INLINE_BELOW));
        let rest = if small {
            let (results, took) = work(&*self.f, &self.stage, chunk);
            self.learn(n, took);
            self.finished(results, out);
            return;
        } else if self.per_item.is_none() && !chunk.has_errors() {
            let (results, done, took, rest) = work_inline(&*self.f, &self.stage, chunk);
            self.learn(done, took);
            self.finished(results, out);
            match rest {
                Some(rest) => rest,
                None => return,
            }
        } else {
            chunk
        };
        let n = rest.len();
        for piece in rest.split(n.div_ceil(self.workers).max(1)) {
            let f = self.f.clone();
            let stage = self.stage.clone();
            let items = piece.len() as u64;
            let (tx, task) = tokio::sync::oneshot::channel();
            crate::base::blocking::spawn_on_rayon(move || {
                // The stage may have stopped (an abort): nobody to tell.
                let _ = tx.send(work(&*f, &stage, piece));
            });
            self.pieces.push_back(Piece::Running { task, items });
        }
    }

    fn poll_work(&mut self, cx: &mut Context<'_>, out: &mut Out<O>) -> Poll<()> {
        let mut progress = false;
        let mut i = 0;
        while i < self.pieces.len() {
            match self.poll_piece(i, cx, out) {
                Poll::Ready(results) => {
                    // Removed: the next piece is now at `i`.
                    if let Some(results) = results {
                        emit(results, out);
                    }
                    progress = true;
                }
                // In order, nothing passes a piece still running.
                Poll::Pending if self.ordered => break,
                Poll::Pending => i += 1,
            }
        }
        if progress {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Input while fewer than `workers` pieces run (so no worker waits for
    /// one that finished early to be passed in order), and at most twice
    /// that many in hand.
    fn demand(&self) -> Demand {
        let running = self
            .pieces
            .iter()
            .filter(|p| matches!(p, Piece::Running { .. }))
            .count();
        if running < self.workers && self.pieces.len() < self.workers.saturating_mul(2) {
            Demand::Input
        } else {
            Demand::Hold
        }
    }

    fn held(&self) -> u64 {
        self.pieces.iter().map(Piece::items).sum()
    }
}
