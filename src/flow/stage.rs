//! A stage on its own task: the [`Stage`] processor and the task loop that
//! moves chunks from a source into an edge channel.

use std::borrow::Cow;
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::{Context, Poll};

use crate::base::signal::Watch;

use crate::base::channel::{ChunkTx, chunk_channel};
use crate::base::chunk::Chunk;
use crate::base::config::EdgeConfig;
use crate::base::counters::Counters;
use crate::base::error::StreamError;
use crate::flow::Flow;
use crate::flow::pipeline::Pipeline;
use crate::flow::processor::Processor;
use crate::flow::source::BoxSource;
use crate::flow::step::{ChunkCtx, Emit, Item, Step};
use crate::flow::topology::StageKind;

/// A [`Step`] run on its own task, with a channel to the next stage.
///
/// Use it to give a stage its own core: the stages before it keep running
/// while it works. To run a step inside the previous stage's task instead
/// (no channel hop, cheaper for light work) use [`Flow::step`] or
/// [`Flow::map`] and friends.
///
/// # Default
///
/// The output edge uses the pipeline's [`EdgeConfig`] unless
/// [`with_edge`](Stage::with_edge) sets one.
///
/// # Examples
///
/// ```
/// use streamz::{Map, Stage};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = streamz::iter(0..5u64)
///     .pipe(Stage::new("inc", Map::new(|x: &u64| x + 1)))
///     .pipe(Stage::new("double", Map::new(|x: &u64| x * 2)))
///     .collect()
///     .await;
/// let values: Vec<u64> = out.into_iter().map(Result::unwrap).collect();
/// assert_eq!(values, [2, 4, 6, 8, 10]);
/// # }
/// ```
pub struct Stage<S> {
    name: Cow<'static, str>,
    step: S,
    edge: Option<EdgeConfig>,
}

impl<S> fmt::Debug for Stage<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stage")
            .field("name", &self.name)
            .field("edge", &self.edge)
            .finish_non_exhaustive()
    }
}

impl<S> Stage<S> {
    /// A stage named `name` that runs `step`.
    pub fn new(name: impl Into<Cow<'static, str>>, step: S) -> Self {
        Stage {
            name: name.into(),
            step,
            edge: None,
        }
    }

    /// Sets this stage's output edge.
    pub fn with_edge(mut self, edge: EdgeConfig) -> Self {
        self.edge = Some(edge);
        self
    }
}

impl<In, Out, S> Processor<In, Out> for Stage<S>
where
    In: Send + 'static,
    Out: Send + 'static,
    S: Step<In, Out>,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), crate::ConfigError> {
        self.step
            .validate()
            .and(self.edge.map_or(Ok(()), |e| e.validate()))
            .map_err(|e| e.in_stage("Stage", &self.name))
    }

    fn process(self, input: Flow<In>) -> Flow<Out> {
        let edge = self.edge.unwrap_or(input.pipeline().edge());
        let (fused, counters) = input.fuse(self.name, self.step);
        fused.spawn_task(counters, edge)
    }
}

/// Spawns the task that drives `src` into a new edge channel and returns the
/// flow reading from that channel.
pub(crate) fn spawn_stage<T: Send + 'static>(
    pipeline: &Pipeline,
    src: BoxSource<T>,
    counters: Counters,
    edge: EdgeConfig,
) -> Flow<T> {
    let (tx, rx) = chunk_channel(edge);
    counters.mark(StageKind::Task);
    let fill = rx.fill();
    spawn_into(pipeline, src, tx, counters.clone(), edge.max_chunk());
    Flow::from_source(pipeline.clone(), Box::new(rx)).output_of(counters, fill)
}

/// Spawns the task that drives `src` into an existing channel (a merge has
/// several such tasks feeding one channel).
pub(crate) fn spawn_into<T: Send + 'static>(
    pipeline: &Pipeline,
    src: BoxSource<T>,
    tx: ChunkTx<T>,
    counters: Counters,
    max_chunk: usize,
) {
    let abort = pipeline.abort_signal().watch();
    let name = counters.name().clone();
    pipeline.spawn(name, drive(src, tx, abort, counters, max_chunk));
}

/// The task loop of a stage: pull a ready chunk, send it on, until the input
/// ends, the output is gone, or the pipeline is aborted.
async fn drive<T: Send + 'static>(
    mut src: BoxSource<T>,
    tx: ChunkTx<T>,
    abort: Watch,
    counters: Counters,
    max_chunk: usize,
) {
    let _guard = PanicGuard {
        tx: tx.clone(),
        counters: counters.clone(),
    };
    // Created once and kept registered, so the hot loop never re-registers.
    let mut aborted = pin!(abort.token().cancelled());
    let mut closed = pin!(tx.closed());
    loop {
        let stop = |cx: &mut Context<'_>| {
            aborted.as_mut().poll(cx).is_ready() || closed.as_mut().poll(cx).is_ready()
        };
        let chunk = match next_or_stop(&mut src, stop).await {
            Some(Some(chunk)) => chunk,
            Some(None) => return, // input ended and was fully delivered
            None => {
                counters.add_drained(src.abandon());
                return;
            }
        };
        // An abort stops the stage even while its input keeps flowing (the
        // flag, once per chunk: the token's own check takes a lock).
        if abort.is_raised() {
            counters.add_undelivered(chunk.len() as u64);
            counters.add_drained(src.abandon());
            return;
        }
        let mut pieces = chunk.split(max_chunk);
        while let Some(piece) = pieces.next() {
            let len = piece.len() as u64;
            let stop = |cx: &mut Context<'_>| aborted.as_mut().poll(cx).is_ready();
            if !matches!(send_or_stop(&tx, piece, stop).await, Some(Ok(()))) {
                let rest: u64 = pieces.map(|p| p.len() as u64).sum();
                counters.add_undelivered(len + rest);
                counters.add_drained(src.abandon());
                return;
            }
        }
    }
}

/// Waits for the next chunk of `src`: `Some(None)` at the end of the input,
/// `None` if `stop` (polled only while the input is pending) says to stop.
pub(crate) async fn next_or_stop<T>(
    src: &mut BoxSource<T>,
    mut stop: impl FnMut(&mut Context<'_>) -> bool,
) -> Option<Option<Chunk<T>>> {
    poll_fn(|cx| {
        if let Poll::Ready(chunk) = src.poll_chunk(cx) {
            return Poll::Ready(Some(chunk));
        }
        if stop(cx) {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Sends `chunk`, waiting for room: `Some(Err(chunk))` if the receiver is
/// gone, `None` if `stop` (polled only while waiting) says to stop; the
/// chunk is then dropped, and the caller counts it.
pub(crate) async fn send_or_stop<T>(
    tx: &ChunkTx<T>,
    chunk: Chunk<T>,
    mut stop: impl FnMut(&mut Context<'_>) -> bool,
) -> Option<Result<(), Chunk<T>>> {
    let mut send = pin!(tx.send(chunk));
    poll_fn(|cx| {
        if let Poll::Ready(r) = send.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if stop(cx) {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// If the stage task itself panics (not user code, whose panics are caught
/// per item), the next stage receives a `panicked` error instead of a
/// silently shortened stream.
struct PanicGuard<T> {
    tx: ChunkTx<T>,
    counters: Counters,
}

impl<T> Drop for PanicGuard<T> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let err =
                StreamError::new(crate::ErrorKind::Panicked, self.counters.name().to_string())
                    .with_source("the stage task panicked; items it held are lost");
            let mut chunk = Chunk::default();
            chunk.push_error(err);
            let _ = self.tx.send_now(chunk);
        }
    }
}

/// The identity step: what an async boundary or a merge runs, so their
/// counters read like any other stage's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pass;

impl<T: Send + 'static> Step<T, T> for Pass {
    fn on_item(&mut self, item: Item<'_, T>, out: &mut Emit<'_, T>) {
        out.emit(item.take());
    }

    fn on_chunk(&mut self, chunk: Chunk<T>, ctx: ChunkCtx<'_>) -> Chunk<T> {
        // Nothing can fail or panic here: the chunk moves over whole.
        ctx.counters.add(&crate::base::counters::Local {
            received: chunk.len() as u64,
            emitted: chunk.values.len() as u64,
            errors_passed: chunk.errors.len() as u64,
            ..Default::default()
        });
        chunk
    }
}
