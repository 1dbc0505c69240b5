//! [`KafkaSource`]: a consumer-group member as the source of a flow.

use std::borrow::Cow;
use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::KafkaError;
use super::offsets::{Commit, Offsets};
use super::record::{Entry, KafkaRecord, Progress};
use crate::base::ack::SourcePosition;
use crate::base::config::{ConfigError, nonzero};
use crate::base::counters::Counters;
use crate::base::error::StreamError;
use crate::base::telemetry::{self, Counter};
use crate::base::time;
use crate::flow::Flow;
use crate::flow::pipeline::Pipeline;
use crate::flow::source::AckedPusher;

/// Joins a Kafka consumer group and reads its share of the topics' partitions
/// as a flow of [`KafkaRecord`]s, committing offsets only past acknowledged
/// records (at least once).
///
/// # How offsets are committed
///
/// Every record read is tracked per partition, in offset order. A
/// partition's offset is committed (every [`with_commit_interval`], as soon
/// as the watermarks have passed [`with_commit_after`] records, and at the
/// end) up to the first record that is not acknowledged: a record is
/// acknowledged once its outcome is durable ([`KafkaRecord::ack`];
/// [`KafkaSink`](super::KafkaSink) and [`KafkaDlq`](super::KafkaDlq) do
/// it when the broker confirms their write). So after a crash, a restart
/// or a rebalance, the partition's next owner starts at the oldest record
/// whose outcome was not yet written, and nothing is lost; the records
/// after it that were written are written again (duplicates, counted as
/// [`released`](KafkaSourceStats::released) when a partition is taken away).
///
/// At most [`max_unacked`] records may wait for their acknowledgement; then
/// the source stops reading until some are acknowledged (and warns if that
/// lasts longer than a commit interval): memory stays bounded, and a stage
/// that forgets to acknowledge the records it drops shows up as a stalled
/// source, not as lost data. The tracker keeps an offset and a flag per
/// record, not its payload.
///
/// # Errors from the consumer
///
/// librdkafka recovers from most errors itself (a broker restarting, a
/// connection lost): those are logged and counted
/// ([`errors`](KafkaSourceStats::errors)). A fatal error ends the source:
/// it goes down the flow as a `failed` error item, and the source drains
/// and leaves as in a graceful shutdown.
///
/// # Rebalances
///
/// When the group takes partitions from this member, the source commits
/// what is acknowledged of them (asynchronously: the callback runs on the
/// source's task, which must not block) and forgets them: records of
/// those partitions still in the chain are released
/// ([`KafkaRecord::is_released`]) to the next owner, which reads them again
/// from the committed offset. When partitions are given to it, it starts
/// them afresh.
///
/// The consumer is served while the source reads: while the chain holds
/// it back (backpressure), rebalance callbacks wait too, up to the group's
/// `max.poll.interval.ms` (five minutes by default), after which the
/// broker considers the member gone.
///
/// # Ending
///
/// - A graceful [`Pipeline::shutdown`]: the source stops reading, waits up
///   to [`with_drain_timeout`] for the records in the chain to be acknowledged,
///   commits, and leaves the group.
/// - The flow stopped taking records (a [`Take`](crate::Take) that has its
///   count, the flow dropped, even while no record arrives): the records
///   already in the chain may still be written, so the source commits as
///   their acknowledgements come, until none is left or none came for a
///   quiet period (a commit interval, 1 to 10 s), at most
///   [`with_drain_timeout`]; the records the chain refused are read again
///   by the group. Then it leaves.
/// - The pipeline aborted: it commits what is acknowledged at once and
///   leaves the group.
///
/// The last commit and leaving the group wait on the broker, so they run
/// on a blocking thread; the task waits for them up to 30 s.
///
/// Either way the task is one of the pipeline's, so [`Pipeline::join`]
/// returns after the last commit.
///
/// # Defaults
///
/// `enable.auto.commit=false` and `enable.auto.offset.store=false` (the
/// source commits; setting either to `true` is refused),
/// `auto.offset.reset=earliest`; commit every second or every 5,000
/// acknowledged records, at most 10,000 records unacknowledged, drain for
/// 30 s. Any other librdkafka consumer
/// property with [`set`](KafkaSource::set).
///
/// [`with_commit_interval`]: KafkaSource::with_commit_interval
/// [`with_commit_after`]: KafkaSource::with_commit_after
/// [`max_unacked`]: KafkaSource::with_max_unacked
/// [`with_drain_timeout`]: KafkaSource::with_drain_timeout
///
/// # Examples
///
/// ```no_run
/// use streamz::kafka::{KafkaRecord, KafkaSink, KafkaSource, ProducerRecord};
/// use streamz::Pipeline;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let pipeline = Pipeline::new();
/// let (records, _handle) = KafkaSource::new("127.0.0.1:9092", "orders-enricher")
///     .topics(["orders"])
///     .start(&pipeline)?;
/// let sink = KafkaSink::new("127.0.0.1:9092", "orders-enriched")?;
/// records
///     .map(|r: &KafkaRecord| ProducerRecord::from(r)) // the acknowledgement travels along
///     .pipe(sink)                       // acknowledged once delivered
///     .for_each(|_delivered| {})
///     .await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct KafkaSource {
    config: ClientConfig,
    topics: Vec<String>,
    commit_every: Duration,
    commit_after: usize,
    max_unacked: usize,
    drain_for: Duration,
    name: Cow<'static, str>,
}

impl KafkaSource {
    /// A member of consumer group `group_id` on the cluster at `brokers`
    /// (`host:port`, comma-separated).
    pub fn new(brokers: &str, group_id: &str) -> Self {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        KafkaSource {
            config,
            topics: Vec::new(),
            commit_every: Duration::from_secs(1),
            commit_after: DEFAULT_COMMIT_AFTER,
            max_unacked: 10_000,
            drain_for: Duration::from_secs(30),
            name: Cow::Borrowed("kafka_source"),
        }
    }

    /// The topics to subscribe to.
    pub fn topics<S: Into<String>>(mut self, topics: impl IntoIterator<Item = S>) -> Self {
        self.topics = topics.into_iter().map(Into::into).collect();
        self
    }

    /// Sets a librdkafka consumer property (`session.timeout.ms`,
    /// `client.id`, security settings...).
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.config.set(key, value);
        self
    }

    /// How often acknowledged offsets are committed (1 s by default).
    /// Periods above a year (`Duration::MAX` included) are a year: the
    /// commits on rebalance and at the end still happen. Zero is refused
    /// when the source is [started](KafkaSource::start)
    /// ([`KafkaError::Invalid`], field `commit_interval`).
    pub fn with_commit_interval(mut self, every: Duration) -> Self {
        self.commit_every = every;
        self
    }

    /// Also commits as soon as the acknowledged watermarks have moved past
    /// `records` records since the last commit (5,000 by default), so the
    /// records a crash makes the group read again are bounded by this
    /// plus what was in flight (at most [`with_max_unacked`]), not by what
    /// a fast pipeline acknowledges in one commit interval.
    /// `usize::MAX` commits on the interval only. Zero is refused when
    /// the source is [started](KafkaSource::start) ([`KafkaError::Invalid`],
    /// field `commit_after`).
    ///
    /// [`with_max_unacked`]: KafkaSource::with_max_unacked
    pub fn with_commit_after(mut self, records: usize) -> Self {
        self.commit_after = records;
        self
    }

    /// How many records may wait for their acknowledgement before the
    /// source stops reading (10,000 by default). Zero is refused when the
    /// source is [started](KafkaSource::start) ([`KafkaError::Invalid`],
    /// field `max_unacked`).
    pub fn with_max_unacked(mut self, n: usize) -> Self {
        self.max_unacked = n;
        self
    }

    /// How long a graceful shutdown waits for the records in the chain to
    /// be acknowledged before the last commit (30 s by default).
    /// `Duration::MAX` means no limit: the source waits until every record
    /// is acknowledged (or the pipeline aborts), then commits and leaves.
    pub fn with_drain_timeout(mut self, wait: Duration) -> Self {
        self.drain_for = wait;
        self
    }

    /// Names the source (for counters, spans and errors).
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Checks the source's own settings; [`start`](KafkaSource::start)
    /// calls it before it creates the consumer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `KafkaSource`, the source's name and the
    /// field: `commit_interval` or `max_unacked` if zero.
    ///
    /// ```
    /// use streamz::kafka::KafkaSource;
    ///
    /// let source = KafkaSource::new("127.0.0.1:9092", "orders-enricher").with_max_unacked(0);
    /// let err = source.validate().unwrap_err();
    /// assert_eq!(err.to_string(), "KafkaSource `kafka_source`: `max_unacked` must be greater than zero");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.commit_every, "commit_interval")
            .and_then(|()| nonzero(self.commit_after, "commit_after"))
            .and_then(|()| nonzero(self.max_unacked, "max_unacked"))
            .map_err(|e| e.in_stage("KafkaSource", &self.name))
    }

    /// Creates the consumer, subscribes, and starts reading into a flow of
    /// `pipeline`. Must be called inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`KafkaError::Invalid`] for a zero [`with_commit_interval`] or
    /// [`max_unacked`] (see [`validate`](KafkaSource::validate));
    /// [`KafkaError::Config`] without topics or with automatic commits
    /// turned on; [`KafkaError::Client`] if librdkafka refuses the
    /// configuration or the subscription.
    ///
    /// [`with_commit_interval`]: KafkaSource::with_commit_interval
    /// [`max_unacked`]: KafkaSource::with_max_unacked
    pub fn start(
        self,
        pipeline: &Pipeline,
    ) -> Result<(Flow<KafkaRecord>, KafkaSourceHandle), KafkaError> {
        self.validate()?;
        if self.topics.is_empty() {
            return Err(KafkaError::Config {
                key: "topics".into(),
                reason: "at least one topic is needed",
            });
        }
        for key in ["enable.auto.commit", "enable.auto.offset.store"] {
            if self.config.get(key) != Some("false") {
                return Err(KafkaError::Config {
                    key: key.into(),
                    reason: "must stay false: the source commits acknowledged offsets itself",
                });
            }
        }
        let shared = Arc::new(Shared::default());
        let context = SourceContext {
            shared: shared.clone(),
            name: self.name.to_string(),
        };
        let mut config = self.config.clone();
        // Consumer lag comes from librdkafka's statistics: on by default
        // with the `metrics` feature, every 5 s, unless set.
        if cfg!(feature = "metrics") && config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", "5000");
        }
        let consumer: StreamConsumer<SourceContext> = config.create_with_context(context)?;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let (pusher, flow) = pipeline.acked_channel_named(self.name.to_string());
        if let Some(stage) = flow.upstream() {
            // The exported series carry the stage's registered name.
            let _ = shared.stage.set(stage.clone());
        }
        let (stopped_tx, stopped) = watch::channel(false);
        let task = Reader {
            consumer,
            shared: shared.clone(),
            pusher,
            shutdown: pipeline.shutdown_token(),
            abort: pipeline.abort_token(),
            commit_every: self.commit_every,
            commit_after: self.commit_after,
            max_unacked: self.max_unacked,
            drain_for: self.drain_for,
            name: self.name.to_string(),
            topic_names: HashMap::new(),
            ticks: AtomicU64::new(0),
            reads: 0,
        };
        pipeline.spawn(Arc::from(&*self.name), async move {
            task.run().await;
            let _ = stopped_tx.send(true);
        });
        Ok((flow, KafkaSourceHandle { shared, stopped }))
    }
}

/// What the reader task and the rebalance callbacks share.
struct Shared {
    offsets: Mutex<Offsets>,
    /// The partitions held now, sorted.
    assignment: watch::Sender<Vec<(String, i32)>>,
    read: AtomicU64,
    commits: AtomicU64,
    released: AtomicU64,
    errors: AtomicU64,
    stalled: AtomicBool,
    /// Records the watermarks passed since the last commit.
    passed: AtomicUsize,
    /// The source's stage, for the labels of its exported series (taken
    /// when first used: the stage's name is final once it runs).
    stage: OnceLock<Counters>,
    /// Commits, exported (feature `metrics`).
    exported_commits: OnceLock<Counter>,
}

impl Shared {
    fn offsets(&self) -> MutexGuard<'_, Offsets> {
        self.offsets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the watermarks past what is acknowledged now, counting what
    /// they passed toward the next commit.
    /// The exported commit counter.
    fn exported_commits(&self) -> &Counter {
        self.exported_commits
            .get_or_init(|| match self.stage.get() {
                Some(stage) => stage.labels().counter(telemetry::KAFKA_COMMITS, &[]),
                None => Counter::noop(),
            })
    }

    fn advance(&self) {
        let passed = self.offsets().advance_only();
        self.passed.fetch_add(passed, Ordering::Relaxed);
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            offsets: Mutex::default(),
            assignment: watch::Sender::new(Vec::new()),
            read: AtomicU64::default(),
            commits: AtomicU64::default(),
            released: AtomicU64::default(),
            errors: AtomicU64::default(),
            passed: AtomicUsize::default(),
            stalled: AtomicBool::default(),
            stage: OnceLock::new(),
            exported_commits: OnceLock::new(),
        }
    }
}

/// Counters of a [`KafkaSource`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct KafkaSourceStats {
    /// Records read.
    pub read: u64,
    /// Offset commit requests librdkafka accepted (each may cover several
    /// partitions; an asynchronous one may still fail at the broker, and is
    /// then made again).
    pub commits: u64,
    /// Records still in the chain when their partition was taken away:
    /// the next owner reads them again.
    pub released: u64,
    /// Records read and not yet acknowledged with every record before them.
    pub unacked: u64,
    /// Errors the consumer reported (each also went down the flow as an
    /// error item).
    pub errors: u64,
    /// Reading is paused because `max_unacked` records wait for their
    /// acknowledgement, and has been for a while (a stage that drops
    /// records without acknowledging them stalls a source this way; a
    /// warning is logged once per stall).
    pub stalled: bool,
}

/// Watches a running [`KafkaSource`].
#[derive(Clone)]
pub struct KafkaSourceHandle {
    shared: Arc<Shared>,
    stopped: watch::Receiver<bool>,
}

impl std::fmt::Debug for KafkaSourceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSourceHandle")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl KafkaSourceHandle {
    /// Its counters now.
    pub fn stats(&self) -> KafkaSourceStats {
        let s = &self.shared;
        KafkaSourceStats {
            read: s.read.load(Ordering::Relaxed),
            commits: s.commits.load(Ordering::Relaxed),
            released: s.released.load(Ordering::Relaxed),
            unacked: {
                // Current, not as of the last commit: move the watermarks.
                s.advance();
                s.offsets().outstanding() as u64
            },
            errors: s.errors.load(Ordering::Relaxed),
            stalled: s.stalled.load(Ordering::Relaxed),
        }
    }

    /// The partitions the group has given this member now, as
    /// `(topic, partition)`, sorted.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        self.shared.assignment.borrow().clone()
    }

    /// A watch of [`assignment`](KafkaSourceHandle::assignment), to wait
    /// for the group to give or take partitions.
    pub fn watch_assignment(&self) -> watch::Receiver<Vec<(String, i32)>> {
        self.shared.assignment.subscribe()
    }

    /// Waits until the source has made its last commit and left the group.
    pub async fn stopped(&mut self) {
        let _ = self.stopped.wait_for(|s| *s).await;
    }
}

struct SourceContext {
    shared: Arc<Shared>,
    name: String,
}

impl ClientContext for SourceContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): exports
    /// each assigned partition's consumer lag (feature `metrics`).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(stage) = self.shared.stage.get() else {
            return;
        };
        let labels = stage.labels();
        for (topic, t) in &statistics.topics {
            for (&partition, p) in &t.partitions {
                // -1: librdkafka's internal unassigned partition, or a lag
                // not known yet.
                if partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                labels.set_gauge(
                    telemetry::KAFKA_LAG,
                    &[
                        ("topic", topic.clone()),
                        ("partition", partition.to_string()),
                    ],
                    p.consumer_lag as f64,
                );
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let mut commits = Vec::new();
        let mut released = 0;
        {
            let mut offsets = self.shared.offsets();
            for e in tpl.elements() {
                let (commit, in_flight) = offsets.release(e.topic(), e.partition());
                commits.extend(commit);
                released += in_flight;
            }
        }
        self.shared.assignment.send_modify(|held| {
            held.retain(|(t, p)| {
                !tpl.elements()
                    .iter()
                    .any(|e| e.topic() == t && e.partition() == *p)
            });
        });
        self.shared
            .released
            .fetch_add(released as u64, Ordering::Relaxed);
        // A partition taken away is another member's to report: its lag
        // here reads 0 rather than its last value for good.
        if let Some(stage) = self.shared.stage.get() {
            let labels = stage.labels();
            for e in tpl.elements() {
                labels.set_gauge(
                    telemetry::KAFKA_LAG,
                    &[
                        ("topic", e.topic().to_owned()),
                        ("partition", e.partition().to_string()),
                    ],
                    0.0,
                );
            }
        }
        if released > 0 {
            tracing::info!(source = %self.name, released, "partitions taken away; their records not yet committed past will be read again by the next owner");
        }
        // Asynchronous: this runs on the reader's task, which must not
        // block on the network. A commit that lands late only makes the
        // next owner read more again, never less.
        commit(
            consumer,
            &self.shared,
            &commits,
            CommitMode::Async,
            &self.name,
        );
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.shared.assignment.send_modify(|held| {
                for e in tpl.elements() {
                    let tp = (e.topic().to_owned(), e.partition());
                    if !held.contains(&tp) {
                        held.push(tp);
                    }
                }
                held.sort();
            });
            tracing::info!(source = %self.name, partitions = tpl.count(), "partitions assigned");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(source = %self.name, error = %e, "offset commit failed; it is made again");
                let mut tracker = self.shared.offsets();
                for el in offsets.elements() {
                    if let Offset::Offset(next) = el.offset() {
                        tracker.retry(el.topic(), el.partition(), next);
                    }
                }
            }
        }
    }
}

/// Commits `commits` (nothing if empty). A failed asynchronous commit is
/// reported to [`SourceContext::commit_callback`] when librdkafka delivers
/// the report (which hands the offsets out again); the source also makes
/// every partition's commit again every [`RECOMMIT_EVERY`] ticks, so a
/// failure whose report never comes is covered too.
fn commit<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    shared: &Shared,
    commits: &[Commit],
    mode: CommitMode,
    name: &str,
) {
    if commits.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for c in commits {
        if let Err(e) = tpl.add_partition_offset(&c.topic, c.partition, Offset::Offset(c.next)) {
            tracing::warn!(source = %name, error = %e, "could not list an offset to commit");
        }
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => {
            shared.commits.fetch_add(1, Ordering::Relaxed);
            shared.exported_commits().increment(1);
        }
        Err(e) => {
            tracing::warn!(source = %name, error = %e, "offset commit failed; a later one covers it");
        }
    }
}

/// Every this many commit ticks, every partition's offset is committed
/// again, moved or not.
const RECOMMIT_EVERY: u64 = 10;

/// How often a source that waits for acknowledgements (at
/// `max_unacked`) looks again.
const STALL_CHECK: Duration = Duration::from_millis(5);

/// How long the source waits for its last commit and for leaving the
/// group before it gives up on the broker (the consumer finishes closing
/// on a blocking thread).
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// The reader task.
struct Reader {
    consumer: StreamConsumer<SourceContext>,
    shared: Arc<Shared>,
    pusher: AckedPusher<KafkaRecord>,
    shutdown: CancellationToken,
    abort: CancellationToken,
    commit_every: Duration,
    commit_after: usize,
    max_unacked: usize,
    drain_for: Duration,
    name: String,
    /// Topic names, allocated once.
    topic_names: HashMap<String, Arc<str>>,
    /// Commit ticks so far.
    ticks: AtomicU64,
    /// Records read since the watermarks were last moved.
    reads: u32,
}

/// How many records the reader reads between looks at how far the
/// watermarks moved (for [`KafkaSource::with_commit_after`]): one lock of
/// the tracker per this many records.
const LOOK_EVERY: u32 = 64;

/// How often a source whose flow stopped taking records looks at the
/// acknowledgements while they settle.
const SETTLE_CHECK: Duration = Duration::from_millis(20);

/// How often an idle reader looks whether the watermarks moved far enough
/// to commit ([`KafkaSource::with_commit_after`]).
const IDLE_LOOK: Duration = Duration::from_millis(100);

/// The default of [`KafkaSource::with_commit_after`].
const DEFAULT_COMMIT_AFTER: usize = 5_000;

enum Stop {
    /// A graceful shutdown: let the chain finish what it holds.
    Drain,
    /// The flow stopped taking records (a `Take` that has its count, a
    /// flow dropped): what is already in the chain may still be written
    /// and acknowledged, so wait for the acknowledgements to settle.
    Settle,
    /// The pipeline aborted.
    Now,
}

impl Reader {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(commit_period(self.commit_every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // While nothing arrives, acknowledgements still move the
        // watermarks: look now and then, for `commit_after`.
        let mut look = tokio::time::interval(IDLE_LOOK);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stalled_since: Option<tokio::time::Instant> = None;
        let stop = loop {
            if self.over_limit() {
                let since = *stalled_since.get_or_insert_with(tokio::time::Instant::now);
                let patience = self.commit_every.max(Duration::from_secs(1));
                if since.elapsed() >= patience && !self.shared.stalled.swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(source = %self.name, max_unacked = self.max_unacked, "reading paused: too many records wait for their acknowledgement (does a stage drop records without acknowledging them?)");
                }
                tokio::select! {
                    biased;
                    () = self.abort.cancelled() => break Stop::Now,
                    () = self.shutdown.cancelled() => break Stop::Drain,
                    () = self.pusher.closed() => break Stop::Settle,
                    _ = tick.tick() => self.commit_acknowledged(),
                    () = tokio::time::sleep(STALL_CHECK) => {}
                }
                continue;
            }
            stalled_since = None;
            self.shared.stalled.store(false, Ordering::Relaxed);
            let received = tokio::select! {
                biased;
                () = self.abort.cancelled() => break Stop::Now,
                () = self.shutdown.cancelled() => break Stop::Drain,
                () = self.pusher.closed() => break Stop::Settle,
                _ = tick.tick() => {
                    self.commit_acknowledged();
                    continue;
                }
                _ = look.tick() => {
                    self.commit_if_moved();
                    continue;
                }
                m = self.consumer.recv() => m.map(|m| record_of(&mut self.topic_names, &m)),
            };
            let (item, ack, tracked) = match received {
                Ok((record, ack, tracked)) => (Ok(record), ack, Some(tracked)),
                Err(e) => {
                    self.shared.errors.fetch_add(1, Ordering::Relaxed);
                    if self.consumer.client().fatal_error().is_none() {
                        // librdkafka recovers from these (a broker
                        // restarting, a lost connection) by itself.
                        tracing::warn!(source = %self.name, error = %e, "the consumer reported an error");
                        continue;
                    }
                    tracing::error!(source = %self.name, error = %e, "the consumer failed for good");
                    let err = StreamError::failed(self.name.clone(), KafkaError::Client(e));
                    (Err(err), crate::Ack::none(), None)
                }
            };
            let fatal = tracked.is_none();
            let mut send = pin!(self.pusher.send(item, ack));
            let sent = loop {
                tokio::select! {
                    biased;
                    () = self.abort.cancelled() => break None,
                    r = &mut send => break Some(r.is_ok()),
                    _ = tick.tick() => self.commit_acknowledged(),
                }
            };
            match sent {
                None => break Stop::Now,
                Some(false) if self.shutdown.is_cancelled() => break Stop::Drain,
                Some(false) => break Stop::Settle,
                Some(true) => {
                    // Tracked once it is in the chain: a record the flow
                    // refused is read again by whoever reads next, and is
                    // not waited for. Nothing else runs on the tracker
                    // between the receive and here (rebalance callbacks run
                    // inside `recv`, on this task).
                    if let Some((topic, partition, offset, progress)) = tracked {
                        self.shared
                            .offsets()
                            .track(&topic, partition, offset, progress);
                        self.shared.read.fetch_add(1, Ordering::Relaxed);
                        self.reads += 1;
                        if self.reads >= LOOK_EVERY {
                            self.reads = 0;
                            self.commit_if_moved();
                        }
                    }
                    if fatal {
                        break Stop::Drain;
                    }
                }
            }
        };
        match stop {
            Stop::Drain => self.drain(&mut tick).await,
            Stop::Settle => self.settle(&mut tick).await,
            Stop::Now => {}
        }
        self.close().await;
    }

    /// Whether `max_unacked` records wait (after moving the watermarks).
    fn over_limit(&self) -> bool {
        let over = {
            let mut offsets = self.shared.offsets();
            if offsets.outstanding() < self.max_unacked {
                return false;
            }
            let passed = offsets.advance_only();
            self.shared.passed.fetch_add(passed, Ordering::Relaxed);
            offsets.outstanding() >= self.max_unacked
        };
        self.commit_if_due();
        over
    }

    /// Moves the watermarks and commits if they passed `commit_after`
    /// records since the last commit.
    fn commit_if_moved(&self) {
        self.shared.advance();
        self.commit_if_due();
    }

    fn commit_if_due(&self) {
        if self.shared.passed.load(Ordering::Relaxed) >= self.commit_after {
            self.commit_acknowledged();
        }
    }

    /// The flow stopped taking records, but the chain may still write and
    /// acknowledge the ones it holds: wait while acknowledgements keep
    /// coming, committing as they do, until none is left, none came for a
    /// quiet period (a commit interval, 1 to 10 s: the records left were
    /// refused downstream, as a `Take` refuses what follows its count, and
    /// will never be acknowledged), the drain period passes, or the
    /// pipeline aborts. Without this, the acknowledgements still in flight
    /// when the flow closed were lost and the group read those records
    /// again.
    async fn settle(&self, tick: &mut tokio::time::Interval) {
        let quiet = self
            .commit_every
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        let deadline = time::after(tokio::time::Instant::now(), self.drain_for);
        let mut last = usize::MAX;
        let mut moved_at = tokio::time::Instant::now();
        loop {
            self.shared.advance();
            let left = self.shared.offsets().outstanding();
            if left == 0 {
                return; // the last commit follows
            }
            if left != last {
                last = left;
                moved_at = tokio::time::Instant::now();
                self.commit_acknowledged();
            } else if moved_at.elapsed() >= quiet {
                tracing::info!(source = %self.name, unacked = left, "the flow stopped taking records; the ones never acknowledged are read again by the group");
                return;
            }
            tokio::select! {
                () = self.abort.cancelled() => return,
                () = time::sleep_until(deadline) => return,
                _ = tick.tick() => {}
                () = tokio::time::sleep(SETTLE_CHECK) => {}
            }
        }
    }

    /// Waits up to `drain_for` for every record in the chain to be
    /// acknowledged, committing as they are.
    async fn drain(&self, tick: &mut tokio::time::Interval) {
        let drained = drain_until(self.drain_for, &self.abort, tick, || {
            self.commit_acknowledged();
            self.shared.offsets().outstanding()
        })
        .await;
        if let Drained::TimedOut(left) = drained {
            tracing::warn!(source = %self.name, unacked = left, "shutdown: records still unacknowledged after the drain period; the group reads them again");
        }
    }

    /// The last commit and leaving the group, on a blocking thread: both
    /// wait on the broker, and closing the consumer polls until it is
    /// closed.
    async fn close(self) {
        let Reader {
            consumer,
            shared,
            name,
            ..
        } = self;
        let last = shared.offsets().watermarks();
        let closing = {
            let name = name.clone();
            let shared_for_close = shared.clone();
            crate::base::blocking::spawn_blocking(move || {
                commit(&consumer, &shared_for_close, &last, CommitMode::Sync, &name);
                consumer.unsubscribe();
                drop(consumer);
            })
        };
        match time::timeout(CLOSE_WAIT, closing).await {
            Ok(_) => tracing::info!(source = %name, "left the consumer group"),
            Err(_) => {
                tracing::warn!(source = %name, "the broker did not confirm the last commit and the leave within 30 s; the group reads again what was not committed")
            }
        }
        shared.assignment.send_replace(Vec::new());
    }

    fn commit_acknowledged(&self) {
        self.shared.passed.store(0, Ordering::Relaxed);
        let all = (self.ticks.fetch_add(1, Ordering::Relaxed) + 1) % RECOMMIT_EVERY == 0;
        let commits = self.shared.offsets().advance(all);
        commit(
            &self.consumer,
            &self.shared,
            &commits,
            CommitMode::Async,
            &self.name,
        );
    }
}

/// The longest commit period: `tokio`'s interval adds its period to the
/// clock, which overflows for `Duration::MAX`.
const LONGEST_COMMIT_PERIOD: Duration = Duration::from_secs(365 * 86_400);

fn commit_period(every: Duration) -> Duration {
    every.min(LONGEST_COMMIT_PERIOD)
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    /// Nothing is left unacknowledged.
    All,
    Aborted,
    /// The drain period passed with this many records unacknowledged.
    TimedOut(usize),
}

/// Asks `left` (which commits what is acknowledged and counts what is not)
/// on every tick until it says nothing is left, the pipeline aborts, or
/// `drain_for` passes (`Duration::MAX`: never). It always returns to the
/// caller, who commits last: a deadline that overflowed here used to
/// panic the task and skip the final commit.
async fn drain_until(
    drain_for: Duration,
    abort: &CancellationToken,
    tick: &mut tokio::time::Interval,
    mut left: impl FnMut() -> usize,
) -> Drained {
    let deadline = time::after(tokio::time::Instant::now(), drain_for);
    loop {
        let n = left();
        if n == 0 {
            return Drained::All;
        }
        tokio::select! {
            () = abort.cancelled() => return Drained::Aborted,
            () = time::sleep_until(deadline) => return Drained::TimedOut(n),
            _ = tick.tick() => {}
        }
    }
}

/// The record of `m`, and what the tracker needs of it.
fn record_of(
    topic_names: &mut HashMap<String, Arc<str>>,
    m: &BorrowedMessage<'_>,
) -> (KafkaRecord, crate::Ack, Tracked) {
    let topic = match topic_names.get(m.topic()) {
        Some(t) => t.clone(),
        None => {
            let t: Arc<str> = Arc::from(m.topic());
            topic_names.insert(m.topic().to_owned(), t.clone());
            t
        }
    };
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    let progress = Arc::new(Progress::new(Some(SourcePosition::Kafka {
        topic: topic.clone(),
        partition: m.partition(),
        offset: m.offset(),
    })));
    let record = KafkaRecord::new(Entry {
        topic: topic.clone(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
        timestamp: m.timestamp().to_millis(),
        progress: progress.clone(),
    });
    // The record's acknowledgement travels beside it (see `crate::Ack`).
    let ack = crate::Ack::of(&progress.core);
    (record, ack, (topic, m.partition(), m.offset(), progress))
}

/// A record's place for the tracker: topic, partition, offset, progress.
type Tracked = (Arc<str>, i32, i64, Arc<Progress>);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn zero_settings_are_refused_when_the_source_starts() {
        let source = || {
            KafkaSource::new("127.0.0.1:9", "group")
                .topics(["t"])
                .named("orders")
        };
        assert_eq!(source().validate(), Ok(()));
        for (source, field) in [
            (
                source().with_commit_interval(Duration::ZERO),
                "commit_interval",
            ),
            (source().with_max_unacked(0), "max_unacked"),
        ] {
            let Err(KafkaError::Invalid(err)) = source.start(&Pipeline::new()) else {
                panic!("{field}: not refused");
            };
            assert_eq!(
                (err.operator(), err.stage(), err.field()),
                (Some("KafkaSource"), Some("orders"), field)
            );
        }
    }

    /// `with_drain_timeout(Duration::MAX)` waits for the acknowledgements without a
    /// limit and then returns, so the last commit runs.
    #[tokio::test(start_paused = true)]
    async fn an_endless_drain_waits_for_every_acknowledgement_then_returns() {
        let abort = CancellationToken::new();
        let mut tick = tokio::time::interval(commit_period(Duration::MAX));
        let mut checks = 0;
        let start = tokio::time::Instant::now();
        // Three looks find a record outstanding (ticks: at once, then a
        // year apart), the fourth finds none.
        let drained = tokio::time::timeout(
            Duration::from_secs(10 * 365 * 86_400),
            drain_until(Duration::MAX, &abort, &mut tick, || {
                checks += 1;
                if checks < 4 { 1 } else { 0 }
            }),
        )
        .await
        .expect("the drain ends once nothing is left");
        assert_eq!(drained, Drained::All);
        assert_eq!(checks, 4);
        assert!(start.elapsed() >= 2 * LONGEST_COMMIT_PERIOD);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endless_drain_still_ends_on_abort_and_a_finite_one_on_time() {
        let abort = CancellationToken::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let stop = abort.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(100)).await;
            stop.cancel();
        });
        let drained = tokio::time::timeout(
            Duration::from_secs(1000),
            drain_until(Duration::MAX, &abort, &mut tick, || 5),
        )
        .await
        .unwrap();
        assert_eq!(drained, Drained::Aborted);

        let abort = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let drained = drain_until(Duration::from_secs(30), &abort, &mut tick, || 2).await;
        assert_eq!(drained, Drained::TimedOut(2));
        assert_eq!(start.elapsed(), Duration::from_secs(30));
    }
}
