//! Per-stage counters, readable while the pipeline runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::base::telemetry;
use crate::flow::topology::StageKind;

/// A snapshot of one stage's counters.
///
/// The conservation law of a one-in-one-out stage (map, filter, tap) holds
/// at all times, including after an abort:
///
/// ```text
/// received = emitted + failed + errors_passed + dropped + aborted
/// ```
///
/// A [`DeadLetterQueue`](crate::DeadLetterQueue) adds its sink's records:
///
/// ```text
/// received = emitted + dead_lettered + failed + dropped + aborted
/// ```
///
/// where `received` counts both values and upstream errors, and of what the
/// stage produced, `emitted + failed + errors_passed - undelivered` reached
/// the next stage. Sources count the values they produce as `emitted` and
/// the error items their stream or producer gives as `errors_passed`. A
/// stage that emits several items per input (a custom step) may emit more
/// than it receives.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let flow = streamz::iter(1..=10).filter(|x: &i32| x % 2 == 0);
/// let pipeline = flow.pipeline().clone();
/// let out = flow.collect().await;
/// assert_eq!(out.len(), 5);
///
/// let filter = pipeline.metrics().into_iter().find(|m| m.name == "filter").unwrap();
/// assert_eq!((filter.received, filter.emitted, filter.dropped), (10, 5, 5));
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StageMetrics {
    /// The stage's name.
    pub name: String,
    /// Items taken from the input: values and errors.
    pub received: u64,
    /// Values sent on (for a source: values produced).
    pub emitted: u64,
    /// Error items this stage created (user errors and panics).
    pub failed: u64,
    /// Errors from upstream that this stage passed on unchanged (for a
    /// source: the error items its stream or producer gave).
    pub errors_passed: u64,
    /// Items removed on purpose and counted (a filter's rejects).
    pub dropped: u64,
    /// Items taken off the input and discarded unprocessed because the stage
    /// stopped early (an abort, or its output went away); also counted in
    /// `received`.
    pub aborted: u64,
    /// Outputs the stage produced (counted in `emitted`, `failed` or
    /// `errors_passed`) that it could not deliver because it stopped early.
    pub undelivered: u64,
    /// Attempts made again after a retryable failure (an
    /// [`AsyncMapper`](crate::AsyncMapper) with a retry policy); a retry
    /// cancelled during its backoff (shutdown, abort) is not one.
    pub retries: u64,
    /// Attempts that ran out of time (an
    /// [`AsyncMapper`](crate::AsyncMapper) timeout or retry deadline).
    pub timeouts: u64,
    /// Error items a [`DeadLetterQueue`](crate::DeadLetterQueue) handed to
    /// its sink and the sink confirmed.
    pub dead_lettered: u64,
}

/// One line per stage for logs and terminals: the name, `received` and
/// `emitted`, then every other counter that is not zero.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let flow = streamz::iter(1..=10).filter(|x: &i32| x % 2 == 0);
/// let pipeline = flow.pipeline().clone();
/// flow.collect().await;
/// let filter = pipeline.stage_metrics("filter").unwrap();
/// assert_eq!(filter.to_string(), "filter: received 10, emitted 5, dropped 5");
/// # }
/// ```
impl std::fmt::Display for StageMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: received {}, emitted {}",
            self.name, self.received, self.emitted
        )?;
        for (label, n) in self.others_not_zero() {
            write!(f, ", {label} {n}")?;
        }
        Ok(())
    }
}

impl StageMetrics {
    /// The counters other than `received` and `emitted` that are not zero,
    /// with their names for people (for `Display` and the topology's
    /// pictures).
    pub(crate) fn others_not_zero(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("failed", self.failed),
            ("errors passed", self.errors_passed),
            ("dropped", self.dropped),
            ("aborted", self.aborted),
            ("undelivered", self.undelivered),
            ("retries", self.retries),
            ("timeouts", self.timeouts),
            ("dead-lettered", self.dead_lettered),
        ]
        .into_iter()
        .filter(|&(_, n)| n != 0)
    }
}

/// The live counters of one stage; cheap to clone, shared with the stage.
#[derive(Debug, Clone)]
pub(crate) struct Counters {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    name: Arc<str>,
    /// The name given later by `Flow::named`, once, before the stage runs.
    renamed: std::sync::OnceLock<Arc<str>>,
    /// How the stage runs, once known (a fused step until marked).
    kind: std::sync::OnceLock<StageKind>,
    /// The pipeline's name (a label of the exported series).
    pipeline: Option<Arc<str>>,
    /// The exported series, taken at the first publication after the stage
    /// counted something (see `publish`).
    #[cfg(feature = "metrics")]
    series: std::sync::Mutex<Option<telemetry::ItemSeries>>,
    received: AtomicU64,
    emitted: AtomicU64,
    failed: AtomicU64,
    errors_passed: AtomicU64,
    dropped: AtomicU64,
    aborted: AtomicU64,
    undelivered: AtomicU64,
    retries: AtomicU64,
    timeouts: AtomicU64,
    dead_lettered: AtomicU64,
}

impl Counters {
    pub(crate) fn new(name: Arc<str>, pipeline: Option<Arc<str>>) -> Self {
        Counters {
            inner: Arc::new(Shared {
                name,
                renamed: std::sync::OnceLock::new(),
                kind: std::sync::OnceLock::new(),
                pipeline,
                #[cfg(feature = "metrics")]
                series: std::sync::Mutex::new(None),
                received: AtomicU64::new(0),
                emitted: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                errors_passed: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                aborted: AtomicU64::new(0),
                undelivered: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                timeouts: AtomicU64::new(0),
                dead_lettered: AtomicU64::new(0),
            }),
        }
    }

    /// Gives the stage its final name; false if it already had one.
    pub(crate) fn rename(&self, name: Arc<str>) -> bool {
        self.inner.renamed.set(name).is_ok()
    }

    /// Records how the stage runs (once: a fused step given a task of its
    /// own by `async_boundary` is marked when the task starts).
    pub(crate) fn mark(&self, kind: StageKind) {
        let _ = self.inner.kind.set(kind);
    }

    pub(crate) fn kind(&self) -> StageKind {
        self.inner.kind.get().copied().unwrap_or(StageKind::Fused)
    }

    /// The labels of the stage's exported series.
    pub(crate) fn labels(&self) -> telemetry::StageLabels {
        telemetry::StageLabels::new(self.inner.pipeline.as_ref(), self.name())
    }

    /// Adds to the stage's exported series what it counted since the last
    /// call (feature `metrics`); the pipeline's publisher calls it, never
    /// the item path. A stage that has counted nothing yet is skipped, so
    /// its series are taken once it runs, under its final name; a stage
    /// renamed later (a merge making names unique) gets new series holding
    /// all its counts. Returns whether the stage has series.
    #[cfg(feature = "metrics")]
    pub(crate) fn publish(&self) -> bool {
        let snapshot = self.snapshot();
        let mut series = self.inner.series.lock().unwrap_or_else(|p| p.into_inner());
        let name = self.name();
        if series.as_ref().is_none_or(|s| !Arc::ptr_eq(s.name(), name)) {
            let counted = snapshot.received != 0
                || snapshot.emitted != 0
                || snapshot.others_not_zero().next().is_some();
            if series.is_none() && !counted {
                return false;
            }
            *series = Some(telemetry::ItemSeries::new(&self.labels(), name.clone()));
        }
        if let Some(series) = series.as_ref() {
            series.publish(&snapshot);
        }
        true
    }

    pub(crate) fn same(&self, other: &Counters) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub(crate) fn name(&self) -> &Arc<str> {
        self.inner.renamed.get().unwrap_or(&self.inner.name)
    }

    /// Adds a batch of local counts: one atomic add per field per chunk,
    /// never per item.
    pub(crate) fn add(&self, local: &Local) {
        let s = &self.inner;
        for (counter, n) in [
            (&s.received, local.received),
            (&s.emitted, local.emitted),
            (&s.failed, local.failed),
            (&s.errors_passed, local.errors_passed),
            (&s.dropped, local.dropped),
            (&s.retries, local.retries),
            (&s.timeouts, local.timeouts),
        ] {
            if n != 0 {
                counter.fetch_add(n, Relaxed);
            }
        }
    }

    /// Records the dead-letter sink confirmed.
    pub(crate) fn add_dead_lettered(&self, n: u64) {
        if n != 0 {
            self.inner.dead_lettered.fetch_add(n, Relaxed);
        }
    }

    /// Records what a source produced: its values as `emitted`, the error
    /// items its stream or producer gave as `errors_passed`.
    pub(crate) fn add_produced<T>(&self, chunk: &crate::base::chunk::Chunk<T>) {
        self.add_emitted(chunk.values.len() as u64);
        let errors = chunk.errors.len() as u64;
        if errors != 0 {
            self.inner.errors_passed.fetch_add(errors, Relaxed);
        }
    }

    pub(crate) fn add_emitted(&self, n: u64) {
        self.inner.emitted.fetch_add(n, Relaxed);
    }

    /// Items received but discarded unprocessed (counted as both).
    pub(crate) fn add_drained(&self, n: u64) {
        if n != 0 {
            self.inner.received.fetch_add(n, Relaxed);
            self.inner.aborted.fetch_add(n, Relaxed);
        }
    }

    /// Items already received (and counted) that are discarded unprocessed.
    pub(crate) fn add_aborted(&self, n: u64) {
        if n != 0 {
            self.inner.aborted.fetch_add(n, Relaxed);
        }
    }

    /// Outputs produced and counted that could not be delivered.
    pub(crate) fn add_undelivered(&self, n: u64) {
        if n != 0 {
            self.inner.undelivered.fetch_add(n, Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> StageMetrics {
        let s = &self.inner;
        StageMetrics {
            name: self.name().to_string(),
            received: s.received.load(Relaxed),
            emitted: s.emitted.load(Relaxed),
            failed: s.failed.load(Relaxed),
            errors_passed: s.errors_passed.load(Relaxed),
            dropped: s.dropped.load(Relaxed),
            aborted: s.aborted.load(Relaxed),
            undelivered: s.undelivered.load(Relaxed),
            retries: s.retries.load(Relaxed),
            timeouts: s.timeouts.load(Relaxed),
            dead_lettered: s.dead_lettered.load(Relaxed),
        }
    }
}

/// Counts gathered while processing one chunk, added to [`Counters`] once.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Local {
    pub(crate) received: u64,
    pub(crate) emitted: u64,
    pub(crate) failed: u64,
    pub(crate) errors_passed: u64,
    pub(crate) dropped: u64,
    pub(crate) retries: u64,
    pub(crate) timeouts: u64,
}
