//! The pipeline: the tasks of one chain, their counters, and their lifecycle.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::Stream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::EdgeConfig;
use crate::counters::{Counters, StageMetrics};
use crate::error::Result;
use crate::flow::Flow;
use crate::source::{IterSource, PushSource, Pusher, Shutdown, StreamSource};

/// A handle on one pipeline: its sources, stage tasks and counters.
///
/// Cheap to clone; every [`Flow`] knows its pipeline
/// ([`Flow::pipeline`]). The free functions [`iter`](crate::iter),
/// [`stream`](crate::stream) and [`channel`](crate::channel) create a new
/// pipeline with the default [`EdgeConfig`]; create one explicitly to set the
/// edge configuration or to tie shutdown to your own cancellation token.
///
/// # Lifecycle
///
/// - **End of input**: sources end, every stage drains and flushes, the
///   final flow ends, and every task exits.
/// - **Dropping the final flow** stops the chain: each stage notices that
///   its output is gone, discards and counts what it holds, and exits.
/// - **[`shutdown`](Pipeline::shutdown)** (graceful): sources stop taking
///   new input (a [`Pusher`] refuses at once); everything already accepted
///   drains through the chain as at end of input.
/// - **[`abort`](Pipeline::abort)**: every stage stops at once and counts
///   what it held (`undelivered`) and what waited on its input (`aborted`).
/// - **[`join`](Pipeline::join)** waits for every task and reports a stage
///   that panicked.
///
/// # Examples
///
/// ```
/// use streamz::{EdgeConfig, Pipeline};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let pipeline = Pipeline::with_edge(EdgeConfig::try_new(64, 16).unwrap());
/// let out = pipeline
///     .iter(0..100u64)
///     .map(|x| x * 2)
///     .async_boundary("double")
///     .collect()
///     .await;
/// assert_eq!(out.len(), 100);
/// pipeline.join().await.unwrap();
/// # }
/// ```
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
}

struct Inner {
    edge: EdgeConfig,
    shutdown: CancellationToken,
    abort: CancellationToken,
    stages: Mutex<Vec<Counters>>,
    tasks: Mutex<Vec<(Arc<str>, JoinHandle<()>)>>,
    linked: Mutex<Vec<Pipeline>>,
    discarded: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The lists stay consistent even if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for Pipeline {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("edge", &self.inner.edge)
            .field("shutting_down", &self.inner.shutdown.is_cancelled())
            .field("aborted", &self.inner.abort.is_cancelled())
            .field("stages", &lock(&self.inner.stages).len())
            .finish()
    }
}

impl Pipeline {
    /// A pipeline with the default [`EdgeConfig`].
    pub fn new() -> Self {
        Self::with_edge(EdgeConfig::new())
    }

    /// A pipeline whose edges use `edge` unless a stage sets its own.
    pub fn with_edge(edge: EdgeConfig) -> Self {
        Self::build(edge, CancellationToken::new())
    }

    /// A pipeline that shuts down gracefully when `token` is cancelled (for
    /// example by your application's signal handler).
    ///
    /// ```
    /// use tokio_util::sync::CancellationToken;
    ///
    /// let token = CancellationToken::new();
    /// let pipeline = streamz::Pipeline::with_shutdown_token(token.clone());
    /// token.cancel();
    /// assert!(pipeline.is_shutting_down());
    /// ```
    pub fn with_shutdown_token(token: CancellationToken) -> Self {
        Self::build(EdgeConfig::new(), token)
    }

    fn build(edge: EdgeConfig, shutdown: CancellationToken) -> Self {
        Pipeline {
            inner: Arc::new(Inner {
                edge,
                shutdown,
                abort: CancellationToken::new(),
                stages: Mutex::new(Vec::new()),
                tasks: Mutex::new(Vec::new()),
                linked: Mutex::new(Vec::new()),
                discarded: AtomicU64::new(0),
            }),
        }
    }

    /// The default edge configuration of this pipeline.
    pub fn edge(&self) -> EdgeConfig {
        self.inner.edge
    }

    /// A source of the iterator's items, pulled `max_chunk` at a time by the
    /// first stage. The iterator runs inside that stage's task, so it should
    /// not block.
    pub fn iter<I>(&self, items: I) -> Flow<I::Item>
    where
        I: IntoIterator,
        I::IntoIter: Send + 'static,
        I::Item: Send + 'static,
    {
        let counters = self.register("iter");
        Flow::from_source(
            self.clone(),
            Box::new(IterSource {
                iter: Some(items.into_iter()),
                max_chunk: self.inner.edge.max_chunk(),
                shutdown: self.inner.shutdown.clone(),
                counters,
            }),
        )
    }

    /// A source of a `futures::Stream`'s items.
    pub fn stream<S>(&self, stream: S) -> Flow<S::Item>
    where
        S: Stream + Send + 'static,
        S::Item: Send + 'static,
    {
        use futures::StreamExt;
        self.try_stream(stream.map(Ok))
    }

    /// A source of a stream whose items may already be errors.
    pub fn try_stream<S, T>(&self, stream: S) -> Flow<T>
    where
        S: Stream<Item = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let counters = self.register("stream");
        Flow::from_source(
            self.clone(),
            Box::new(StreamSource {
                stream: Some(Box::pin(stream)),
                max_chunk: self.inner.edge.max_chunk(),
                shutdown: Shutdown::new(self.inner.shutdown.clone()),
                counters,
            }),
        )
    }

    /// A source the application pushes into with a [`Pusher`]. The channel
    /// holds up to the edge's `capacity` items; `send` waits while it is full.
    pub fn channel<T: Send + 'static>(&self) -> (Pusher<T>, Flow<T>) {
        self.channel_named("channel")
    }

    /// [`channel`](Pipeline::channel) with the source's stage name.
    pub(crate) fn channel_named<T: Send + 'static>(
        &self,
        name: impl Into<Arc<str>>,
    ) -> (Pusher<T>, Flow<T>) {
        let (tx, rx) = tokio::sync::mpsc::channel(self.inner.edge.capacity());
        let counters = self.register(name);
        let flow = Flow::from_source(
            self.clone(),
            Box::new(PushSource {
                rx,
                max_chunk: self.inner.edge.max_chunk(),
                shutdown: Shutdown::new(self.inner.shutdown.clone()),
                closing: false,
                counters,
            }),
        );
        (
            Pusher {
                tx,
                shutdown: self.inner.shutdown.clone(),
            },
            flow,
        )
    }

    /// This pipeline and every pipeline linked to it by a merge, directly or
    /// not, each once. No lock is held while walking, so cycles and
    /// diamonds of links are harmless.
    fn reachable(&self) -> Vec<Pipeline> {
        let mut seen = vec![self.clone()];
        let mut next = 0;
        while next < seen.len() {
            let linked: Vec<Pipeline> = lock(&seen[next].inner.linked).clone();
            for p in linked {
                if !seen.iter().any(|q| q.same(&p)) {
                    seen.push(p);
                }
            }
            next += 1;
        }
        seen
    }

    /// Starts a graceful shutdown: sources stop taking new input (a
    /// [`Pusher`] refuses at once), everything already accepted drains
    /// through the chain, partial state is flushed, and the tasks exit when
    /// their output has been consumed.
    pub fn shutdown(&self) {
        for p in self.reachable() {
            p.inner.shutdown.cancel();
        }
    }

    /// Stops every stage now. Items a stage holds or that wait on its input
    /// are discarded and counted (see [`StageMetrics`]).
    pub fn abort(&self) {
        for p in self.reachable() {
            p.inner.abort.cancel();
            p.inner.shutdown.cancel();
        }
    }

    /// Whether [`shutdown`](Pipeline::shutdown) (or abort) was requested.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// A token that is cancelled when the pipeline shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Counters of every stage, in the order the stages were created
    /// (then those of pipelines merged into this one).
    pub fn metrics(&self) -> Vec<StageMetrics> {
        self.reachable()
            .iter()
            .flat_map(|p| {
                lock(&p.inner.stages)
                    .iter()
                    .map(Counters::snapshot)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The counters of the first stage named `name`.
    pub fn stage_metrics(&self, name: &str) -> Option<StageMetrics> {
        self.metrics().into_iter().find(|m| m.name == name)
    }

    /// Items that were still unread in a [`Flow`] the application dropped.
    pub fn discarded(&self) -> u64 {
        self.reachable()
            .iter()
            .map(|p| p.inner.discarded.load(Relaxed))
            .sum()
    }

    /// How many of the pipeline's tasks are still running.
    pub fn running_tasks(&self) -> usize {
        self.reachable()
            .iter()
            .map(|p| {
                lock(&p.inner.tasks)
                    .iter()
                    .filter(|(_, h)| !h.is_finished())
                    .count()
            })
            .sum()
    }

    /// Waits until every task of the pipeline has exited.
    ///
    /// A pipeline's tasks exit when its input ends and the final flow has
    /// been consumed, when the final flow is dropped, or after an abort; join
    /// while some flow is still being read and it waits for that reader.
    ///
    /// # Errors
    ///
    /// [`PipelineError::Panicked`] lists the stages whose task panicked.
    /// (Panics in user closures do not count: they become error items.)
    pub async fn join(&self) -> std::result::Result<(), PipelineError> {
        let mut panics = Vec::new();
        for p in self.reachable() {
            loop {
                let tasks = std::mem::take(&mut *lock(&p.inner.tasks));
                if tasks.is_empty() {
                    break;
                }
                for (stage, handle) in tasks {
                    if let Err(e) = handle.await {
                        let message = if e.is_panic() {
                            crate::error::PanicError::from_payload(e.into_panic())
                                .message()
                                .to_owned()
                        } else {
                            "the task was cancelled".to_owned()
                        };
                        panics.push(StagePanic {
                            stage: stage.to_string(),
                            message,
                        });
                    }
                }
            }
        }
        if panics.is_empty() {
            Ok(())
        } else {
            Err(PipelineError::Panicked(panics))
        }
    }

    pub(crate) fn register(&self, name: impl Into<Arc<str>>) -> Counters {
        let counters = Counters::new(name.into());
        lock(&self.inner.stages).push(counters.clone());
        counters
    }

    pub(crate) fn abort_token(&self) -> CancellationToken {
        self.inner.abort.clone()
    }

    pub(crate) fn add_discarded(&self, n: u64) {
        if n != 0 {
            self.inner.discarded.fetch_add(n, Relaxed);
        }
    }

    pub(crate) fn same(&self, other: &Pipeline) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Makes `other`'s lifecycle follow this pipeline's (used by merge).
    pub(crate) fn link(&self, other: Pipeline) {
        if self.reachable().iter().any(|p| p.same(&other)) {
            return;
        }
        if self.inner.abort.is_cancelled() {
            other.abort();
        } else if self.inner.shutdown.is_cancelled() {
            other.shutdown();
        }
        lock(&self.inner.linked).push(other);
    }

    /// Spawns a stage task inside a tracing span named after the stage.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[track_caller]
    pub(crate) fn spawn<F>(&self, stage: Arc<str>, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let span = tracing::debug_span!("stage", name = %stage);
        let handle = tokio::spawn(fut.instrument(span));
        lock(&self.inner.tasks).push((stage, handle));
    }
}

/// Why [`Pipeline::join`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The tasks of these stages panicked outside user code.
    #[error("{} stage task(s) panicked: {}", .0.len(), .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
    Panicked(Vec<StagePanic>),
}

/// One stage task that panicked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stage `{stage}`: {message}")]
pub struct StagePanic {
    stage: String,
    message: String,
}

impl StagePanic {
    /// The stage's name.
    pub fn stage(&self) -> &str {
        &self.stage
    }

    /// The panic's message.
    pub fn message(&self) -> &str {
        &self.message
    }
}
