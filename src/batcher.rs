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
use std::future::{Future, poll_fn};
use std::num::NonZeroUsize;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::channel::ChunkTx;
use crate::chunk::Chunk;
use crate::config::{ConfigError, EdgeConfig};
use crate::counters::{Counters, Local};
use crate::error::StreamError;
use crate::flow::Flow;
use crate::processor::Processor;
use crate::source::BoxSource;
use crate::stage::{send_or_stop, spawn_operator};

type WeightFn<T> = Arc<dyn Fn(&T) -> u64 + Send + Sync>;

/// Groups values into batches (`Vec<T>`) by size, latency since the batch's
/// first value, and optionally weight.
///
/// # Default
///
/// There is no default size or latency: both are required. No weight limit
/// unless [`with_weight`](Batcher::with_weight) sets one. The stage is named
/// `batcher`. Its output edge holds about as many *values* as the
/// pipeline's [`EdgeConfig`] allows items: its capacity and chunk length
/// in batches are the pipeline's divided by the batch size (at least 1),
/// so a consumer that falls behind holds back upstream after a few
/// batches, not after a thousand batches of values
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
/// let batcher = Batcher::try_new(3, Duration::from_millis(10)).unwrap();
/// let batches = streamz::iter(1..=7).pipe(batcher).collect().await;
/// let batches: Vec<Vec<i32>> = batches.into_iter().map(Result::unwrap).collect();
/// assert_eq!(batches, [vec![1, 2, 3], vec![4, 5, 6], vec![7]]); // 7: flushed at the end
/// # }
/// ```
pub struct Batcher<T> {
    name: Cow<'static, str>,
    max_size: NonZeroUsize,
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
    /// batch's first value.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] if `max_size` is zero or `max_latency` is zero.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::{Batcher, ConfigError};
    ///
    /// let err = Batcher::<u8>::try_new(0, Duration::from_secs(1)).unwrap_err();
    /// assert_eq!(err, ConfigError::Zero { field: "max_size" });
    /// ```
    pub fn try_new(max_size: usize, max_latency: Duration) -> Result<Self, ConfigError> {
        let max_size =
            NonZeroUsize::new(max_size).ok_or(ConfigError::Zero { field: "max_size" })?;
        if max_latency.is_zero() {
            return Err(ConfigError::Zero {
                field: "max_latency",
            });
        }
        Ok(Batcher {
            name: Cow::Borrowed("batcher"),
            max_size,
            max_latency,
            weight: None,
            edge: None,
        })
    }

    /// Also emits a batch once the total `weight` of its values reaches
    /// `max_weight` (for example bytes). A single value heavier than
    /// `max_weight` forms a batch of its own.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] if `max_weight` is zero.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::Batcher;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let by_bytes = Batcher::try_new(100, Duration::from_secs(1))
    ///     .unwrap()
    ///     .with_weight(10, |s: &String| s.len() as u64)
    ///     .unwrap();
    /// let words = ["abcd", "efgh", "ij", "klmnopqrstu", "v"].map(String::from);
    /// let batches = streamz::iter(words).pipe(by_bytes).collect().await;
    /// let sizes: Vec<usize> = batches.into_iter().map(|b| b.unwrap().len()).collect();
    /// assert_eq!(sizes, [3, 1, 1]); // 4+4+2 = 10, then 11 alone, then the rest
    /// # }
    /// ```
    pub fn with_weight<F>(mut self, max_weight: u64, weight: F) -> Result<Self, ConfigError>
    where
        F: Fn(&T) -> u64 + Send + Sync + 'static,
    {
        if max_weight == 0 {
            return Err(ConfigError::Zero {
                field: "max_weight",
            });
        }
        self.weight = Some((max_weight, Arc::new(weight)));
        Ok(self)
    }

    /// Names the stage (for counters, spans and errors).
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the stage's output edge.
    pub fn with_edge(mut self, edge: EdgeConfig) -> Self {
        self.edge = Some(edge);
        self
    }
}

impl<T: Send + 'static> Processor<T, Vec<T>> for Batcher<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn process(self, input: Flow<T>) -> Flow<Vec<T>> {
        let edge = self.edge.unwrap_or_else(|| {
            let values = input.pipeline().edge();
            let size = self.max_size.get();
            EdgeConfig::try_new(
                (values.capacity() / size).max(1),
                (values.max_chunk() / size).max(1),
            )
            .expect("both are at least 1")
        });
        spawn_operator(input, &self.name, Some(edge), |io| {
            let state = State {
                batch: Vec::with_capacity(self.max_size.get()),
                weight: 0,
                max_size: self.max_size.get(),
                max_latency: self.max_latency,
                limit: self.weight,
                counters: io.counters,
            };
            run(io.src, io.tx, io.abort, state)
        })
    }
}

struct State<T> {
    batch: Vec<T>,
    weight: u64,
    max_size: usize,
    max_latency: Duration,
    limit: Option<(u64, WeightFn<T>)>,
    counters: Counters,
}

impl<T: Send + 'static> State<T> {
    /// Adds a chunk's items to the batch; returns what is ready to send and
    /// whether a new batch was started (the timer must be armed).
    fn absorb(&mut self, chunk: Chunk<T>, out: &mut Chunk<Vec<T>>) -> bool {
        if self.limit.is_none() && !chunk.has_errors() {
            return self.absorb_values(chunk.values, out);
        }
        let mut local = Local {
            received: chunk.len() as u64,
            ..Local::default()
        };
        let mut started = false;
        for item in chunk {
            let value = match item {
                Ok(v) => v,
                Err(e) => {
                    local.errors_passed += 1;
                    out.push_error(e);
                    continue;
                }
            };
            let w = match &self.limit {
                None => 0,
                Some((_, weigh)) => match catch_unwind(AssertUnwindSafe(|| weigh(&value))) {
                    Ok(w) => w,
                    Err(payload) => {
                        local.failed += 1;
                        let err =
                            StreamError::panicked(self.counters.name(), payload).with_item(value);
                        out.push_error(err);
                        continue;
                    }
                },
            };
            started |= self.batch.is_empty();
            self.batch.push(value);
            self.weight = self.weight.saturating_add(w);
            let heavy = self
                .limit
                .as_ref()
                .is_some_and(|(max, _)| self.weight >= *max);
            if self.batch.len() >= self.max_size || heavy {
                local.emitted += self.batch.len() as u64;
                out.values.push(self.take());
            }
        }
        self.counters.add(&local);
        // A batch started in this chunk and already emitted needs no timer.
        started && !self.batch.is_empty()
    }

    /// The common case (no errors, no weight): move values in runs that
    /// fill the batch, without looking at them one by one.
    fn absorb_values(&mut self, values: Vec<T>, out: &mut Chunk<Vec<T>>) -> bool {
        let received = values.len() as u64;
        let mut started = false;
        let mut emitted = 0;
        let mut values = values.into_iter();
        while values.len() > 0 {
            started |= self.batch.is_empty();
            let room = self.max_size - self.batch.len();
            self.batch.extend(values.by_ref().take(room));
            if self.batch.len() == self.max_size {
                emitted += self.max_size as u64;
                out.values.push(self.take());
            }
        }
        self.counters.add(&Local {
            received,
            emitted,
            ..Local::default()
        });
        started && !self.batch.is_empty()
    }

    fn take(&mut self) -> Vec<T> {
        self.weight = 0;
        std::mem::replace(&mut self.batch, Vec::with_capacity(self.max_size))
    }

    /// The partial batch as a chunk (for a deadline or the end of input).
    fn flush(&mut self) -> Chunk<Vec<T>> {
        if self.batch.is_empty() {
            return Chunk::default();
        }
        self.counters.add_emitted(self.batch.len() as u64);
        Chunk::from_values(vec![self.take()])
    }
}

enum Event<T> {
    Deadline,
    Input(Option<Chunk<T>>),
    Stop,
}

async fn run<T: Send + 'static>(
    mut src: BoxSource<T>,
    tx: ChunkTx<Vec<T>>,
    abort: CancellationToken,
    mut state: State<T>,
) {
    let mut aborted = pin!(abort.cancelled());
    let mut closed = pin!(tx.closed());
    // The one timer, reset for each batch; `armed` while a batch waits.
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    let mut armed = false;
    loop {
        let event = poll_fn(|cx: &mut Context<'_>| {
            if armed && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Deadline);
            }
            if let Poll::Ready(chunk) = src.poll_chunk(cx) {
                return Poll::Ready(Event::Input(chunk));
            }
            if aborted.as_mut().poll(cx).is_ready() || closed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Stop);
            }
            Poll::Pending
        })
        .await;
        // An abort wins over whatever else became ready at the same time
        // (it also ends the sources, which would otherwise flush).
        if abort.is_cancelled() {
            if let Event::Input(Some(chunk)) = &event {
                state.counters.add_drained(chunk.len() as u64);
            }
            state.counters.add_aborted(state.batch.len() as u64);
            state.counters.add_drained(src.abandon());
            return;
        }
        let (out, last) = match event {
            Event::Deadline => {
                armed = false;
                (state.flush(), false)
            }
            Event::Input(Some(chunk)) => {
                let mut out = Chunk::default();
                if state.absorb(chunk, &mut out) {
                    timer.as_mut().reset(Instant::now() + state.max_latency);
                }
                armed = !state.batch.is_empty();
                (out, false)
            }
            Event::Input(None) => (state.flush(), true),
            Event::Stop => {
                state.counters.add_aborted(state.batch.len() as u64);
                state.counters.add_drained(src.abandon());
                return;
            }
        };
        if !out.is_empty() {
            let len = out.values.iter().map(Vec::len).sum::<usize>() + out.errors.len();
            let len = len as u64;
            let stop = |cx: &mut Context<'_>| aborted.as_mut().poll(cx).is_ready();
            if !matches!(send_or_stop(&tx, out, stop).await, Some(Ok(()))) {
                state.counters.add_undelivered(len);
                state.counters.add_aborted(state.batch.len() as u64);
                state.counters.add_drained(src.abandon());
                return;
            }
        }
        if last {
            return;
        }
    }
}
