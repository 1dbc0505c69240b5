//! [`Retry`]: how an [`AsyncMapper`](crate::AsyncMapper) tries an item
//! again, with exponential backoff, jitter and an optional total deadline.

use std::time::Duration;

use crate::base::config::{ConfigError, nonzero};

/// How the delay before a retry is randomised.
///
/// Randomising spreads the retries of many items that failed together (a
/// dependency that went down for a moment) so they do not all hit it again
/// at the same instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Jitter {
    /// Exactly the exponential delay.
    None,
    /// A uniformly random delay between zero and the exponential delay
    /// (the default; spreads retries the most).
    #[default]
    Full,
    /// Half the exponential delay plus a uniformly random part of the other
    /// half (never retries sooner than half the delay).
    Equal,
}

/// A retry policy: how many attempts, how long to wait between them, and
/// how long to keep trying in total.
///
/// The delay before retry `n` (the first retry is `n = 1`) is
/// `min_delay × factor^(n-1)`, capped at `max_delay`, then jittered. With a
/// [`deadline`](Retry::with_deadline), the item gives up as soon as the next
/// attempt could not start before it, and an attempt still running when the
/// deadline passes is cut off (a [`TimedOut`](crate::ErrorKind::TimedOut)
/// failure).
///
/// # No limit
///
/// `Duration::MAX` means "never" and the arithmetic saturates, so no value
/// panics or overflows: a `max_delay` of `Duration::MAX` leaves the delays
/// uncapped, a `deadline` of `Duration::MAX` is no deadline. A delay that
/// never ends (a `min_delay` of `Duration::MAX`, or an uncapped delay grown
/// past what the clock can represent) means that retry never comes: the
/// item fails at once with its last error, as if its attempts were spent.
///
/// # Shutdown
///
/// A graceful [`shutdown`](crate::Pipeline::shutdown) ends retrying: an
/// item waiting its backoff fails at once with its last error (its kind,
/// the item and the attempt count, as when the attempts are spent), and no
/// new attempt starts. Attempts already running finish first. So even
/// `Retry::attempts(u32::MAX)` cannot keep a pipeline from ending.
///
/// # Default
///
/// [`Retry::attempts`] sets the number of attempts; the rest defaults to a
/// 100 ms minimum delay, a 10 s maximum, factor 2, [`Jitter::Full`] from a
/// random seed, no deadline, and timed-out attempts retried.
///
/// # Validation
///
/// The constructor and setters never fail. The settings are checked once,
/// when the operator holding the policy (an
/// [`AsyncMapper`](crate::AsyncMapper), a circuit breaker) is piped; an
/// invalid one is refused then with a [`ConfigError`] naming the operator,
/// its stage and the field (`retry.max_attempts`, `retry.min_delay`,
/// `retry.factor`, `retry.deadline`). [`validate`](Retry::validate) checks
/// them on their own.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::{Jitter, Retry};
///
/// let retry = Retry::attempts(5)
///     .with_backoff(Duration::from_millis(10), Duration::from_secs(1))
///     .with_factor(3.0)
///     .with_jitter(Jitter::None)
///     .with_deadline(Duration::from_secs(5));
/// let delays: Vec<Duration> = (1..5).map(|n| retry.base_delay(n)).collect();
/// assert_eq!(delays, [10, 30, 90, 270].map(Duration::from_millis));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    pub(crate) max_attempts: u32,
    min_delay: Duration,
    max_delay: Duration,
    factor: f64,
    jitter: Jitter,
    seed: Option<u64>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) retry_timeouts: bool,
}

impl Default for Retry {
    /// One attempt: no retries.
    fn default() -> Self {
        Retry {
            max_attempts: 1,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            factor: 2.0,
            jitter: Jitter::Full,
            seed: None,
            deadline: None,
            retry_timeouts: true,
        }
    }
}

impl Retry {
    /// Up to `max_attempts` attempts per item, the first included (so
    /// `attempts(1)` never retries). Zero is refused when the operator
    /// holding the policy is piped ([`ConfigError`], field
    /// `retry.max_attempts`).
    ///
    /// ```
    /// use streamz::{AsyncMapper, Retry};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let fetch = AsyncMapper::new(|x: &u8| std::future::ready(Ok::<_, std::io::Error>(*x)))
    ///     .with_retry(Retry::attempts(0))
    ///     .named("fetch");
    /// let err = streamz::iter([1u8]).try_pipe(fetch).unwrap_err();
    /// assert_eq!(err.field(), "retry.max_attempts");
    /// assert_eq!(
    ///     err.to_string(),
    ///     "AsyncMapper `fetch`: `retry.max_attempts` must be greater than zero"
    /// );
    /// # }
    /// ```
    pub fn attempts(max_attempts: u32) -> Self {
        Retry {
            max_attempts,
            ..Retry::default()
        }
    }

    /// The delay before the first retry and the cap on any delay.
    ///
    /// `max` of `Duration::MAX` leaves the delays uncapped; `min` of
    /// `Duration::MAX` means never retry (see [No limit](Retry#no-limit)).
    /// A `min` longer than `max` is refused when the operator holding the
    /// policy is piped ([`ConfigError`], field `retry.min_delay`).
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_delay = min;
        self.max_delay = max;
        self
    }

    /// How much longer each delay is than the one before. A factor below
    /// 1.0 or not finite is refused when the operator holding the policy
    /// is piped ([`ConfigError`], field `retry.factor`).
    ///
    /// ```
    /// let err = streamz::Retry::attempts(3).with_factor(0.5).validate().unwrap_err();
    /// assert_eq!(err.field(), "retry.factor");
    /// ```
    pub fn with_factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }

    /// How delays are randomised.
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Seeds the jitter's random numbers, so delays repeat from run to run
    /// (for tests).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Gives up on an item once `deadline` has passed since its first
    /// attempt started, whatever attempts remain. `Duration::MAX` means no
    /// deadline (the default). Zero is refused when the operator holding
    /// the policy is piped ([`ConfigError`], field `retry.deadline`).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = (deadline != Duration::MAX).then_some(deadline);
        self
    }

    /// Whether an attempt that timed out is retried (`true` by default: a
    /// timeout is usually a transient condition).
    pub fn with_timeouts_retried(mut self, retry: bool) -> Self {
        self.retry_timeouts = retry;
        self
    }

    /// Checks the settings; the operator holding the policy calls it when
    /// it is piped, so its error also names the operator and stage.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for the field `retry.max_attempts` (zero),
    /// `retry.min_delay` (longer than the maximum delay), `retry.factor`
    /// (below 1.0 or not finite) or `retry.deadline` (zero).
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::Retry;
    ///
    /// let retry = Retry::attempts(3).with_backoff(Duration::from_secs(2), Duration::from_secs(1));
    /// let err = retry.validate().unwrap_err();
    /// assert_eq!(err.field(), "retry.min_delay");
    /// assert_eq!(err.to_string(), "`retry.min_delay` must not be longer than `retry.max_delay`");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.max_attempts, "retry.max_attempts")?;
        if self.min_delay > self.max_delay {
            return Err(ConfigError::new(
                "retry.min_delay",
                "must not be longer than `retry.max_delay`",
            ));
        }
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(ConfigError::new(
                "retry.factor",
                "must be a finite number of at least 1.0",
            ));
        }
        if let Some(deadline) = self.deadline {
            nonzero(deadline, "retry.deadline")?;
        }
        Ok(())
    }

    /// The delay before retry `n` (from 1) before jitter:
    /// `min_delay × factor^(n-1)`, capped at `max_delay`; saturates at
    /// `Duration::MAX` (never) when uncapped.
    pub fn base_delay(&self, n: u32) -> Duration {
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.min_delay.as_secs_f64() * self.factor.powi(exp);
        if !secs.is_finite() || secs >= self.max_delay.as_secs_f64() {
            return self.max_delay;
        }
        Duration::from_secs_f64(secs).min(self.max_delay)
    }

    /// The random source for one operator's jitter.
    pub(crate) fn rng(&self) -> fastrand::Rng {
        match self.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        }
    }

    /// The jittered delay before retry `n`; `Duration::MAX` (never) stays
    /// never whatever the jitter.
    pub(crate) fn delay(&self, n: u32, rng: &mut fastrand::Rng) -> Duration {
        let base = self.base_delay(n);
        if base == Duration::MAX {
            return base;
        }
        let nanos = crate::base::time::nanos(base);
        let nanos = match self.jitter {
            Jitter::None => nanos,
            Jitter::Full => rng.u64(0..=nanos),
            Jitter::Equal => nanos / 2 + rng.u64(0..=nanos - nanos / 2),
        };
        Duration::from_nanos(nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_delay_grows_and_caps() {
        let r = Retry::attempts(10)
            .with_backoff(Duration::from_millis(100), Duration::from_millis(500));
        let d: Vec<u128> = (1..=5).map(|n| r.base_delay(n).as_millis()).collect();
        assert_eq!(d, [100, 200, 400, 500, 500]);
        assert_eq!(r.base_delay(u32::MAX), Duration::from_millis(500));
    }

    #[test]
    fn jitter_stays_in_its_range_and_repeats_with_a_seed() {
        let base = Retry::attempts(3)
            .with_backoff(Duration::from_millis(100), Duration::from_secs(1))
            .with_seed(7);
        let full = base.clone().with_jitter(Jitter::Full);
        let equal = base.clone().with_jitter(Jitter::Equal);
        let (mut a, mut b) = (full.rng(), full.rng());
        for n in 1..=3 {
            let cap = full.base_delay(n);
            let x = full.delay(n, &mut a);
            assert!(x <= cap);
            assert_eq!(x, full.delay(n, &mut b), "same seed, same delays");
        }
        let mut rng = equal.rng();
        for _ in 0..100 {
            let d = equal.delay(2, &mut rng);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200));
        }
        let none = base.with_jitter(Jitter::None);
        assert_eq!(none.delay(2, &mut none.rng()), Duration::from_millis(200));
    }

    #[test]
    fn duration_max_saturates_and_means_never() {
        let uncapped = Retry::attempts(u32::MAX)
            .with_backoff(Duration::from_secs(1), Duration::MAX)
            .with_factor(10.0)
            .with_deadline(Duration::MAX);
        assert_eq!(uncapped.deadline, None, "no deadline");
        assert_eq!(uncapped.base_delay(3), Duration::from_secs(100));
        // 10^99 s and 10^(u32::MAX) s do not fit a Duration: never.
        assert_eq!(uncapped.base_delay(100), Duration::MAX);
        assert_eq!(uncapped.base_delay(u32::MAX), Duration::MAX);
        let never = Retry::attempts(3).with_backoff(Duration::MAX, Duration::MAX);
        for jitter in [Jitter::None, Jitter::Full, Jitter::Equal] {
            let r = never.clone().with_jitter(jitter);
            assert_eq!(r.delay(1, &mut r.rng()), Duration::MAX);
            assert_eq!(r.delay(u32::MAX, &mut r.rng()), Duration::MAX);
        }
        // Just below never, jitter saturates instead of overflowing.
        let huge = Duration::new(u64::MAX, 0);
        let r = Retry::attempts(3)
            .with_backoff(huge, huge)
            .with_jitter(Jitter::Equal);
        assert!(r.delay(1, &mut r.rng()) >= Duration::from_nanos(u64::MAX / 2));
    }

    #[test]
    fn bad_values_are_refused_by_validate() {
        assert_eq!(Retry::default().validate(), Ok(()));
        assert_eq!(
            Retry::attempts(u32::MAX)
                .with_deadline(Duration::MAX)
                .validate(),
            Ok(())
        );
        let field = |r: Retry| r.validate().unwrap_err().field();
        assert_eq!(field(Retry::attempts(0)), "retry.max_attempts");
        assert_eq!(
            field(Retry::attempts(1).with_factor(f64::NAN)),
            "retry.factor"
        );
        assert_eq!(field(Retry::attempts(1).with_factor(0.5)), "retry.factor");
        assert_eq!(
            field(Retry::attempts(1).with_backoff(Duration::from_secs(2), Duration::from_secs(1))),
            "retry.min_delay"
        );
        let err = Retry::attempts(1)
            .with_deadline(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert_eq!(err, ConfigError::zero("retry.deadline"));
        assert_eq!((err.operator(), err.stage()), (None, None));
    }
}
