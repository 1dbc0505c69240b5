//! Metrics export through the `metrics` facade (feature `metrics`).
//!
//! Two ways in, so that the item path pays nothing:
//!
//! - The stage counters and the edges' fill are not touched on the item
//!   path: each pipeline's publisher sets their series from the counters
//!   the stages keep anyway, every second and when the pipeline is joined
//!   (`Pipeline::publish_metrics`).
//! - The operators' own series (a mapper's attempt durations, a throttle's
//!   waits, batch sizes, gate and breaker transitions, dead-letter writes)
//!   are events, recorded where they happen, per call, batch, wait or
//!   transition.
//!
//! With no recorder installed a handle is a no-op; without the feature the
//! handles below are empty types whose methods compile to nothing, so call
//! sites need no `cfg`. docs/observability.md lists every series.

#![cfg_attr(not(feature = "metrics"), allow(dead_code))]

use std::sync::Arc;

#[cfg(feature = "metrics")]
pub(crate) use metrics::{Counter, Gauge, Histogram};

#[cfg(not(feature = "metrics"))]
pub(crate) use off::{Counter, Gauge, Histogram};

/// The labels every stage series carries: the pipeline's and the stage's
/// names.
#[derive(Debug, Clone)]
pub(crate) struct StageLabels {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pipeline: Arc<str>,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    stage: Arc<str>,
}

/// The pipeline label of a pipeline without a name.
pub(crate) const UNNAMED: &str = "unnamed";

impl StageLabels {
    pub(crate) fn new(pipeline: Option<&Arc<str>>, stage: &Arc<str>) -> Self {
        StageLabels {
            pipeline: pipeline.cloned().unwrap_or_else(|| Arc::from(UNNAMED)),
            stage: stage.clone(),
        }
    }

    /// The pipeline's name (`unnamed` without one).
    pub(crate) fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// The stage's name.
    pub(crate) fn stage(&self) -> &str {
        &self.stage
    }

    /// Sets the gauge `name` of this stage with labels known only now
    /// (a Kafka partition's), registering it on the way.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn set_gauge(
        &self,
        name: &'static str,
        extra: &[(&'static str, String)],
        value: f64,
    ) {
        self.gauge_owned(name, extra).set(value);
    }

    /// The stage's labels and `extra` ones whose values are made at run
    /// time.
    #[cfg(feature = "metrics")]
    fn labels_owned(&self, extra: &[(&'static str, String)]) -> Vec<metrics::Label> {
        let mut labels = self.labels(&[]);
        labels.extend(
            extra
                .iter()
                .map(|(k, v)| metrics::Label::new(*k, v.clone())),
        );
        labels
    }

    #[cfg(feature = "metrics")]
    fn labels(&self, extra: &[(&'static str, &'static str)]) -> Vec<metrics::Label> {
        let mut labels = vec![
            metrics::Label::new("pipeline", self.pipeline.to_string()),
            metrics::Label::new("stage", self.stage.to_string()),
        ];
        labels.extend(extra.iter().map(|&(k, v)| metrics::Label::new(k, v)));
        labels
    }

    /// The counter `name` of this stage, with `extra` labels.
    pub(crate) fn counter(
        &self,
        name: &'static str,
        extra: &[(&'static str, &'static str)],
    ) -> Counter {
        #[cfg(feature = "metrics")]
        {
            describe();
            metrics::counter!(name, self.labels(extra))
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (name, extra);
            Counter
        }
    }

    /// The counter `name` of this stage, with `extra` labels whose values
    /// are made at run time (a broadcast output's number).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn counter_owned(
        &self,
        name: &'static str,
        extra: &[(&'static str, String)],
    ) -> Counter {
        #[cfg(feature = "metrics")]
        {
            describe();
            metrics::counter!(name, self.labels_owned(extra))
        }
        #[cfg(not(feature = "metrics"))]
        Counter
    }

    /// The gauge `name` of this stage, with `extra` labels whose values
    /// are made at run time.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn gauge_owned(
        &self,
        name: &'static str,
        extra: &[(&'static str, String)],
    ) -> Gauge {
        #[cfg(feature = "metrics")]
        {
            describe();
            metrics::gauge!(name, self.labels_owned(extra))
        }
        #[cfg(not(feature = "metrics"))]
        Gauge
    }

    /// The gauge `name` of this stage, with `extra` labels.
    pub(crate) fn gauge(
        &self,
        name: &'static str,
        extra: &[(&'static str, &'static str)],
    ) -> Gauge {
        #[cfg(feature = "metrics")]
        {
            describe();
            metrics::gauge!(name, self.labels(extra))
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (name, extra);
            Gauge
        }
    }

    /// The histogram `name` of this stage.
    pub(crate) fn histogram(&self, name: &'static str) -> Histogram {
        #[cfg(feature = "metrics")]
        {
            describe();
            metrics::histogram!(name, self.labels(&[]))
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = name;
            Histogram
        }
    }
}

/// The counter `name` with `labels` that are not a stage's (a dead-letter
/// file's path).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn counter(name: &'static str, labels: &[(&'static str, String)]) -> Counter {
    #[cfg(feature = "metrics")]
    {
        describe();
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.clone()))
            .collect();
        metrics::counter!(name, labels)
    }
    #[cfg(not(feature = "metrics"))]
    Counter
}

/// The gauge `name` with `labels` that are not a stage's (a breaker's
/// name).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
#[cfg_attr(not(feature = "circuit-breaker"), allow(dead_code))]
pub(crate) fn gauge(name: &'static str, labels: &[(&'static str, String)]) -> Gauge {
    #[cfg(feature = "metrics")]
    {
        describe();
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.clone()))
            .collect();
        metrics::gauge!(name, labels)
    }
    #[cfg(not(feature = "metrics"))]
    Gauge
}

/// The item counters of a stage, by outcome.
#[derive(Debug)]
pub(crate) struct ItemSeries {
    pub(crate) received: Counter,
    pub(crate) emitted: Counter,
    pub(crate) failed: Counter,
    pub(crate) errors_passed: Counter,
    pub(crate) dropped: Counter,
    pub(crate) aborted: Counter,
    pub(crate) undelivered: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) retries: Counter,
    pub(crate) timeouts: Counter,
    /// The counts last published, in the order of `publish`.
    published: std::sync::Mutex<[u64; 10]>,
    /// The stage name the series carry.
    name: Arc<str>,
}

impl ItemSeries {
    /// Adds to every series what the stage counted since the last call.
    /// Deltas, not absolute values: pipelines that share names (one built
    /// again after a restart, say) add up in one series, which only grows.
    pub(crate) fn publish(&self, m: &crate::base::counters::StageMetrics) {
        let now = [
            m.received,
            m.emitted,
            m.failed,
            m.errors_passed,
            m.dropped,
            m.aborted,
            m.undelivered,
            m.dead_lettered,
            m.retries,
            m.timeouts,
        ];
        let counters = [
            &self.received,
            &self.emitted,
            &self.failed,
            &self.errors_passed,
            &self.dropped,
            &self.aborted,
            &self.undelivered,
            &self.dead_lettered,
            &self.retries,
            &self.timeouts,
        ];
        // Held while adding, so two publications (the thread's and a
        // join's) never add the same counts twice.
        let mut last = self.published.lock().unwrap_or_else(|p| p.into_inner());
        for ((counter, now), last) in counters.into_iter().zip(now).zip(last.iter_mut()) {
            if now > *last {
                counter.increment(now - *last);
                *last = now;
            }
        }
    }

    /// The stage name the series carry.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub(crate) fn new(labels: &StageLabels, name: Arc<str>) -> Self {
        let items = |outcome| labels.counter(ITEMS, &[("outcome", outcome)]);
        ItemSeries {
            received: items("received"),
            emitted: items("emitted"),
            failed: items("failed"),
            errors_passed: items("errors_passed"),
            dropped: items("dropped"),
            aborted: items("aborted"),
            undelivered: items("undelivered"),
            dead_lettered: items("dead_lettered"),
            retries: labels.counter(RETRIES, &[]),
            timeouts: labels.counter(TIMEOUTS, &[]),
            published: std::sync::Mutex::new([0; 10]),
            name,
        }
    }
}

/// An edge's series: what its channel holds now, and at most.
#[derive(Debug, Clone)]
pub(crate) struct EdgeSeries {
    held: Gauge,
    capacity: Gauge,
}

impl EdgeSeries {
    /// The series of the edge from `from` to the stage named `to`.
    pub(crate) fn new(from: &StageLabels, to: &str) -> Self {
        #[cfg(feature = "metrics")]
        let gauge = |name| {
            describe();
            let mut labels = from.labels(&[]);
            // `stage` is the producer; `to` the stage reading it.
            labels.push(metrics::Label::new("to", to.to_owned()));
            metrics::gauge!(name, labels)
        };
        #[cfg(not(feature = "metrics"))]
        let gauge = |_| {
            let _ = (from, to);
            Gauge
        };
        EdgeSeries {
            held: gauge(EDGE_ITEMS),
            capacity: gauge(EDGE_CAPACITY),
        }
    }

    pub(crate) fn publish(&self, held: usize, capacity: usize) {
        self.held.set(held as f64);
        self.capacity.set(capacity as f64);
    }
}

/// Measures a call for a histogram (feature `metrics`; nothing without).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stopwatch {
    #[cfg(feature = "metrics")]
    start: Option<tokio::time::Instant>,
}

impl Stopwatch {
    #[inline]
    pub(crate) fn start() -> Self {
        Stopwatch {
            #[cfg(feature = "metrics")]
            start: Some(tokio::time::Instant::now()),
        }
    }

    /// Starts measuring unless already measuring.
    #[inline]
    pub(crate) fn start_if_idle(&mut self) {
        #[cfg(feature = "metrics")]
        if self.start.is_none() {
            *self = Stopwatch::start();
        }
    }

    /// Records the time since `start` in `histogram`, once.
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn record(&mut self, histogram: &Histogram) {
        #[cfg(feature = "metrics")]
        if let Some(start) = self.start.take() {
            histogram.record(start.elapsed().as_secs_f64());
        }
    }
}

/// A health gate's series.
#[derive(Debug, Clone)]
pub(crate) struct GateSeries {
    pub(crate) open: Gauge,
    pub(crate) closed: Histogram,
    pub(crate) healthy: Counter,
    pub(crate) unhealthy: Counter,
}

impl GateSeries {
    pub(crate) fn new(labels: &StageLabels) -> Self {
        GateSeries {
            open: labels.gauge(GATE_OPEN, &[]),
            closed: labels.histogram(GATE_CLOSED_SECONDS),
            healthy: labels.counter(GATE_CHECKS, &[("result", "healthy")]),
            unhealthy: labels.counter(GATE_CHECKS, &[("result", "unhealthy")]),
        }
    }
}

/// An [`AsyncMapper`](crate::AsyncMapper)'s series. The in-flight gauge
/// falls to 0 when the mapper ends (also by an abort).
#[derive(Debug)]
pub(crate) struct MapperSeries {
    pub(crate) in_flight: Gauge,
    pub(crate) limit: Gauge,
    pub(crate) calls: Histogram,
}

impl Drop for MapperSeries {
    fn drop(&mut self) {
        self.in_flight.set(0.0);
    }
}

impl Default for MapperSeries {
    /// Reports nowhere (until the stage is registered).
    fn default() -> Self {
        MapperSeries {
            in_flight: Gauge::noop(),
            limit: Gauge::noop(),
            calls: Histogram::noop(),
        }
    }
}

impl MapperSeries {
    pub(crate) fn new(labels: &StageLabels) -> Self {
        MapperSeries {
            in_flight: labels.gauge(MAPPER_IN_FLIGHT, &[]),
            limit: labels.gauge(MAPPER_LIMIT, &[]),
            calls: labels.histogram(MAPPER_CALL_SECONDS),
        }
    }
}

// The series' names, described once for the recorder (Prometheus HELP).
pub(crate) const ITEMS: &str = "streamz_stage_items_total";
pub(crate) const RETRIES: &str = "streamz_stage_retries_total";
pub(crate) const TIMEOUTS: &str = "streamz_stage_timeouts_total";
pub(crate) const EDGE_ITEMS: &str = "streamz_edge_items";
pub(crate) const EDGE_CAPACITY: &str = "streamz_edge_capacity_items";
pub(crate) const MAPPER_IN_FLIGHT: &str = "streamz_async_mapper_in_flight";
pub(crate) const MAPPER_LIMIT: &str = "streamz_async_mapper_concurrency_limit";
pub(crate) const MAPPER_CALL_SECONDS: &str = "streamz_async_mapper_call_duration_seconds";
pub(crate) const THROTTLE_DELAY_SECONDS: &str = "streamz_throttle_delay_seconds";
pub(crate) const BROADCAST_DROPPED: &str = "streamz_broadcast_output_dropped_total";
pub(crate) const BROADCAST_DETACHED: &str = "streamz_broadcast_output_detached";
pub(crate) const BATCH_SIZE: &str = "streamz_batcher_batch_size_items";
pub(crate) const GATE_OPEN: &str = "streamz_gate_open";
pub(crate) const GATE_CLOSED_SECONDS: &str = "streamz_gate_closed_duration_seconds";
pub(crate) const GATE_CHECKS: &str = "streamz_gate_checks_total";
pub(crate) const DLQ_RECORDS: &str = "streamz_dlq_records_total";
pub(crate) const DLQ_FSYNCS: &str = "streamz_dlq_fsyncs_total";
pub(crate) const DLQ_WRITE_FAILURES: &str = "streamz_dlq_write_failures_total";
pub(crate) const BREAKER_STATE: &str = "streamz_breaker_state";
pub(crate) const BREAKER_CALLS: &str = "streamz_breaker_calls_total";
pub(crate) const BREAKER_TRANSITIONS: &str = "streamz_breaker_transitions_total";
pub(crate) const KAFKA_COMMITS: &str = "streamz_kafka_commits_total";
pub(crate) const KAFKA_LAG: &str = "streamz_kafka_consumer_lag_records";

/// What a series is, for its description.
#[cfg(feature = "metrics")]
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every series: its name, kind, unit and help text (Prometheus HELP).
#[cfg(feature = "metrics")]
const DESCRIPTIONS: &[(&str, Kind, metrics::Unit, &str)] = {
    use Kind::{Counter, Gauge, Histogram};
    use metrics::Unit::{Count, Seconds};
    &[
        (
            ITEMS,
            Counter,
            Count,
            "Items a stage took or produced, by outcome",
        ),
        (
            RETRIES,
            Counter,
            Count,
            "Attempts made again after a retryable failure",
        ),
        (TIMEOUTS, Counter, Count, "Attempts that ran out of time"),
        (
            EDGE_ITEMS,
            Gauge,
            Count,
            "Items in the channel from a stage to the next",
        ),
        (
            EDGE_CAPACITY,
            Gauge,
            Count,
            "Items the channel from a stage to the next holds at most",
        ),
        (
            MAPPER_IN_FLIGHT,
            Gauge,
            Count,
            "Items an AsyncMapper is working on",
        ),
        (
            MAPPER_LIMIT,
            Gauge,
            Count,
            "Items an AsyncMapper may hold at once: its fixed or adaptive concurrency limit",
        ),
        (
            MAPPER_CALL_SECONDS,
            Histogram,
            Seconds,
            "Duration of each AsyncMapper attempt",
        ),
        (
            THROTTLE_DELAY_SECONDS,
            Histogram,
            Seconds,
            "How long a Throttle held an item back",
        ),
        (
            BROADCAST_DROPPED,
            Counter,
            Count,
            "Values a broadcast output missed by its policy (dropped, or sent after it was detached)",
        ),
        (
            BROADCAST_DETACHED,
            Gauge,
            Count,
            "Whether a broadcast output was detached for falling behind (1) or not (0)",
        ),
        (
            BATCH_SIZE,
            Histogram,
            Count,
            "Items per batch a Batcher emitted",
        ),
        (
            GATE_OPEN,
            Gauge,
            Count,
            "1 while a health gate is open, 0 while closed",
        ),
        (
            GATE_CLOSED_SECONDS,
            Histogram,
            Seconds,
            "How long each closed period of a health gate lasted, recorded when it opens",
        ),
        (
            GATE_CHECKS,
            Counter,
            Count,
            "Health checks a gate made, by result",
        ),
        (
            DLQ_RECORDS,
            Counter,
            Count,
            "Dead letters a sink answered for, by result (written, or refused and passed downstream)",
        ),
        (
            DLQ_FSYNCS,
            Counter,
            Count,
            "fsyncs of a dead-letter file, by result",
        ),
        (
            DLQ_WRITE_FAILURES,
            Counter,
            Count,
            "Failed appends to a dead-letter file",
        ),
        (
            BREAKER_STATE,
            Gauge,
            Count,
            "1 for a circuit breaker's current state, 0 for the others",
        ),
        (
            BREAKER_CALLS,
            Counter,
            Count,
            "Calls through a circuit breaker, by outcome",
        ),
        (
            BREAKER_TRANSITIONS,
            Counter,
            Count,
            "Circuit breaker state changes, by the state entered",
        ),
        (
            KAFKA_COMMITS,
            Counter,
            Count,
            "Offset commits a Kafka source made",
        ),
        (
            KAFKA_LAG,
            Gauge,
            Count,
            "Records between a partition's committed offset and its end",
        ),
    ]
};

/// Describes every series to the recorder. Done with every registration
/// (a stage's start, not the item path), so a recorder installed after
/// the first stage still gets the descriptions.
#[cfg(feature = "metrics")]
fn describe() {
    for &(name, kind, unit, help) in DESCRIPTIONS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, unit, help),
            Kind::Gauge => metrics::describe_gauge!(name, unit, help),
            Kind::Histogram => metrics::describe_histogram!(name, unit, help),
        }
    }
}

/// Handles that do nothing: the types without the `metrics` feature.
#[cfg(not(feature = "metrics"))]
mod off {
    #[derive(Debug, Clone, Default)]
    pub(crate) struct Counter;

    impl Counter {
        #[inline(always)]
        pub(crate) fn noop() -> Self {
            Counter
        }
        #[inline(always)]
        pub(crate) fn increment(&self, _: u64) {}
    }

    #[derive(Debug, Clone, Default)]
    pub(crate) struct Gauge;

    impl Gauge {
        #[inline(always)]
        pub(crate) fn noop() -> Self {
            Gauge
        }
        #[inline(always)]
        pub(crate) fn set(&self, _: f64) {}
        #[inline(always)]
        pub(crate) fn increment(&self, _: f64) {}
        #[inline(always)]
        pub(crate) fn decrement(&self, _: f64) {}
    }

    #[derive(Debug, Clone, Default)]
    pub(crate) struct Histogram;

    impl Histogram {
        #[inline(always)]
        pub(crate) fn noop() -> Self {
            Histogram
        }
        #[inline(always)]
        pub(crate) fn record(&self, _: f64) {}
    }
}
