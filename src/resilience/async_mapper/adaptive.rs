//! Adaptive concurrency: a limit that finds the dependency's knee by
//! itself, by additive increase and multiplicative decrease (AIMD) on the
//! calls' latency and on overload errors, as TCP's congestion control does
//! with a window.
//!
//! Time is cut into windows of one typical call (the baseline latency). A
//! window ends once its time is up and it holds an overload or a limit's
//! worth of successes, counting only calls that began after the limit last
//! changed (the others say how the old limit did). Then:
//!
//! - an overload in the window (an error the user marked, or an attempt's
//!   timeout), or a window slower than the baseline by more than 5 % plus
//!   2.5 standard errors of its mean, cuts the limit to 90 % (at least by
//!   one, never below `min`): the dependency queues;
//! - otherwise a window in which the limit was reached raises it by one (up
//!   to `max`): there was demand for more, and more did not hurt;
//! - otherwise the limit stays.
//!
//! The baseline is the latency without load: the fastest of the last 100
//! windows, each smoothed into a moving average first (weight 0.4) so one
//! lucky window does not set it. After 100 windows a window is forgotten,
//! so a dependency that became slower at every load is followed (TCP BBR
//! keeps its minimum round trip the same way).
//!
//! The standard error comes from the spread of the window's own calls
//! (a window holds two calls at least): a dependency whose latency jitters
//! by chance gets a margin as wide as its jitter, while at the knee, where
//! every call is slower alike, the margin stays narrow. Without it, a
//! dependency jittering by 50 % whatever its load held the limit near 2
//! (the fastest of 100 noisy windows lies well below the typical one). A
//! spread learnt only from windows that were not slower was too narrow
//! (it leaves the slow tail out): uniform 5 to 15 ms held the limit at 15
//! of 64. With the window's own, it climbs to about 60.

//! Why not a moving average of all windows, as Vector's adaptive request
//! concurrency uses (with a threshold of 2.5 deviations of the windows'
//! means): it follows the latency up as the limit climbs past the knee one
//! call at a time. In a simulation of a dependency flat to 16 calls and
//! linear beyond, it settled at 22 on a paused clock; this controller
//! settles between 16 and 20 there, and at 18.1 on average on the real
//! clock (`cargo bench --bench adaptive`, docs/performance.md).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::base::telemetry::Gauge;

/// How much of the limit a decrease keeps.
const DECREASE: f64 = 0.9;
/// How far above the baseline a window's mean may be before it counts as
/// slower: above the noise of a window's mean over a dozen calls on a
/// millisecond timer, below what one call past a knee at 16 adds (6 %).
const TOLERANCE: f64 = 0.05;
/// How many standard errors of a window's mean (from its calls' spread)
/// it may also stray above the baseline by chance.
const DEVIATIONS: f64 = 2.5;
/// The weight of the newest window in the smoothed mean.
const SMOOTHING: f64 = 0.4;
/// How many windows the baseline remembers.
const REMEMBERED: u64 = 100;

/// The smallest of the last [`REMEMBERED`] windows' means: a sliding
/// minimum, kept as the increasing run of candidates (at most
/// `REMEMBERED` of them).
#[derive(Debug, Default)]
struct Fastest {
    candidates: VecDeque<(u64, f64)>,
    windows: u64,
}

impl Fastest {
    fn push(&mut self, mean: f64) {
        while self.candidates.back().is_some_and(|(_, m)| *m >= mean) {
            self.candidates.pop_back();
        }
        self.candidates.push_back((self.windows, mean));
        self.windows += 1;
        while self
            .candidates
            .front()
            .is_some_and(|(i, _)| i + REMEMBERED < self.windows)
        {
            self.candidates.pop_front();
        }
    }

    fn get(&self) -> Option<f64> {
        self.candidates.front().map(|(_, m)| *m)
    }
}

/// The current concurrency limit of an [`AsyncMapper`](super::AsyncMapper),
/// read while it runs: fixed ([`with_concurrency`](super::AsyncMapper::with_concurrency))
/// or moving ([`with_adaptive_concurrency`](super::AsyncMapper::with_adaptive_concurrency)).
///
/// Taken from the mapper before it is piped
/// ([`concurrency_limit`](super::AsyncMapper::concurrency_limit)); it
/// reads the configured starting value until the stage starts, and the
/// last value after it ends. With feature `metrics` the same number is the
/// gauge `streamz_async_mapper_concurrency_limit`.
///
/// ```
/// use streamz::AsyncMapper;
///
/// let mapper = AsyncMapper::new(|x: &u32| std::future::ready(Ok::<_, std::io::Error>(*x)))
///     .with_adaptive_concurrency(2, 64);
/// let limit = mapper.concurrency_limit();
/// assert_eq!(limit.get(), 2); // it starts at `min`
/// ```
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit(pub(super) Arc<AtomicUsize>);

impl ConcurrencyLimit {
    /// The limit now: how many items the mapper may hold at once.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// How a call ended, to the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A value: its latency is a sample.
    Success,
    /// A timeout or an error the user marked as overload.
    Overload,
    /// Another failure, or a panic: no evidence either way.
    Neither,
}

/// The controller: owned by the mapper's task, told when the limit is
/// reached and how each call ended.
pub(super) struct Controller {
    min: usize,
    max: usize,
    limit: usize,
    shared: Arc<AtomicUsize>,
    gauge: Gauge,
    /// The latency without load, in seconds.
    baseline: Fastest,
    /// The windows' means, smoothed (seconds).
    smoothed: Option<f64>,
    window_end: Option<Instant>,
    /// When the limit last changed.
    since: Option<Instant>,
    /// Successful calls' latencies in this window (nanoseconds: the mean
    /// of equal latencies is exact).
    sum_nanos: u128,
    /// Their squares (seconds²), for the window's variance.
    sum_squares: f64,
    samples: u64,
    overloaded: bool,
    reached: bool,
}

impl Controller {
    pub(super) fn new(min: usize, max: usize, shared: Arc<AtomicUsize>) -> Self {
        shared.store(min, Ordering::Relaxed);
        Controller {
            min,
            max,
            limit: min,
            shared,
            gauge: Gauge::noop(),
            baseline: Fastest::default(),
            smoothed: None,
            window_end: None,
            since: None,
            sum_nanos: 0,
            sum_squares: 0.0,
            samples: 0,
            overloaded: false,
            reached: false,
        }
    }

    /// Reports the limit to `gauge` from now on.
    pub(super) fn export(&mut self, gauge: Gauge) {
        gauge.set(self.limit as f64);
        self.gauge = gauge;
    }

    pub(super) fn limit(&self) -> usize {
        self.limit
    }

    /// The mapper holds `held` items: note whether that is the limit
    /// (evidence that more would have been used).
    pub(super) fn held(&mut self, held: usize) {
        if held >= self.limit {
            self.reached = true;
        }
    }

    /// A call that began at `began` ended: a success (its latency is a
    /// sample), an overload, or neither (another failure: no evidence
    /// either way).
    ///
    /// Only calls that began after the limit last changed count: the
    /// others say how the old limit did. A window ends once its time is
    /// up and it holds an overload or a limit's worth of successes.
    pub(super) fn ended(&mut self, now: Instant, began: Instant, outcome: Outcome) {
        if self.since.is_some_and(|since| began < since) {
            return;
        }
        match outcome {
            Outcome::Success => {
                let latency = now.saturating_duration_since(began);
                self.sum_nanos += latency.as_nanos();
                self.sum_squares += latency.as_secs_f64().powi(2);
                self.samples += 1;
            }
            Outcome::Overload => self.overloaded = true,
            Outcome::Neither => {}
        }
        // At least two, for the spread: a window of one call says nothing
        // of how far calls stray by chance.
        let enough = self.overloaded || self.samples >= self.limit.max(2) as u64;
        if !enough || self.window_end.is_some_and(|end| now < end) {
            return;
        }
        let current = (self.samples > 0).then(|| {
            Duration::from_nanos((self.sum_nanos / u128::from(self.samples)) as u64).as_secs_f64()
        });
        // The spread of one call's latency in this window, and how far
        // the window's mean strays by chance (its standard error), from the
        // spread of the windows that were not slower (so that a queue
        // forming at the knee does not widen its own margin).
        let spread = match (current, self.samples > 1) {
            (Some(mean), true) => {
                let n = self.samples as f64;
                Some(((self.sum_squares - n * mean * mean) / (n - 1.0)).max(0.0))
            }
            _ => None,
        };
        let variance = spread.unwrap_or(0.0);
        let noise = (variance / self.samples.max(1) as f64).sqrt();
        let before = self.limit;
        match self.baseline.get() {
            None => {
                // The first calls set the baseline; an overload before any
                // success already says the limit is too high.
                if self.overloaded {
                    self.decrease();
                }
            }
            Some(baseline) => {
                let slower =
                    current.is_some_and(|c| c > baseline * (1.0 + TOLERANCE) + DEVIATIONS * noise);
                if self.overloaded || slower {
                    self.decrease();
                } else if self.reached && self.limit < self.max {
                    self.set(self.limit + 1);
                }
            }
        }
        if let Some(c) = current {
            let smooth = self.smoothed.map_or(c, |s| s + SMOOTHING * (c - s));
            self.smoothed = Some(smooth);
            self.baseline.push(smooth);
        }
        if self.limit != before {
            self.since = Some(now);
        }
        let window = self
            .baseline
            .get()
            .map_or(Duration::ZERO, Duration::from_secs_f64);
        self.window_end = now.checked_add(window);
        self.sum_nanos = 0;
        self.sum_squares = 0.0;
        self.samples = 0;
        self.overloaded = false;
        self.reached = false;
    }

    fn decrease(&mut self) {
        let kept = ((self.limit as f64) * DECREASE) as usize;
        self.set(kept.min(self.limit - 1).max(self.min));
    }

    fn set(&mut self, limit: usize) {
        if limit != self.limit {
            tracing::trace!(from = self.limit, to = limit, "concurrency limit changed");
            self.limit = limit;
            self.shared.store(limit, Ordering::Relaxed);
            self.gauge.set(limit as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn controller(min: usize, max: usize) -> Controller {
        Controller::new(min, max, Arc::new(AtomicUsize::new(0)))
    }

    fn start() -> Instant {
        Instant::now() + Duration::from_secs(1)
    }

    /// A limit's worth of successes (two at least) of `latency` ending at `at`.
    fn window(c: &mut Controller, at: Instant, latency: Duration) {
        for _ in 0..c.limit().max(2) {
            c.ended(at, at - latency, Outcome::Success);
        }
    }

    fn overload(c: &mut Controller, at: Instant) {
        c.ended(at, at - MS, Outcome::Overload);
    }

    #[test]
    fn grows_by_one_per_window_while_reached_and_no_slower() {
        let mut c = controller(1, 4);
        let t0 = start();
        c.held(1);
        window(&mut c, t0, 10 * MS); // sets the baseline
        assert_eq!(c.limit(), 1);
        for (i, expected) in [(1, 2), (2, 3), (3, 4), (4, 4)] {
            c.held(c.limit());
            window(&mut c, t0 + i * 10 * MS, 10 * MS);
            assert_eq!(c.limit(), expected, "window {i}");
        }
        assert_eq!(c.shared.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn no_growth_without_reaching_the_limit() {
        let mut c = controller(1, 8);
        let t0 = start();
        window(&mut c, t0, 10 * MS);
        window(&mut c, t0 + 10 * MS, 10 * MS);
        assert_eq!(c.limit(), 1);
    }

    #[test]
    fn waits_for_the_window_to_end_and_for_enough_calls() {
        let mut c = controller(1, 8);
        let t0 = start();
        window(&mut c, t0, 10 * MS);
        c.held(1);
        window(&mut c, t0 + 9 * MS, 10 * MS);
        assert_eq!(c.limit(), 1, "the window is not over");
        window(&mut c, t0 + 10 * MS, 10 * MS);
        assert_eq!(c.limit(), 2);
        // At 2, a window needs two successes that began after the change.
        c.held(2);
        c.ended(t0 + 30 * MS, t0 + 5 * MS, Outcome::Success);
        c.ended(t0 + 30 * MS, t0 + 5 * MS, Outcome::Success);
        assert_eq!(c.limit(), 2, "the calls began before the change");
        c.ended(t0 + 30 * MS, t0 + 20 * MS, Outcome::Success);
        assert_eq!(c.limit(), 2, "one is not enough");
        c.ended(t0 + 30 * MS, t0 + 20 * MS, Outcome::Success);
        assert_eq!(c.limit(), 3);
    }

    #[test]
    fn slower_or_overloaded_windows_cut_to_ninety_percent_but_not_below_min() {
        let mut c = controller(3, 100);
        c.set(50);
        let t0 = start();
        window(&mut c, t0, 10 * MS);
        window(&mut c, t0 + 10 * MS, 12 * MS);
        assert_eq!(c.limit(), 45);
        overload(&mut c, t0 + 400 * MS);
        assert_eq!(c.limit(), 40);
        c.set(4);
        overload(&mut c, t0 + 600 * MS);
        assert_eq!(c.limit(), 3, "at least one less");
        overload(&mut c, t0 + 800 * MS);
        assert_eq!(c.limit(), 3, "never below min");
    }

    #[test]
    fn an_overload_of_a_call_begun_before_the_cut_does_not_cut_again() {
        let mut c = controller(1, 100);
        c.set(20);
        let t0 = start();
        overload(&mut c, t0);
        assert_eq!(c.limit(), 18, "an overload before any success cuts at once");
        c.ended(t0 + 50 * MS, t0 - MS, Outcome::Overload);
        assert_eq!(c.limit(), 18);
        overload(&mut c, t0 + 50 * MS);
        assert_eq!(c.limit(), 16);
    }

    #[test]
    fn the_baseline_is_the_fastest_of_the_last_hundred_windows() {
        let mut f = Fastest::default();
        assert_eq!(f.get(), None);
        f.push(0.010);
        f.push(0.020);
        assert_eq!(f.get(), Some(0.010));
        f.push(0.005);
        assert_eq!(f.get(), Some(0.005));
        for _ in 0..99 {
            f.push(0.030);
        }
        assert_eq!(f.get(), Some(0.005), "remembered for 100 windows");
        f.push(0.030);
        assert_eq!(f.get(), Some(0.030), "then forgotten");
        assert!(f.candidates.len() <= REMEMBERED as usize + 1);
        for i in 0..1000 {
            f.push(f64::from(i));
        }
        assert!(
            f.candidates.len() <= REMEMBERED as usize + 1,
            "{}",
            f.candidates.len()
        );
    }

    #[test]
    fn slower_within_the_tolerance_still_grows() {
        let mut c = controller(1, 100);
        let t0 = start();
        window(&mut c, t0, 100 * MS);
        c.held(1);
        window(&mut c, t0 + 200 * MS, 104 * MS);
        assert_eq!(c.limit(), 2);
        c.held(2);
        window(&mut c, t0 + 400 * MS, 106 * MS);
        assert_eq!(c.limit(), 1, "more than 5 % slower");
    }
}
