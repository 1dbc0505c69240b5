//! The pipeline: the tasks of one chain, their counters, and their lifecycle.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::Stream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::base::ack::Ack;
use crate::base::channel::EdgeFill;
use crate::base::config::{ConfigError, EdgeConfig};
use crate::base::counters::{Counters, StageMetrics};
use crate::base::error::Result;
use crate::base::signal::Signal;
use crate::base::telemetry::UNNAMED;
use crate::flow::Flow;
use crate::flow::source::{
    AckedPusher, IterSource, PushSource, Pusher, Shutdown, SourceItem, StreamSource,
};
use crate::flow::topology::{EdgeQueue, StageKind, Topology, TopologyEdge, TopologyStage};

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
/// let pipeline = Pipeline::with_edge(EdgeConfig::new(64, 16));
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
    /// Keeps alive every pipeline this one is linked with; see [`Group`].
    group: Arc<Group>,
}

/// One pipeline's own state. It names the pipelines linked to it only
/// through `Weak`s, so links in both directions (a merge each way) cannot
/// form a cycle of strong references that would never be freed.
struct Inner {
    name: Option<Arc<str>>,
    /// The edge given, with zeros raised to 1 (see `edge_error`).
    edge: EdgeConfig,
    /// Why the edge given is invalid: every pipe on this pipeline fails.
    edge_error: Option<ConfigError>,
    /// Stages that were not started because a setting is invalid.
    config_errors: Mutex<Vec<ConfigError>>,
    shutdown: Signal,
    abort: Signal,
    stages: Mutex<Vec<Counters>>,
    /// Which stage reads which (the topology), recorded as consumers are
    /// created.
    edges: Mutex<Vec<Edge>>,
    /// Its metrics publisher has started (feature `metrics`).
    #[cfg(feature = "metrics")]
    publishing: std::sync::atomic::AtomicBool,
    tasks: Mutex<Vec<(Arc<str>, JoinHandle<()>)>>,
    /// Pipelines that follow this one's lifecycle (merged into it). Each is
    /// in this pipeline's group, which keeps it alive while any handle on a
    /// member lives, so the upgrade succeeds whenever someone can walk here.
    linked: Mutex<Vec<Weak<Inner>>>,
    discarded: AtomicU64,
    /// Stage tasks found panicked by a join: kept here, so that a join
    /// dropped part-way (`shutdown_within`'s timeout) loses none of them.
    panicked: Mutex<Vec<StagePanic>>,
}

/// How often the publisher sets the pipelines' series (feature `metrics`).
#[cfg(feature = "metrics")]
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// What the publisher thread serves; the thread starts with the first
/// pipeline.
#[cfg(feature = "metrics")]
#[derive(Default)]
struct Published {
    /// Pipelines, held weakly.
    live: Vec<Weak<Inner>>,
    /// What dropped pipelines left running: published until their tasks
    /// end, then once more (see `Drop for Group`).
    left: Vec<Leftover>,
}

/// The stages of a pipeline dropped while some of its tasks still ran
/// (feature `metrics`).
#[cfg(feature = "metrics")]
struct Leftover {
    stages: Vec<Counters>,
    edges: Vec<Edge>,
    tasks: Vec<JoinHandle<()>>,
}

/// The publisher's lists. `None` if its thread could not start (logged
/// once): the series are then set only by `join`, `publish_metrics` and a
/// pipeline's drop.
#[cfg(feature = "metrics")]
fn publisher() -> Option<MutexGuard<'static, Published>> {
    static PUBLISHED: std::sync::OnceLock<Option<Mutex<Published>>> = std::sync::OnceLock::new();
    let published = PUBLISHED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("streamz-metrics".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(PUBLISH_EVERY);
                    let (live, left): (Vec<Arc<Inner>>, Vec<Leftover>) = {
                        let Some(mut list) = publisher() else { return };
                        list.live.retain(|p| p.strong_count() > 0);
                        let live = list.live.iter().filter_map(Weak::upgrade).collect();
                        (live, std::mem::take(&mut list.left))
                    };
                    for p in live {
                        publish_guarded(|| p.publish());
                    }
                    let still: Vec<Leftover> = left
                        .into_iter()
                        .filter_map(|l| {
                            // Finished before this publication, so it
                            // holds their last counts.
                            let done = l.tasks.iter().all(JoinHandle::is_finished);
                            publish_guarded(|| publish_parts(&l.stages, &l.edges));
                            (!done).then_some(l)
                        })
                        .collect();
                    if !still.is_empty()
                        && let Some(mut list) = publisher()
                    {
                        list.left.extend(still);
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Mutex::new(Published::default())),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the metrics publisher; series are set only by join, publish_metrics and a pipeline's drop");
                None
            }
        }
    });
    published.as_ref().map(lock)
}

/// Publishes, logging a panic instead of unwinding: a recorder that
/// panics must not end publishing for every pipeline, nor unwind a drop.
#[cfg(feature = "metrics")]
fn publish_guarded(publish: impl FnOnce()) {
    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(publish)) {
        let panic = crate::base::error::PanicError::from_payload(payload);
        tracing::error!(%panic, "publishing a pipeline's metrics panicked");
    }
}

/// Sets the series of these stages and edges.
#[cfg(feature = "metrics")]
fn publish_parts(stages: &[Counters], edges: &[Edge]) {
    let running: Vec<&Counters> = stages.iter().filter(|stage| stage.publish()).collect();
    for edge in edges {
        // Like its stage's, an edge's series wait for the stage to run
        // (under its final name).
        if !running.iter().any(|c| c.same(&edge.from)) {
            continue;
        }
        if let Some(fill) = &edge.fill {
            let (held, capacity) = fill.held();
            edge.series
                .get_or_init(|| {
                    crate::base::telemetry::EdgeSeries::new(&edge.from.labels(), edge.to.name())
                })
                .publish(held, capacity);
        }
    }
}

#[cfg(feature = "metrics")]
impl Inner {
    /// Sets this pipeline's stage and edge series (not those of pipelines
    /// merged into it: each has its own publisher). The lists are copied
    /// first, so no lock of the pipeline is held while the recorder runs.
    fn publish(&self) {
        let stages = lock(&self.stages).clone();
        let edges = lock(&self.edges).clone();
        publish_parts(&stages, &edges);
    }
}

/// An edge of the topology: `to` reads `from`'s output.
#[derive(Clone)]
struct Edge {
    from: Counters,
    to: Counters,
    fill: Option<EdgeFill>,
    /// The channel's exported series, taken at the first publication.
    #[cfg(feature = "metrics")]
    series: Arc<std::sync::OnceLock<crate::base::telemetry::EdgeSeries>>,
}

/// The owner of the state of pipelines joined by links, in either
/// direction.
///
/// A link is directed (the linked pipeline follows the linker's shutdown
/// and abort and shows in its metrics and join), but ownership is shared:
/// a handle on any member keeps every member alive, and the last handle
/// gone frees them together. A linked pipeline whose own handles are all
/// gone (the usual case: its flow was consumed by the merge) so stays in
/// the linker's metrics and join. Groups only ever merge: the smaller one
/// hands its members to the larger and forwards to it, so forwarding
/// pointers run from older groups to newer ones and never form a cycle.
struct Group {
    state: Mutex<GroupState>,
}

struct GroupState {
    members: Vec<Arc<Inner>>,
    /// Set once this group's members moved to another group.
    merged_into: Option<Arc<Group>>,
}

/// Pipelines dropped without `join` still publish what they counted: now,
/// and, for stage tasks still running, until they end (feature
/// `metrics`). Gathered per group, not per pipeline: a merge runs a merged
/// pipeline's source and steps in tasks of the pipeline that merged it, so
/// one member's tasks count into another's stages.
#[cfg(feature = "metrics")]
impl Drop for Group {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        // A group that forwards has no members left.
        let members = std::mem::take(&mut state.members);
        if !members.iter().any(|m| m.publishing.load(Relaxed)) {
            return;
        }
        let mut left = Leftover {
            stages: Vec::new(),
            edges: Vec::new(),
            tasks: Vec::new(),
        };
        for member in &members {
            left.stages.extend(lock(&member.stages).iter().cloned());
            left.edges.extend(lock(&member.edges).iter().cloned());
            left.tasks.extend(
                lock(&member.tasks)
                    .drain(..)
                    .map(|(_, task)| task)
                    .filter(|task| !task.is_finished()),
            );
        }
        let running = !left.tasks.is_empty();
        publish_guarded(|| publish_parts(&left.stages, &left.edges));
        if running && let Some(mut list) = publisher() {
            list.left.push(left);
        }
    }
}

impl Group {
    fn new(first: Arc<Inner>) -> Arc<Self> {
        Arc::new(Group {
            state: Mutex::new(GroupState {
                members: vec![first],
                merged_into: None,
            }),
        })
    }

    /// The group that now holds this group's members.
    fn root(self: &Arc<Self>) -> Arc<Self> {
        let mut group = self.clone();
        loop {
            let next = lock(&group.state).merged_into.clone();
            match next {
                Some(next) => group = next,
                None => return group,
            }
        }
    }

    /// Makes `a` and `b` one group.
    fn join(a: &Arc<Self>, b: &Arc<Self>) {
        loop {
            let (a, b) = (a.root(), b.root());
            if Arc::ptr_eq(&a, &b) {
                return;
            }
            // Locked in address order, so two joins cannot deadlock.
            let (first, second) = if Arc::as_ptr(&a) < Arc::as_ptr(&b) {
                (&a, &b)
            } else {
                (&b, &a)
            };
            let mut s1 = lock(&first.state);
            let mut s2 = lock(&second.state);
            if s1.merged_into.is_some() || s2.merged_into.is_some() {
                continue; // a concurrent join moved one of them: start again
            }
            // The smaller group forwards, so forwarding chains stay short.
            let (from, into, to) = if s1.members.len() <= s2.members.len() {
                (&mut *s1, &mut *s2, second)
            } else {
                (&mut *s2, &mut *s1, first)
            };
            into.members.append(&mut from.members);
            from.merged_into = Some(to.clone());
            return;
        }
    }
}

/// `name`, or `name#2`, `name#3`... if another stage than `this` has it.
fn unique(stages: &[Counters], this: Option<&Counters>, name: Arc<str>) -> Arc<str> {
    let taken = |candidate: &str| {
        stages
            .iter()
            .any(|c| this.is_none_or(|this| !c.same(this)) && &**c.name() == candidate)
    };
    if !taken(&name) {
        return name;
    }
    (2u64..)
        .map(|n| format!("{name}#{n}"))
        .find(|candidate| !taken(candidate))
        .expect("a free suffix")
        .into()
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
            .field("name", &self.inner.name)
            .field("edge", &self.inner.edge)
            .field("shutting_down", &self.inner.shutdown.is_raised())
            .field("aborted", &self.inner.abort.is_raised())
            .field("stages", &lock(&self.inner.stages).len())
            .finish()
    }
}

impl Pipeline {
    /// A pipeline with the default [`EdgeConfig`].
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A pipeline whose edges use `edge` unless a stage sets its own.
    pub fn with_edge(edge: EdgeConfig) -> Self {
        Self::builder().with_edge(edge).build()
    }

    /// A builder for a pipeline with several settings at once: its edge
    /// configuration, a shutdown token and a name.
    ///
    /// ```
    /// use streamz::{EdgeConfig, Pipeline};
    /// use tokio_util::sync::CancellationToken;
    ///
    /// let token = CancellationToken::new();
    /// let pipeline = Pipeline::builder()
    ///     .with_name("orders")
    ///     .with_edge(EdgeConfig::new(64, 16))
    ///     .with_shutdown_token(token.clone())
    ///     .build();
    /// assert_eq!(pipeline.name(), Some("orders"));
    /// assert_eq!(pipeline.edge().max_chunk(), 16);
    /// token.cancel();
    /// assert!(pipeline.is_shutting_down());
    /// ```
    pub fn builder() -> PipelineBuilder {
        PipelineBuilder::default()
    }

    /// The name given with [`PipelineBuilder::with_name`], if any.
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
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
        Self::builder().with_shutdown_token(token).build()
    }

    fn build(name: Option<Arc<str>>, edge: EdgeConfig, shutdown: CancellationToken) -> Self {
        let edge_error = edge
            .validate()
            .err()
            .map(|e| e.in_stage("Pipeline", name.as_deref().unwrap_or("pipeline")));
        let inner = Arc::new(Inner {
            name,
            edge: edge.sane(),
            edge_error,
            config_errors: Mutex::new(Vec::new()),
            shutdown: Signal::new(shutdown),
            abort: Signal::new(CancellationToken::new()),
            stages: Mutex::new(Vec::new()),
            edges: Mutex::new(Vec::new()),
            #[cfg(feature = "metrics")]
            publishing: std::sync::atomic::AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            linked: Mutex::new(Vec::new()),
            discarded: AtomicU64::new(0),
            panicked: Mutex::new(Vec::new()),
        });
        Pipeline {
            group: Group::new(inner.clone()),
            inner,
        }
    }

    /// The default edge configuration of this pipeline. An invalid one
    /// (a zero) is shown raised to 1: no stage starts on it, and
    /// [`Flow::try_pipe`] says why.
    pub fn edge(&self) -> EdgeConfig {
        self.inner.edge
    }

    /// The pipeline's own settings, checked before any stage is piped.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.inner.edge_error.clone().map_or(Ok(()), Err)
    }

    /// Records a stage that was not started, for [`join`](Pipeline::join).
    pub(crate) fn add_config_error(&self, error: ConfigError) {
        lock(&self.inner.config_errors).push(error);
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
        let counters = self.register_source("iter");
        Flow::from_source(
            self.clone(),
            Box::new(IterSource {
                iter: Some(items.into_iter()),
                max_chunk: self.inner.edge.max_chunk(),
                shutdown: self.inner.shutdown.watch(),
                counters: counters.clone(),
                span: None,
            }),
        )
        .produced_by(counters)
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
        self.stream_source(stream)
    }

    /// A source of items with their acknowledgements (see [`Ack`]): for a
    /// source of the application's own that learns when each item's outcome
    /// is durable (a queue with manual acknowledgement, a file read with a
    /// checkpoint). Each item's [`Ack`] travels with it and is met where its
    /// outcome is decided; make them with [`Ack::new`].
    ///
    /// ```
    /// use streamz::{Ack, Pipeline};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (acks, receipts): (Vec<Ack>, Vec<_>) = (0..4).map(|_| Ack::new()).unzip();
    /// let items = (0..4).zip(acks).map(|(v, ack)| (Ok(v), ack));
    /// let evens = Pipeline::new()
    ///     .acked_stream(futures::stream::iter(items))
    ///     .filter(|v| v % 2 == 0)
    ///     .collect()
    ///     .await;
    /// assert_eq!(evens.len(), 2);
    /// // Kept items were handed over, dropped ones dropped on purpose: all met.
    /// assert!(receipts.iter().all(|r| r.is_acked()));
    /// # }
    /// ```
    pub fn acked_stream<S, T>(&self, stream: S) -> Flow<T>
    where
        S: Stream<Item = (Result<T>, Ack)> + Send + 'static,
        T: Send + 'static,
    {
        self.stream_source(stream)
    }

    /// The source of `try_stream` and `acked_stream`: items, or items with
    /// their acknowledgements, polled from a stream.
    fn stream_source<S, T>(&self, stream: S) -> Flow<T>
    where
        S: Stream + Send + 'static,
        S::Item: SourceItem<T>,
        T: Send + 'static,
    {
        let counters = self.register_source("stream");
        Flow::from_source(
            self.clone(),
            Box::new(StreamSource {
                stream: Some(Box::pin(stream)),
                max_chunk: self.inner.edge.max_chunk(),
                shutdown: Shutdown::new(self.inner.shutdown.token().clone()),
                counters: counters.clone(),
                span: None,
            }),
        )
        .produced_by(counters)
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
        let (tx, flow) = self.push_channel(name);
        (Pusher::new(tx, self.inner.shutdown.token().clone()), flow)
    }

    /// [`channel_named`](Self::channel_named) for items with their
    /// acknowledgements (a connector's source).
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn acked_channel_named<T: Send + 'static>(
        &self,
        name: impl Into<Arc<str>>,
    ) -> (AckedPusher<T>, Flow<T>) {
        let (tx, flow) = self.push_channel(name);
        (
            AckedPusher::new(tx, self.inner.shutdown.token().clone()),
            flow,
        )
    }

    /// A bounded channel of `I` (items, or items with their acks) on the
    /// pipeline's edge, and the flow reading it as a source named `name`.
    fn push_channel<T, I>(
        &self,
        name: impl Into<Arc<str>>,
    ) -> (tokio::sync::mpsc::Sender<I>, Flow<T>)
    where
        T: Send + 'static,
        I: SourceItem<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(self.inner.edge.capacity());
        let counters = self.register_source(name);
        let flow = Flow::from_source(
            self.clone(),
            Box::new(PushSource {
                rx,
                max_chunk: self.inner.edge.max_chunk(),
                shutdown: Shutdown::new(self.inner.shutdown.token().clone()),
                closing: false,
                counters: counters.clone(),
            }),
        )
        .produced_by(counters);
        (tx, flow)
    }

    /// This pipeline and every pipeline linked to it by a merge, directly or
    /// not, each once. At most one lock is held at a time while walking, so
    /// cycles and diamonds of links are harmless.
    fn reachable(&self) -> Vec<Arc<Inner>> {
        let mut seen = vec![self.inner.clone()];
        let mut next = 0;
        while next < seen.len() {
            // Every linked pipeline is in this handle's group, which `self`
            // keeps alive: the upgrades succeed.
            let linked: Vec<Arc<Inner>> = lock(&seen[next].linked)
                .iter()
                .filter_map(Weak::upgrade)
                .collect();
            for p in linked {
                if !seen.iter().any(|q| Arc::ptr_eq(q, &p)) {
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
            p.shutdown.raise();
        }
    }

    /// Stops every stage now. Items a stage holds or that wait on its input
    /// are discarded and counted (see [`StageMetrics`]).
    pub fn abort(&self) {
        for p in self.reachable() {
            p.abort.raise();
            p.shutdown.raise();
        }
    }

    /// Whether [`shutdown`](Pipeline::shutdown) (or abort) was requested.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutdown.is_raised()
    }

    /// A token that is cancelled when the pipeline shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.token().clone()
    }

    /// Counters of every stage, in the order the stages were created
    /// (then those of pipelines merged into this one).
    pub fn metrics(&self) -> Vec<StageMetrics> {
        self.reachable()
            .iter()
            .flat_map(|p| {
                lock(&p.stages)
                    .iter()
                    .map(Counters::snapshot)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The pipeline's shape: its stages (in the order they were created,
    /// then those of pipelines merged into it) with their counters, and
    /// which stage reads which, with what each channel in between holds.
    /// See [`Topology`] for an example and its Mermaid and DOT pictures.
    pub fn topology(&self) -> Topology {
        let reachable = self.reachable();
        let counters: Vec<Counters> = reachable
            .iter()
            .flat_map(|p| lock(&p.stages).clone())
            .collect();
        let index = |c: &Counters| counters.iter().position(|k| k.same(c));
        let mut edges: Vec<TopologyEdge> = reachable
            .iter()
            .flat_map(|p| lock(&p.edges).clone())
            .filter_map(|edge| {
                let queue = edge.fill.map(|fill| {
                    let (held, capacity) = fill.held();
                    EdgeQueue { held, capacity }
                });
                Some(TopologyEdge {
                    from: index(&edge.from)?,
                    to: index(&edge.to)?,
                    queue,
                })
            })
            .collect();
        edges.sort_by_key(|e| e.to);
        let stages = counters
            .iter()
            .map(|c| TopologyStage {
                name: c.name().to_string(),
                kind: c.kind(),
                metrics: c.snapshot(),
            })
            .collect();
        Topology { stages, edges }
    }

    /// The counters of the stage named `name`. Names are unique within a
    /// pipeline and the pipelines merged into it: the second stage
    /// registered as `map` is `map#2`. (Two stages given the same name with
    /// [`Flow::named`] in pipelines merged later keep it; this finds the
    /// first.)
    pub fn stage_metrics(&self, name: &str) -> Option<StageMetrics> {
        self.metrics().into_iter().find(|m| m.name == name)
    }

    /// Items that were still unread in a [`Flow`] the application dropped.
    pub fn discarded(&self) -> u64 {
        self.reachable()
            .iter()
            .map(|p| p.discarded.load(Relaxed))
            .sum()
    }

    /// How many of the pipeline's tasks are still running.
    pub fn running_tasks(&self) -> usize {
        self.reachable()
            .iter()
            .map(|p| {
                lock(&p.tasks)
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
    /// [`PipelineError::Config`] if a stage was not started because a
    /// setting of it is invalid (checked first: such a pipeline is
    /// misconfigured whatever else happened). [`PipelineError::Panicked`] lists the stages whose task panicked
    /// (every join reports them, not only the first). Panics in user
    /// closures do not count: they become error items.
    ///
    /// Cancel safe: a join dropped part-way (under a timeout) loses nothing;
    /// a later join waits for the rest and reports every panic.
    pub async fn join(&self) -> std::result::Result<(), PipelineError> {
        let pipelines = self.reachable();
        for p in &pipelines {
            loop {
                let tasks = std::mem::take(&mut *lock(&p.tasks));
                if tasks.is_empty() {
                    break;
                }
                // Cancel safe: if this future is dropped, the handles not
                // yet awaited go back, so a later join still sees them.
                let mut pending = PutBack {
                    inner: p,
                    tasks: tasks.into(),
                };
                while let Some((_, handle)) = pending.tasks.front_mut() {
                    let result = handle.await;
                    let (stage, _) = pending.tasks.pop_front().expect("just awaited");
                    if let Err(e) = result {
                        let message = if e.is_panic() {
                            crate::base::error::PanicError::from_payload(e.into_panic())
                                .message()
                                .to_owned()
                        } else {
                            "the task was cancelled".to_owned()
                        };
                        lock(&p.panicked).push(StagePanic {
                            stage: stage.to_string(),
                            message,
                        });
                    }
                }
            }
        }
        // Everything has ended: the exported series get their last values.
        #[cfg(feature = "metrics")]
        for p in &pipelines {
            p.publish();
        }
        let config = pipelines
            .iter()
            .find_map(|p| lock(&p.config_errors).first().cloned());
        if let Some(error) = config {
            return Err(PipelineError::Config(error));
        }
        let panics: Vec<StagePanic> = pipelines
            .iter()
            .flat_map(|p| lock(&p.panicked).clone())
            .collect();
        if panics.is_empty() {
            Ok(())
        } else {
            Err(PipelineError::Panicked(panics))
        }
    }

    /// Shuts down gracefully and waits up to `grace` for every task to
    /// exit; if they have not by then, aborts and waits for that. The
    /// report says which it was and how many items the abort discarded.
    ///
    /// A graceful shutdown ends only once the final flow has been read to
    /// its end, so read it in another task (or drop it) to let it finish in
    /// time. `Duration::MAX` waits for as long as it takes.
    ///
    /// # Errors
    ///
    /// As [`join`](Pipeline::join): a stage not started or whose task
    /// panicked.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::{EdgeConfig, Pipeline};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    ///
    /// // Edges of one item, and nobody reads the final flow: once the relay
    /// // has filled its output it cannot drain what it holds, the grace
    /// // period runs out, and the pipeline is aborted.
    /// let pipeline = Pipeline::with_edge(EdgeConfig::new(1, 1));
    /// let flow = pipeline.iter(0..10u32).async_boundary("relay");
    /// tokio::task::yield_now().await; // the relay runs until it blocks
    /// let report = pipeline.shutdown_within(Duration::from_millis(50)).await.unwrap();
    /// assert!(!report.graceful());
    /// assert!(report.aborted() > 0);
    /// # drop(flow);
    /// # }
    /// ```
    pub async fn shutdown_within(
        &self,
        grace: Duration,
    ) -> std::result::Result<ShutdownReport, PipelineError> {
        let lost = || -> u64 {
            self.metrics()
                .iter()
                .map(|m| m.aborted + m.undelivered)
                .sum()
        };
        self.shutdown();
        let before = lost();
        if let Ok(joined) = crate::base::time::timeout(grace, self.join()).await {
            joined?;
            return Ok(ShutdownReport {
                // Someone else may have aborted while we waited.
                graceful: !self.inner.abort.is_raised(),
                aborted: lost() - before,
            });
        }
        tracing::warn!(
            pipeline = self.name().unwrap_or(""),
            ?grace,
            "graceful shutdown did not finish in time: aborting"
        );
        self.abort();
        self.join().await?;
        Ok(ShutdownReport {
            graceful: false,
            aborted: lost() - before,
        })
    }

    /// Registers a stage's counters under `name`, made unique in the
    /// pipeline: a second `map` becomes `map#2`, a third `map#3`.
    pub(crate) fn register(&self, name: impl Into<Arc<str>>) -> Counters {
        #[cfg(feature = "metrics")]
        self.start_publisher();
        let mut stages = lock(&self.inner.stages);
        let counters = Counters::new(unique(&stages, None, name.into()), self.inner.name.clone());
        stages.push(counters.clone());
        counters
    }

    /// Hands this pipeline to the metrics publisher (once): a thread of
    /// its own, shared by every pipeline of the process, that sets their
    /// stage counters and edge fill in the `metrics` recorder every
    /// [`PUBLISH_EVERY`] of real time. A thread, not a task: a periodic
    /// timer on the runtime would make a paused test clock advance second
    /// by second. It holds pipelines weakly and forgets them when they go.
    #[cfg(feature = "metrics")]
    fn start_publisher(&self) {
        if self.inner.publishing.swap(true, Relaxed) {
            return;
        }
        if let Some(mut published) = publisher() {
            published.live.push(Arc::downgrade(&self.inner));
        }
    }

    /// Publishes the stage counters and edge fill of this pipeline and
    /// those merged into it to the `metrics` recorder now (feature
    /// `metrics`). A publisher does it every second while the pipeline
    /// lives, and [`join`](Self::join) once everything has ended, so the
    /// last values are exact. A pipeline dropped without `join` publishes
    /// as its last handle goes, and its stage tasks still running until
    /// they end. Call it to publish at another moment (just before a
    /// process exits, say).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let flow = streamz::iter(1..=3).map(|x: &i32| x * 2);
    /// let pipeline = flow.pipeline().clone();
    /// flow.collect().await;
    /// // Every stage's `streamz_stage_items_total` now holds its counts.
    /// pipeline.publish_metrics();
    /// # }
    /// ```
    #[cfg(feature = "metrics")]
    pub fn publish_metrics(&self) {
        for p in self.reachable() {
            p.publish();
        }
    }

    /// [`register`](Self::register) for a source stage.
    pub(crate) fn register_source(&self, name: impl Into<Arc<str>>) -> Counters {
        let counters = self.register(name);
        counters.mark(StageKind::Source);
        counters
    }

    /// Records that the stage `to` reads the output of `from` (through a
    /// channel that `fill` shows, if `from` has a task).
    pub(crate) fn add_edge(&self, from: &Counters, to: &Counters, fill: Option<EdgeFill>) {
        lock(&self.inner.edges).push(Edge {
            from: from.clone(),
            to: to.clone(),
            fill,
            #[cfg(feature = "metrics")]
            series: Arc::default(),
        });
    }

    /// Gives a registered stage that has not run yet its final name (made
    /// unique like [`register`](Self::register)'s); false if it had one.
    pub(crate) fn rename(&self, counters: &Counters, name: Arc<str>) -> bool {
        let stages = lock(&self.inner.stages);
        counters.rename(unique(&stages, Some(counters), name))
    }

    pub(crate) fn abort_token(&self) -> CancellationToken {
        self.inner.abort.token().clone()
    }

    /// The abort signal, for a task that asks about it on every wake-up.
    pub(crate) fn abort_signal(&self) -> Signal {
        self.inner.abort.clone()
    }

    /// The shutdown signal, for a task that asks about it on every wake-up.
    pub(crate) fn shutdown_signal(&self) -> Signal {
        self.inner.shutdown.clone()
    }

    pub(crate) fn add_discarded(&self, n: u64) {
        if n != 0 {
            self.inner.discarded.fetch_add(n, Relaxed);
        }
    }

    /// Makes `other`'s lifecycle follow this pipeline's (used by merge).
    pub(crate) fn link(&self, other: Pipeline) {
        if self
            .reachable()
            .iter()
            .any(|p| Arc::ptr_eq(p, &other.inner))
        {
            return;
        }
        if self.inner.abort.is_raised() {
            other.abort();
        } else if self.inner.shutdown.is_raised() {
            other.shutdown();
        }
        // Names stay unique across linked pipelines (two `iter` sources
        // merged): a stage of `other` whose name is taken here gets a
        // suffix, unless it was named for good already (`Flow::named`).
        let mut known: Vec<Counters> = self
            .reachable()
            .iter()
            .flat_map(|p| lock(&p.stages).clone())
            .collect();
        for p in other.reachable() {
            let theirs = lock(&p.stages).clone();
            for stage in theirs {
                if known.iter().any(|k| k.name() == stage.name()) {
                    stage.rename(unique(&known, Some(&stage), stage.name().clone()));
                }
                known.push(stage);
            }
        }
        // Joined first: a link is only ever walked within one group.
        Group::join(&self.group, &other.group);
        lock(&self.inner.linked).push(Arc::downgrade(&other.inner));
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
        let pipeline = self.inner.name.as_deref().unwrap_or(UNNAMED);
        let span = tracing::debug_span!("stage", pipeline = %pipeline, name = %stage);
        let handle = tokio::spawn(fut.instrument(span));
        lock(&self.inner.tasks).push((stage, handle));
    }
}

/// Builds a [`Pipeline`] with several settings; see [`Pipeline::builder`].
#[derive(Debug, Clone, Default)]
pub struct PipelineBuilder {
    name: Option<Arc<str>>,
    edge: Option<EdgeConfig>,
    shutdown: Option<CancellationToken>,
}

impl PipelineBuilder {
    /// Names the pipeline (shown in its `Debug` output and its shutdown
    /// log line).
    pub fn with_name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The edge configuration of every stage that does not set its own
    /// (default: [`EdgeConfig::new`]).
    pub fn with_edge(mut self, edge: EdgeConfig) -> Self {
        self.edge = Some(edge);
        self
    }

    /// Shuts the pipeline down gracefully when `token` is cancelled (for
    /// example by your application's signal handler).
    pub fn with_shutdown_token(mut self, token: CancellationToken) -> Self {
        self.shutdown = Some(token);
        self
    }

    /// The pipeline.
    pub fn build(self) -> Pipeline {
        Pipeline::build(
            self.name,
            self.edge.unwrap_or_default(),
            self.shutdown.unwrap_or_default(),
        )
    }
}

/// What [`Pipeline::shutdown_within`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    graceful: bool,
    aborted: u64,
}

impl ShutdownReport {
    /// Whether every task exited within the grace period without an abort
    /// (false: the pipeline was aborted, by this call or by another).
    pub fn graceful(&self) -> bool {
        self.graceful
    }

    /// Items counted `aborted` or `undelivered` by the stages while the
    /// shutdown ran (summed over stages; zero for a clean graceful one).
    pub fn aborted(&self) -> u64 {
        self.aborted
    }
}

/// Returns the join handles not awaited yet to their pipeline when a join
/// is dropped part-way.
struct PutBack<'a> {
    inner: &'a Inner,
    tasks: std::collections::VecDeque<(Arc<str>, JoinHandle<()>)>,
}

impl Drop for PutBack<'_> {
    fn drop(&mut self) {
        lock(&self.inner.tasks).extend(self.tasks.drain(..));
    }
}

/// Why [`Pipeline::join`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A stage was not started because one of its settings is invalid
    /// (the first such stage; each one's output held the error as an
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) item).
    #[error("a stage did not start: {0}")]
    Config(ConfigError),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Watches whether a pipeline's state is still allocated.
    fn watch(p: &Pipeline) -> Weak<Inner> {
        Arc::downgrade(&p.inner)
    }

    fn values(items: Vec<Result<u32>>) -> Vec<u32> {
        let mut v: Vec<u32> = items.into_iter().map(|r| r.unwrap()).collect();
        v.sort_unstable();
        v
    }

    #[tokio::test(start_paused = true)]
    async fn merges_in_both_directions_are_freed() {
        let a = Pipeline::new();
        let b = Pipeline::new();
        let (weak_a, weak_b) = (watch(&a), watch(&b));

        // `b` merged into `a`, then `a` into `b`: each links the other.
        let ab = crate::merge([a.iter(0..3u32), b.iter(10..13u32)]);
        let ba = crate::merge([b.iter(20..23u32), a.iter(30..33u32)]);
        assert_eq!(a.reachable().len(), 2);
        assert_eq!(b.reachable().len(), 2);
        // Each pipeline's metrics cover the other's stages.
        assert_eq!(a.metrics().len(), b.metrics().len());
        assert_eq!(a.metrics().len(), 6); // 2 iter + 1 merge per pipeline

        let (ab, ba) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(ab.collect(), ba.collect())
        })
        .await
        .expect("the merges end");
        assert_eq!(values(ab), [0, 1, 2, 10, 11, 12]);
        assert_eq!(values(ba), [20, 21, 22, 30, 31, 32]);
        a.join().await.unwrap();
        b.join().await.unwrap();

        drop((a, b));
        assert!(weak_a.upgrade().is_none(), "pipeline a leaked");
        assert!(weak_b.upgrade().is_none(), "pipeline b leaked");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cycle_of_links_still_follows_shutdown_both_ways() {
        let a = Pipeline::new();
        let b = Pipeline::new();
        let (weak_a, weak_b) = (watch(&a), watch(&b));
        let (_tx_a, flow_a) = a.channel::<u32>();
        let (_tx_b, flow_b) = b.channel::<u32>();
        let (_tx_a2, flow_a2) = a.channel::<u32>();
        let (_tx_b2, flow_b2) = b.channel::<u32>();
        let ab = crate::merge([flow_a, flow_b]);
        let ba = crate::merge([flow_b2, flow_a2]);

        b.shutdown();
        assert!(a.is_shutting_down(), "a follows b");
        let out = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(ab.collect(), ba.collect())
        })
        .await
        .expect("shutdown ends both merges");
        assert!(out.0.is_empty() && out.1.is_empty());
        a.join().await.unwrap();
        drop((a, b));
        assert!(weak_a.upgrade().is_none() && weak_b.upgrade().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_merged_pipeline_without_handles_stays_in_metrics_and_join() {
        let a = Pipeline::new();
        // The other input's pipeline has no handle but its (consumed) flow.
        let other = Pipeline::new();
        let weak_other = watch(&other);
        let flow = other.iter(10..13u32);
        drop(other);
        let merged = crate::merge([a.iter(0..3u32), flow]);
        assert!(weak_other.upgrade().is_some(), "kept by a's group");
        assert_eq!(values(merged.collect().await), [0, 1, 2, 10, 11, 12]);
        a.join().await.unwrap();
        let names: Vec<String> = a.metrics().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["iter", "merge", "iter#2"]);
        drop(a);
        assert!(weak_other.upgrade().is_none());
    }

    #[test]
    fn joins_of_many_groups_end_in_one_root() {
        let pipelines: Vec<Pipeline> = (0..9).map(|_| Pipeline::new()).collect();
        for pair in pipelines.windows(2) {
            Group::join(&pair[1].group, &pair[0].group);
        }
        let root = pipelines[0].group.root();
        assert!(
            pipelines
                .iter()
                .all(|p| Arc::ptr_eq(&p.group.root(), &root))
        );
        assert_eq!(lock(&root.state).members.len(), 9);
        let weak: Vec<_> = pipelines.iter().map(watch).collect();
        drop(pipelines);
        drop(root);
        assert!(weak.iter().all(|w| w.upgrade().is_none()));
    }
}
