//! `Batcher`: group values into `Vec`s by size, latency and weight.
//!
//! A batch is emitted when it holds `max_size` values, when `max_latency`
//! has passed since its **first** value arrived, or, with a weight function,
//! when the total weight reaches `max_weight`, whichever comes first. The
//! partial batch is flushed when the input ends and on graceful shutdown
//! (which ends the input); only an abort discards it, counted.
//!
//! Errors are not batched: each error is sent on as soon as it arrives, so
//! it overtakes the values waiting in the partial batch. Relative to other
//! errors and to batches already emitted, order is kept.
//!
//! One timer per batcher, reset for each new batch, never one per item.

use std::borrow::Cow;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::base::ack::Ack;
use crate::base::chunk::Chunk;
use crate::base::config::{ConfigError, EdgeConfig, nonzero};
use crate::base::error::StreamError;
use crate::base::telemetry::{self, Histogram};
use crate::base::time::{self, Deadline};
use crate::flow::Flow;
use crate::flow::driver::{self, Operator, Out};
use crate::flow::processor::Processor;

type WeightFn<T> = Arc<dyn Fn(&T) -> u64 + Send + Sync>;

/// Groups values into batches (`Vec<T>`) by size, latency since the batch's
/// first value, and optionally weight.
///
/// # Default
///
/// There is no default size or latency: both are required. No weight limit
/// unless [`with_weight`](Batcher::with_weight) sets one. The stage is named
/// `batcher`. Its output edge holds about as many *values* as the
/// pipeline's [`EdgeConfig`] allows items: its capacity in batches is the
/// pipeline's divided by the batch size (rounded down, at least 1) and its
/// chunk length the same quotient rounded up (256 / 100 gives 3 batches a
/// chunk, so a chunk of input values leaves in one send), so a consumer
/// that falls behind holds back upstream after a few batches, not after a
/// thousand batches of values
/// ([`with_edge`](Batcher::with_edge) sets it explicitly).
///
/// # Counters
///
/// `received` counts values and errors in, `emitted` counts values placed in
/// emitted batches, `errors_passed` the errors sent on, `aborted` the values
/// of a partial batch discarded by an abort. A weight function that panics
/// turns its value into a `panicked` error carrying it (`failed`).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::Batcher;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let batcher = Batcher::new(3, Duration::from_millis(10));
/// let batches = streamz::iter(1..=7).pipe(batcher).collect().await;
/// let batches: Vec<Vec<i32>> = batches.into_iter().map(Result::unwrap).collect();
/// assert_eq!(batches, [vec![1, 2, 3], vec![4, 5, 6], vec![7]]); // 7: flushed at the end
/// # }
/// ```
pub struct Batcher<T> {
    name: Cow<'static, str>,
    max_size: usize,
    max_latency: Duration,
    weight: Option<(u64, WeightFn<T>)>,
    edge: Option<EdgeConfig>,
}

impl<T> fmt::Debug for Batcher<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("name", &self.name)
            .field("max_size", &self.max_size)
            .field("max_latency", &self.max_latency)
            .field("max_weight", &self.weight.as_ref().map(|(w, _)| w))
            .field("edge", &self.edge)
            .finish()
    }
}

impl<T> Batcher<T> {
    /// A batcher emitting at `max_size` values or `max_latency` after a
    /// batch's first value. `Duration::MAX` means no time limit (a batch
    /// then leaves by size, weight, or at the end of the input) and
    /// `usize::MAX` no size limit; neither reserves anything up front.
    /// Zero for either is refused when the batcher is piped
    /// ([`ConfigError`], fields `max_size`, `max_latency`).
    pub fn new(max_size: usize, max_latency: Duration) -> Self {
        Batcher {
            name: Cow::Borrowed("batcher"),
            max_size,
            max_latency,
            weight: None,
            edge: None,
        }
    }

    /// Also emits a batch once the total `weight` of its values reaches
    /// `max_weight` (for example bytes). A value that would push the batch
    /// over `max_weight` closes the batch first and starts the next one, so
    /// no batch weighs more than `max_weight` unless it is a single value
    /// heavier than `max_weight` on its own, which forms a batch alone.
    /// A zero `max_weight` is refused when the batcher is piped.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::Batcher;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let by_bytes = Batcher::new(100, Duration::from_secs(1))
    ///     .with_weight(10, |s: &String| s.len() as u64);
    /// let words = ["abcd", "efgh", "ij", "klmnopqrstu", "v"].map(String::from);
    /// let batches = streamz::iter(words).pipe(by_bytes).collect().await;
    /// let sizes: Vec<usize> = batches.into_iter().map(|b| b.unwrap().len()).collect();
    /// assert_eq!(sizes, [3, 1, 1]); // 4+4+2 = 10, then 11 alone, then the rest
    /// # }
    /// ```
    pub fn with_weight<F>(mut self, max_weight: u64, weight: F) -> Self
    where
        F: Fn(&T) -> u64 + Send + Sync + 'static,
    {
        self.weight = Some((max_weight, Arc::new(weight)));
        self
    }

    crate::flow::processor::name_and_edge!("Sets the stage's output edge.");
}

impl<T: Send + 'static> Processor<T, Vec<T>> for Batcher<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.max_size, "max_size")
            .and(nonzero(self.max_latency, "max_latency"))
            .and(
                self.weight
                    .as_ref()
                    .map_or(Ok(()), |(w, _)| nonzero(*w, "max_weight")),
            )
            .and(self.edge.map_or(Ok(()), |e| e.validate()))
            .map_err(|e| e.in_stage("Batcher", &self.name))
    }

    fn process(self, input: Flow<T>) -> Flow<Vec<T>> {
        let edge = self.edge.unwrap_or_else(|| {
            let values = input.pipeline().edge();
            let size = self.max_size;
            EdgeConfig::new(
                (values.capacity() / size).max(1),
                values.max_chunk().div_ceil(size),
            )
        });
        let op = Batching {
            batch: Vec::new(),
            acks: Vec::new(),
            weight: 0,
            max_size: self.max_size,
            max_latency: self.max_latency,
            limit: self.weight,
            started: None,
            sizes: Histogram::noop(),
        };
        driver::spawn_with(input, &self.name, Some(edge), |_, counters| Batching {
            sizes: counters.labels().histogram(telemetry::BATCH_SIZE),
            ..op
        })
    }
}

/// The most values a new batch reserves room for: a huge `max_size`
/// (`usize::MAX` for "no size limit") must not reserve memory up front.
const MAX_RESERVE: usize = 4096;

struct Batching<T> {
    batch: Vec<T>,
    /// The acknowledgements of the batch's values, for input that has them.
    acks: Vec<Ack>,
    weight: u64,
    max_size: usize,
    max_latency: Duration,
    limit: Option<(u64, WeightFn<T>)>,
    /// When the current batch's first value arrived.
    started: Option<Instant>,
    /// Exported batch sizes (feature `metrics`).
    sizes: Histogram,
}

impl<T: Send + 'static> Batching<T> {
    /// Starts a new batch: its buffer (the last batch took the old one)
    /// and the time of its first value.
    #[inline]
    fn start(&mut self, now: &mut Option<Instant>) {
        // Allocated directly: `reserve` on an empty vector takes the
        // slower growth path.
        self.batch = Vec::with_capacity(self.max_size.min(MAX_RESERVE));
        self.started = Some(*now.get_or_insert_with(Instant::now));
    }

    fn push(&mut self, value: T, ack: Ack, now: &mut Option<Instant>) {
        if self.batch.is_empty() {
            self.start(now);
        }
        self.batch.push(value);
        if !ack.is_none() {
            self.acks.push(ack);
        }
    }

    fn close(&mut self, out: &mut Out<Vec<T>>) {
        if !self.batch.is_empty() {
            self.weight = 0;
            let n = self.batch.len() as u64;
            // A batch carries its values' acknowledgements.
            let ack = if self.acks.is_empty() {
                Ack::none()
            } else {
                Ack::merge_batch(self.acks.drain(..), self.batch.len())
            };
            self.sizes.record(n as f64);
            out.emit_for(std::mem::take(&mut self.batch), n, ack);
        }
    }

    /// The value's weight, or the `panicked` error carrying it.
    fn weigh(&self, value: T, stage: &str) -> Result<(T, u64), StreamError> {
        let Some((_, weigh)) = &self.limit else {
            return Ok((value, 0));
        };
        match catch_unwind(AssertUnwindSafe(|| weigh(&value))) {
            Ok(w) => Ok((value, w)),
            Err(payload) => Err(StreamError::panicked(stage, payload).with_item(value)),
        }
    }
}

impl<T: Send + 'static> Operator<T, Vec<T>> for Batching<T> {
    fn on_chunk(&mut self, chunk: Chunk<T>, out: &mut Out<Vec<T>>) {
        let mut now = None;
        if self.limit.is_none() && !chunk.has_errors() {
            // The common case: only sizes to watch, values moved in bulk.
            let mut values = chunk.values.into_iter();
            let mut acks = chunk.acks.map(Vec::into_iter);
            while values.len() > 0 {
                if self.batch.is_empty() {
                    self.start(&mut now);
                }
                let room = self.max_size - self.batch.len();
                self.batch.extend(values.by_ref().take(room));
                if let Some(acks) = &mut acks {
                    self.acks.extend(acks.by_ref().take(room));
                }
                if self.batch.len() >= self.max_size {
                    self.close(out);
                }
            }
            return;
        }
        for (item, ack) in chunk.into_acked() {
            let value = match item {
                Ok(v) => v,
                Err(e) => {
                    out.pass(e);
                    continue;
                }
            };
            let (value, w) = match self.weigh(value, out.stage()) {
                Ok(weighed) => weighed,
                Err(e) => {
                    out.fail(e.with_ack(ack));
                    continue;
                }
            };
            let max_weight = self.limit.as_ref().map_or(u64::MAX, |(max, _)| *max);
            // A value that would push the batch over the limit starts the
            // next one; a value heavier than the limit is a batch alone.
            if !self.batch.is_empty() && self.weight.saturating_add(w) > max_weight {
                self.close(out);
            }
            self.push(value, ack, &mut now);
            self.weight = self.weight.saturating_add(w);
            if self.batch.len() >= self.max_size || self.weight >= max_weight {
                self.close(out);
            }
        }
    }

    fn deadline(&self) -> Deadline {
        // Worked out when asked (once per wait), not for every batch.
        match self.started {
            Some(t) if !self.batch.is_empty() => time::after(t, self.max_latency),
            _ => None,
        }
    }

    fn on_deadline(&mut self, _now: Instant, out: &mut Out<Vec<T>>) {
        self.close(out);
    }

    fn on_end(&mut self, out: &mut Out<Vec<T>>) {
        self.close(out);
    }

    fn held(&self) -> u64 {
        self.batch.len() as u64
    }
}
