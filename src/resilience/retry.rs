//! [`Retry`]: how an [`AsyncMapper`](crate::AsyncMapper) tries an item
//! again, with exponential backoff, jitter and an optional total deadline.

use std::num::NonZeroU32;
use std::time::Duration;

use crate::base::config::ConfigError;

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
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::{Jitter, Retry};
///
/// let retry = Retry::attempts(5)?
///     .with_backoff(Duration::from_millis(10), Duration::from_secs(1))?
///     .with_factor(3.0)?
///     .with_jitter(Jitter::None)
///     .with_deadline(Duration::from_secs(5))?;
/// let delays: Vec<Duration> = (1..5).map(|n| retry.base_delay(n)).collect();
/// assert_eq!(delays, [10, 30, 90, 270].map(Duration::from_millis));
/// # Ok::<(), streamz::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    pub(crate) max_attempts: NonZeroU32,
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
            max_attempts: NonZeroU32::MIN,
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
    /// `attempts(1)` never retries).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] if `max_attempts` is zero.
    ///
    /// ```
    /// use streamz::{ConfigError, Retry};
    ///
    /// assert_eq!(Retry::attempts(0).unwrap_err(), ConfigError::Zero { field: "max_attempts" });
    /// ```
    pub fn attempts(max_attempts: u32) -> Result<Self, ConfigError> {
        let max_attempts = NonZeroU32::new(max_attempts).ok_or(ConfigError::Zero {
            field: "max_attempts",
        })?;
        Ok(Retry {
            max_attempts,
            ..Retry::default()
        })
    }

    /// The delay before the first retry and the cap on any delay.
    ///
    /// `max` of `Duration::MAX` leaves the delays uncapped; `min` of
    /// `Duration::MAX` means never retry (see [No limit](Retry#no-limit)).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] if `min` is longer than `max`.
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Result<Self, ConfigError> {
        if min > max {
            return Err(ConfigError::Invalid {
                field: "min_delay",
                reason: "must not be longer than max_delay",
            });
        }
        self.min_delay = min;
        self.max_delay = max;
        Ok(self)
    }

    /// How much longer each delay is than the one before.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] if `factor` is below 1.0 or not finite.
    ///
    /// ```
    /// assert!(streamz::Retry::attempts(3).unwrap().with_factor(0.5).is_err());
    /// ```
    pub fn with_factor(mut self, factor: f64) -> Result<Self, ConfigError> {
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(ConfigError::Invalid {
                field: "factor",
                reason: "must be a finite number of at least 1.0",
            });
        }
        self.factor = factor;
        Ok(self)
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
    /// deadline (the default).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] if `deadline` is zero.
    pub fn with_deadline(mut self, deadline: Duration) -> Result<Self, ConfigError> {
        if deadline.is_zero() {
            return Err(ConfigError::Zero { field: "deadline" });
        }
        self.deadline = (deadline != Duration::MAX).then_some(deadline);
        Ok(self)
    }

    /// Whether an attempt that timed out is retried (`true` by default: a
    /// timeout is usually a transient condition).
    pub fn retry_timeouts(mut self, retry: bool) -> Self {
        self.retry_timeouts = retry;
        self
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
            .unwrap()
            .with_backoff(Duration::from_millis(100), Duration::from_millis(500))
            .unwrap();
        let d: Vec<u128> = (1..=5).map(|n| r.base_delay(n).as_millis()).collect();
        assert_eq!(d, [100, 200, 400, 500, 500]);
        assert_eq!(r.base_delay(u32::MAX), Duration::from_millis(500));
    }

    #[test]
    fn jitter_stays_in_its_range_and_repeats_with_a_seed() {
        let base = Retry::attempts(3)
            .unwrap()
            .with_backoff(Duration::from_millis(100), Duration::from_secs(1))
            .unwrap()
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
            .unwrap()
            .with_backoff(Duration::from_secs(1), Duration::MAX)
            .unwrap()
            .with_factor(10.0)
            .unwrap()
            .with_deadline(Duration::MAX)
            .unwrap();
        assert_eq!(uncapped.deadline, None, "no deadline");
        assert_eq!(uncapped.base_delay(3), Duration::from_secs(100));
        // 10^99 s and 10^(u32::MAX) s do not fit a Duration: never.
        assert_eq!(uncapped.base_delay(100), Duration::MAX);
        assert_eq!(uncapped.base_delay(u32::MAX), Duration::MAX);
        let never = Retry::attempts(3)
            .unwrap()
            .with_backoff(Duration::MAX, Duration::MAX)
            .unwrap();
        for jitter in [Jitter::None, Jitter::Full, Jitter::Equal] {
            let r = never.clone().with_jitter(jitter);
            assert_eq!(r.delay(1, &mut r.rng()), Duration::MAX);
            assert_eq!(r.delay(u32::MAX, &mut r.rng()), Duration::MAX);
        }
        // Just below never, jitter saturates instead of overflowing.
        let huge = Duration::new(u64::MAX, 0);
        let r = Retry::attempts(3)
            .unwrap()
            .with_backoff(huge, huge)
            .unwrap()
            .with_jitter(Jitter::Equal);
        assert!(r.delay(1, &mut r.rng()) >= Duration::from_nanos(u64::MAX / 2));
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Retry::attempts(1).unwrap().with_factor(f64::NAN).is_err());
        assert!(
            Retry::attempts(1)
                .unwrap()
                .with_backoff(Duration::from_secs(2), Duration::from_secs(1))
                .is_err()
        );
        assert_eq!(
            Retry::attempts(1).unwrap().with_deadline(Duration::ZERO),
            Err(ConfigError::Zero { field: "deadline" })
        );
    }
}
