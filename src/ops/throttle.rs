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
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::base::ack::Ack;
use crate::base::chunk::{Chunk, IntoAcked};
use crate::base::config::{ConfigError, EdgeConfig, nonzero};
use crate::base::error::StreamError;
use crate::base::telemetry::{self, Histogram, Stopwatch};
use crate::base::time::{self, Deadline};
use crate::flow::Flow;
use crate::flow::driver::{self, Demand, Operator, Out};
use crate::flow::processor::Processor;

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
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let start = Instant::now();
/// let throttle = Throttle::new(10, Duration::from_secs(1)).with_burst(5);
/// let out = streamz::iter(0..25).pipe(throttle).collect().await;
/// assert_eq!(out.len(), 25);
/// // Five at once, then one every 100 ms: the last at 2 s.
/// assert_eq!(Instant::now() - start, Duration::from_secs(2));
/// # }
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
    /// Refused when piped ([`ConfigError`]): a zero `rate` or `period`, and
    /// a period of 584 years or more (`Duration::MAX` included): a period
    /// is a rate's denominator, not a limit that can mean "never".
    pub fn new(rate: u64, period: Duration) -> Self {
        Throttle {
            name: Cow::Borrowed("throttle"),
            rate,
            period,
            burst: 1,
            cost: None,
            error_cost: 0,
            mode: Mode::Shape,
            edge: None,
        }
    }

    /// How many tokens the bucket holds: items that may pass at once after
    /// a quiet spell (default 1; zero is refused when piped).
    pub fn with_burst(mut self, burst: u64) -> Self {
        self.burst = burst;
        self
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
    /// // At most 1 MiB per second of payload, in bursts of up to 256 KiB.
    /// let bytes = Throttle::new(1 << 20, Duration::from_secs(1))
    ///     .with_burst(256 << 10)
    ///     .with_cost(|payload: &Vec<u8>| payload.len() as u64);
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

    crate::flow::processor::name_and_edge!("Sets the stage's output edge.");
}

impl<T: Send + 'static> Processor<T, T> for Throttle<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let period = if u64::try_from(self.period.as_nanos()).is_err() {
            Err(ConfigError::new("period", "must be shorter than 584 years"))
        } else {
            nonzero(self.period, "period")
        };
        nonzero(self.rate, "rate")
            .and(period)
            .and(nonzero(self.burst, "burst"))
            .and(self.edge.map_or(Ok(()), |e| e.validate()))
            .map_err(|e| e.in_stage("Throttle", &self.name))
    }

    fn process(self, input: Flow<T>) -> Flow<T> {
        let op = Shaper {
            gcra: Gcra::new(self.rate, self.period, self.burst),
            cost: self.cost,
            error_cost: self.error_cost,
            mode: self.mode,
            head: None,
            queue: IntoAcked::default(),
            due: None,
            behind: false,
            waits: (Histogram::noop(), Stopwatch::default()),
        };
        driver::spawn_with(input, &self.name, self.edge, |_, counters| Shaper {
            waits: (
                counters
                    .labels()
                    .histogram(telemetry::THROTTLE_DELAY_SECONDS),
                Stopwatch::default(),
            ),
            ..op
        })
    }
}

/// How much lateness of its own wake-ups the throttle makes up for. tokio's
/// timer fires up to about a millisecond late; an item that waited keeps
/// the schedule it was given (the next one is due one interval after it was
/// due, not after the throttle woke), so the long-run rate is the
/// configured one. Beyond this much lateness (a stalled consumer, a
/// starved runtime) the schedule restarts from now instead, so a stall
/// never turns into a burst larger than this allowance.
const CATCH_UP: Duration = Duration::from_millis(10);

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
    /// [`CATCH_UP`] in the same units.
    catch_up: u128,
    /// The theoretical arrival time of the next item.
    tat: u128,
}

impl Gcra {
    fn new(rate: u64, period: Duration, burst: u64) -> Self {
        // `try_new` checked that the period fits.
        let token = time::nanos(period);
        Gcra {
            origin: Instant::now(),
            rate,
            token,
            depth: wide_mul(token, burst),
            catch_up: wide_mul(time::nanos(CATCH_UP), rate),
            tat: 0,
        }
    }

    fn now(&self, at: Instant) -> u128 {
        let nanos = at.saturating_duration_since(self.origin);
        wide_mul(time::nanos(nanos), self.rate)
    }

    /// Where the schedule continues from: the theoretical arrival time, or
    /// now if that is in the past. While items are behind their schedule
    /// (`behind`), an arrival time at most the catch-up allowance in the
    /// past is kept: the wake-up was late, not the input idle.
    #[inline]
    fn base(&self, now: u128, behind: bool) -> u128 {
        if behind && self.tat.saturating_add(self.catch_up) >= now {
            self.tat
        } else {
            self.tat.max(now)
        }
    }

    /// Takes `cost` tokens if an item of that cost may pass at `now`;
    /// otherwise returns when it may (and takes nothing).
    #[inline]
    fn try_take(&mut self, now: u128, cost: u64, behind: bool) -> Result<(), u128> {
        let inc = wide_mul(self.token, cost);
        let base = self.base(now, behind);
        // Heavier than the whole bucket: wait for a full bucket only.
        let allowed = (base + inc.min(self.depth)).saturating_sub(self.depth);
        if allowed > now {
            return Err(allowed);
        }
        self.tat = base.saturating_add(inc);
        Ok(())
    }

    /// Takes one token each for as many of `n` items as may pass now.
    fn take_many(&mut self, now: u128, n: usize, behind: bool) -> usize {
        let base = self.base(now, behind);
        let room = (now + self.depth).saturating_sub(base);
        // The token is at least one nanosecond (the period is not zero).
        let fits = usize::try_from(room / u128::from(self.token)).unwrap_or(usize::MAX);
        let fits = fits.min(n);
        self.tat = base.saturating_add(wide_mul(self.token, fits as u64));
        fits
    }

    fn instant(&self, t: u128) -> Deadline {
        let nanos = t.div_ceil(u128::from(self.rate));
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
        time::after(self.origin, Duration::from_nanos(nanos))
    }
}

#[inline]
fn wide_mul(a: u64, b: u64) -> u128 {
    u128::from(a) * u128::from(b)
}

/// The throttle's state machine: the items of the chunk in hand wait in
/// `queue` (the first one that found no tokens in `head`), and no input is
/// taken until they have all left.
struct Shaper<T> {
    gcra: Gcra,
    cost: Option<CostFn<T>>,
    error_cost: u64,
    mode: Mode,
    head: Option<(crate::Result<T>, Ack, u64)>,
    queue: IntoAcked<T>,
    /// When `head` may pass.
    due: Deadline,
    /// Items have had to wait for their turn: the schedule is kept across
    /// late wake-ups (see [`CATCH_UP`]).
    behind: bool,
    /// Exported: how long each wait for tokens lasted (feature `metrics`).
    waits: (Histogram, Stopwatch),
}

impl<T: Send + 'static> Shaper<T> {
    /// An item's cost in tokens, or the `panicked` error carrying it.
    fn cost_of(
        &self,
        item: crate::Result<T>,
        stage: &str,
    ) -> Result<(crate::Result<T>, u64), StreamError> {
        let value = match item {
            Err(e) => return Ok((Err(e), self.error_cost)),
            Ok(v) => v,
        };
        let Some(cost) = &self.cost else {
            return Ok((Ok(value), 1));
        };
        match catch_unwind(AssertUnwindSafe(|| cost(&value))) {
            Ok(c) => Ok((Ok(value), c)),
            Err(payload) => Err(StreamError::panicked(stage, payload).with_item(value)),
        }
    }

    /// Lets through every waiting item that may pass at `at`; stops at the
    /// first that must wait and sets the deadline for it.
    fn release(&mut self, at: Instant, out: &mut Out<T>) {
        let now = self.gcra.now(at);
        let behind = self.behind;
        loop {
            let (item, ack, cost) = match self.head.take() {
                Some(head) => head,
                None => match self.queue.next() {
                    None => break,
                    Some((item, ack)) => match self.cost_of(item, out.stage()) {
                        Ok((item, cost)) => (item, ack, cost),
                        Err(e) => {
                            out.fail(e.with_ack(ack));
                            continue;
                        }
                    },
                },
            };
            if cost == 0 {
                out.push(item, ack);
                continue;
            }
            let Err(allowed) = self.gcra.try_take(now, cost, behind) else {
                // The wait for tokens, if there was one, ends.
                self.waits.1.record(&self.waits.0);
                out.push(item, ack);
                continue;
            };
            match (self.mode, item) {
                (Mode::Shape, item) => {
                    // A head that must wait again keeps its wait's start.
                    self.waits.1.start_if_idle();
                    self.head = Some((item, ack, cost));
                    self.due = self.gcra.instant(allowed);
                    self.behind = true;
                    return;
                }
                (Mode::Drop, Ok(value)) => out.drop(value, ack),
                // Errors are never dropped: they pass without tokens.
                (Mode::Drop, Err(e)) => out.pass(e),
            }
        }
        self.due = None;
    }
}

impl<T: Send + 'static> Operator<T, T> for Shaper<T> {
    fn on_chunk(&mut self, chunk: Chunk<T>, out: &mut Out<T>) {
        let now = Instant::now();
        if self.cost.is_none() && !chunk.has_errors() {
            // The common case: one token per value, no errors in the chunk.
            let mut values = chunk.values;
            let mut acks = chunk.acks;
            let n = self
                .gcra
                .take_many(self.gcra.now(now), values.len(), self.behind);
            let rest = values.split_off(n);
            let rest_acks = acks.as_mut().map(|a| a.split_off(n));
            out.emit_all(values, acks);
            if rest.is_empty() {
                return;
            }
            let mut rest = Chunk::from_values(rest);
            rest.acks = rest_acks;
            self.queue = rest.into_acked();
        } else {
            self.queue = chunk.into_acked();
        }
        self.release(now, out);
    }

    fn deadline(&self) -> Deadline {
        self.due
    }

    fn on_deadline(&mut self, now: Instant, out: &mut Out<T>) {
        self.release(now, out);
    }

    fn demand(&self) -> Demand {
        if self.head.is_some() || self.queue.len() > 0 {
            Demand::Hold
        } else {
            Demand::Input
        }
    }

    fn held(&self) -> u64 {
        (usize::from(self.head.is_some()) + self.queue.len()) as u64
    }
}
