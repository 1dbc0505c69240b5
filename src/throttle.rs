//! [`Throttle`]: rate limiting that delays items (shapes) by default, or
//! drops them in an explicit leading-edge mode.
//!
//! The limiter is GCRA (the generic cell rate algorithm), the token bucket
//! written as one "theoretical arrival time": each item pushes that time
//! forward by its cost times the emission interval, and an item may pass
//! when the time is no further ahead of now than the burst allows. The
//! arithmetic is exact integer arithmetic scaled by the rate, so `rate`
//! items per `period` come out exactly, with no rounding drift.
//!
//! It runs on `tokio::time`, so tests on a paused clock see exact timings.
//! (The `governor` crate implements the same algorithm but on its own
//! clock, which a paused tokio clock cannot drive.)

use std::borrow::Cow;
use std::fmt;
use std::future::{Future, poll_fn};
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
use crate::stage::{receive_or_stop, send_or_stop, spawn_operator};

type CostFn<T> = Arc<dyn Fn(&T) -> u64 + Send + Sync>;

/// What happens to an item that arrives when there are not enough tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Wait for the tokens (the producer feels backpressure).
    Shape,
    /// Drop the item and count it.
    Drop,
}

/// Limits the rate of items to `rate` per `period`, with bursts of up to
/// `burst` items.
///
/// # Modes
///
/// - **Shaping** (the default) delays an item until it may pass and never
///   drops one. While it waits it stops taking input, so the producer
///   feels backpressure.
/// - **Dropping** ([`dropping`](Throttle::dropping)), the leading-edge
///   semantics of Go streamz: an item that finds tokens passes at once; one
///   that does not is dropped, counted in `dropped`. With `burst` 1 this
///   emits one item and drops the rest until the period passes.
///
/// # Default
///
/// Burst 1 (items evenly spaced, `period / rate` apart), every value costs
/// one token ([`with_cost`](Throttle::with_cost) changes that), errors pass
/// without tokens ([`with_error_cost`](Throttle::with_error_cost)), named
/// `throttle`, output edge from the pipeline's [`EdgeConfig`].
///
/// # Order
///
/// Items leave in arrival order, errors included: an error behind a delayed
/// value waits for it, but takes no token of its own by default.
///
/// A value costing more than the burst passes once the bucket is full and
/// leaves it in debt, so the long-run rate still holds.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::Throttle;
/// use tokio::time::Instant;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), streamz::ConfigError> {
/// let start = Instant::now();
/// let throttle = Throttle::try_new(10, Duration::from_secs(1))?.with_burst(5)?;
/// let out = streamz::iter(0..25).pipe(throttle).collect().await;
/// assert_eq!(out.len(), 25);
/// // Five at once, then one every 100 ms: the last at 2 s.
/// assert_eq!(Instant::now() - start, Duration::from_secs(2));
/// # Ok(()) }
/// ```
pub struct Throttle<T> {
    name: Cow<'static, str>,
    rate: u64,
    period: Duration,
    burst: u64,
    cost: Option<CostFn<T>>,
    error_cost: u64,
    mode: Mode,
    edge: Option<EdgeConfig>,
}

impl<T> fmt::Debug for Throttle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("name", &self.name)
            .field("rate", &self.rate)
            .field("period", &self.period)
            .field("burst", &self.burst)
            .field("error_cost", &self.error_cost)
            .field("mode", &self.mode)
            .field("edge", &self.edge)
            .finish_non_exhaustive()
    }
}

impl<T> Throttle<T> {
    /// A shaping throttle passing `rate` items per `period`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] if `rate` or `period` is zero.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::{ConfigError, Throttle};
    ///
    /// let err = Throttle::<u8>::try_new(0, Duration::from_secs(1)).unwrap_err();
    /// assert_eq!(err, ConfigError::Zero { field: "rate" });
    /// ```
    pub fn try_new(rate: u64, period: Duration) -> Result<Self, ConfigError> {
        if rate == 0 {
            return Err(ConfigError::Zero { field: "rate" });
        }
        if period.is_zero() {
            return Err(ConfigError::Zero { field: "period" });
        }
        if u64::try_from(period.as_nanos()).is_err() {
            return Err(ConfigError::Invalid {
                field: "period",
                reason: "must be shorter than 584 years",
            });
        }
        Ok(Throttle {
            name: Cow::Borrowed("throttle"),
            rate,
            period,
            burst: 1,
            cost: None,
            error_cost: 0,
            mode: Mode::Shape,
            edge: None,
        })
    }

    /// How many tokens the bucket holds: items that may pass at once after
    /// a quiet spell.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] if `burst` is zero.
    pub fn with_burst(mut self, burst: u64) -> Result<Self, ConfigError> {
        if burst == 0 {
            return Err(ConfigError::Zero { field: "burst" });
        }
        self.burst = burst;
        Ok(self)
    }

    /// Charges each value `cost(&value)` tokens instead of one (for example
    /// its size in bytes, with the rate in bytes per period). A cost of zero
    /// passes freely. A cost function that panics turns its value into a
    /// `panicked` error carrying it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::Throttle;
    ///
    /// # fn main() -> Result<(), streamz::ConfigError> {
    /// // At most 1 MiB per second of payload, in bursts of up to 256 KiB.
    /// let bytes = Throttle::try_new(1 << 20, Duration::from_secs(1))?
    ///     .with_burst(256 << 10)?
    ///     .with_cost(|payload: &Vec<u8>| payload.len() as u64);
    /// # Ok(()) }
    /// ```
    pub fn with_cost<F>(mut self, cost: F) -> Self
    where
        F: Fn(&T) -> u64 + Send + Sync + 'static,
    {
        self.cost = Some(Arc::new(cost));
        self
    }

    /// Charges each error `tokens` tokens (zero by default: errors pass
    /// without using the rate).
    pub fn with_error_cost(mut self, tokens: u64) -> Self {
        self.error_cost = tokens;
        self
    }

    /// Switches to the dropping mode: an item without tokens is dropped
    /// and counted, never delayed. Errors are never dropped.
    pub fn dropping(mut self) -> Self {
        self.mode = Mode::Drop;
        self
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

impl<T: Send + 'static> Processor<T, T> for Throttle<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn process(self, input: Flow<T>) -> Flow<T> {
        spawn_operator(input, &self.name, self.edge, |io| {
            let shaper = Shaper {
                gcra: Gcra::new(self.rate, self.period, self.burst),
                cost: self.cost,
                error_cost: self.error_cost,
                mode: self.mode,
                counters: io.counters,
            };
            run(io.src, io.tx, io.abort, shaper)
        })
    }
}

/// The limiter's state in exact integer units: time is nanoseconds since
/// `origin` times `rate`, and one token is `period` nanoseconds, so the
/// emission interval `period / rate` needs no division. Each product is of
/// two `u64`s, so it fits a `u128` without overflow checks.
#[derive(Debug)]
struct Gcra {
    origin: Instant,
    rate: u64,
    token: u64,
    /// The bucket's depth: `burst` tokens.
    depth: u128,
    /// The theoretical arrival time of the next item.
    tat: u128,
}

impl Gcra {
    fn new(rate: u64, period: Duration, burst: u64) -> Self {
        // `try_new` checked that the period fits.
        let token = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
        Gcra {
            origin: Instant::now(),
            rate,
            token,
            depth: wide_mul(token, burst),
            tat: 0,
        }
    }

    fn now(&self, at: Instant) -> u128 {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        wide_mul(u64::try_from(nanos).unwrap_or(u64::MAX), self.rate)
    }

    /// When an item of `cost` tokens may pass, as scaled time.
    fn allowed_at(&self, now: u128, cost: u64) -> u128 {
        let inc = wide_mul(self.token, cost);
        // Heavier than the whole bucket: wait for a full bucket only.
        (self.tat.max(now) + inc.min(self.depth)).saturating_sub(self.depth)
    }

    /// Takes `cost` tokens at `now` (the item passes).
    fn take(&mut self, now: u128, cost: u64) {
        let inc = wide_mul(self.token, cost);
        self.tat = self.tat.max(now).saturating_add(inc);
    }

    /// How many one-token items may pass at `now`, up to `n`; takes their
    /// tokens.
    fn take_many(&mut self, now: u128, n: usize) -> usize {
        let base = self.tat.max(now);
        let room = (now + self.depth).saturating_sub(base);
        // The token is at least one nanosecond (the period is not zero).
        let fits = usize::try_from(room / u128::from(self.token)).unwrap_or(usize::MAX);
        let fits = fits.min(n);
        self.tat = base.saturating_add(wide_mul(self.token, fits as u64));
        fits
    }

    /// The instant of scaled time `t`, rounded up.
    fn instant(&self, t: u128) -> Instant {
        let nanos = t.div_ceil(u128::from(self.rate));
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
        self.origin + Duration::from_nanos(nanos)
    }
}

/// The full product of two `u64`s.
fn wide_mul(a: u64, b: u64) -> u128 {
    u128::from(a) * u128::from(b)
}

struct Shaper<T> {
    gcra: Gcra,
    cost: Option<CostFn<T>>,
    error_cost: u64,
    mode: Mode,
    counters: Counters,
}

/// What to do with the next item of a chunk.
enum Verdict {
    Pass,
    Wait(Instant),
    Drop,
}

impl<T: Send + 'static> Shaper<T> {
    /// The cost of a value, or the `panicked` error its cost function raised.
    fn cost_of(&self, value: &T) -> Result<u64, Box<dyn std::any::Any + Send>> {
        match &self.cost {
            None => Ok(1),
            Some(cost) => catch_unwind(AssertUnwindSafe(|| cost(value))),
        }
    }

    /// Whether an item of `cost` may pass at scaled time `t`.
    fn verdict(&mut self, t: u128, cost: u64) -> Verdict {
        if cost == 0 {
            return Verdict::Pass;
        }
        let at = self.gcra.allowed_at(t, cost);
        if at <= t {
            self.gcra.take(t, cost);
            return Verdict::Pass;
        }
        match self.mode {
            Mode::Shape => Verdict::Wait(self.gcra.instant(at)),
            Mode::Drop => Verdict::Drop,
        }
    }
}

async fn run<T: Send + 'static>(
    mut src: BoxSource<T>,
    tx: ChunkTx<T>,
    abort: CancellationToken,
    mut shaper: Shaper<T>,
) {
    let counters = shaper.counters.clone();
    let mut aborted = pin!(abort.cancelled());
    let mut closed = pin!(tx.closed());
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    loop {
        let stop = |cx: &mut Context<'_>| {
            aborted.as_mut().poll(cx).is_ready() || closed.as_mut().poll(cx).is_ready()
        };
        let Some(chunk) = receive_or_stop(&mut src, &abort, &counters, stop).await else {
            return;
        };
        let mut local = Local {
            received: chunk.len() as u64,
            ..Local::default()
        };
        let mut now = shaper.gcra.now(Instant::now());
        let mut out = Chunk::with_capacity(chunk.len());
        let mut values = chunk.values.into_iter();
        let mut errors = chunk.errors.into_iter().peekable();
        let mut position = 0;
        // The common case: one token per value, no errors in the chunk.
        if shaper.cost.is_none() && errors.peek().is_none() {
            let n = shaper.gcra.take_many(now, values.len());
            out.values.extend(values.by_ref().take(n));
            local.emitted += n as u64;
            position = n;
        }
        loop {
            // The next item in chunk order: an error placed before value
            // `position`, or that value.
            let item = match errors.next_if(|(at, _)| *at <= position) {
                Some((_, e)) => Err(e),
                None => match values.next() {
                    Some(v) => {
                        position += 1;
                        Ok(v)
                    }
                    None => break,
                },
            };
            let cost = match &item {
                Ok(v) => match shaper.cost_of(v) {
                    Ok(c) => c,
                    Err(payload) => {
                        let Ok(value) = item else {
                            unreachable!("only values have a cost function")
                        };
                        let err = StreamError::panicked(counters.name(), payload).with_item(value);
                        local.failed += 1;
                        out.push_error(err);
                        continue;
                    }
                },
                Err(_) => shaper.error_cost,
            };
            let is_error = item.is_err();
            loop {
                match shaper.verdict(now, cost) {
                    Verdict::Pass => {
                        if is_error {
                            local.errors_passed += 1;
                        } else {
                            local.emitted += 1;
                        }
                        out.push(item);
                        break;
                    }
                    Verdict::Drop if !is_error => {
                        local.dropped += 1;
                        break;
                    }
                    Verdict::Drop => {
                        // Errors are never dropped: pass without tokens.
                        local.errors_passed += 1;
                        out.push(item);
                        break;
                    }
                    Verdict::Wait(at) => {
                        // Send what may go now, then wait for the tokens.
                        let len = out.len() as u64;
                        let ready = std::mem::take(&mut out);
                        let stop = |cx: &mut Context<'_>| aborted.as_mut().poll(cx).is_ready();
                        if !matches!(send_or_stop(&tx, ready, stop).await, Some(Ok(()))) {
                            counters.add(&local);
                            counters.add_undelivered(len);
                            let held = 1 + values.len() + errors.len();
                            counters.add_aborted(held as u64);
                            counters.add_drained(src.abandon());
                            return;
                        }
                        timer.as_mut().reset(at);
                        let woke = poll_fn(|cx| {
                            if aborted.as_mut().poll(cx).is_ready()
                                || closed.as_mut().poll(cx).is_ready()
                            {
                                return Poll::Ready(false);
                            }
                            timer.as_mut().poll(cx).map(|()| true)
                        })
                        .await;
                        if !woke {
                            counters.add(&local);
                            let held = 1 + values.len() + errors.len();
                            counters.add_aborted(held as u64);
                            counters.add_drained(src.abandon());
                            return;
                        }
                        now = shaper.gcra.now(Instant::now());
                    }
                }
            }
        }
        counters.add(&local);
        let len = out.len() as u64;
        let stop = |cx: &mut Context<'_>| aborted.as_mut().poll(cx).is_ready();
        if !matches!(send_or_stop(&tx, out, stop).await, Some(Ok(()))) {
            counters.add_undelivered(len);
            counters.add_drained(src.abandon());
            return;
        }
    }
}
