//! [`BreakerConfig`]: every threshold and timing of a circuit breaker,
//! readable from a configuration file (serde).

use std::num::NonZeroU32;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::base::config::{ConfigError, nonzero};

/// The sliding window the failure and slow-call rates are measured over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// The last `n` calls.
    Count(NonZeroU32),
    /// The calls of the last duration, counted in buckets of a second (a
    /// tenth of a window shorter than 10 s, a thousandth of one longer
    /// than 1,000 s): a call leaves the window no later than the duration
    /// after it was recorded, and at most one bucket earlier.
    #[serde(with = "humantime_serde")]
    Time(Duration),
}

/// Slow calls: a call taking `duration` or longer is slow; a slow-call
/// rate at or above `rate` opens the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SlowCall {
    /// From this long on, a call is slow.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// The share of slow calls (0 < rate ≤ 1) that opens the breaker.
    pub rate: f64,
}

/// Exponential backoff of the open duration for openings in a row.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OpenBackoff {
    /// Each opening since the breaker last closed multiplies the open
    /// duration by this (≥ 1).
    pub factor: f64,
    /// The longest open duration. `Duration::MAX` (or any value too
    /// large to add to the clock) lets the backoff grow until the open
    /// duration is endless: open until [`reset`](crate::resilience::breaker::Breaker::reset).
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

/// The thresholds and timings of a [`Breaker`](crate::resilience::breaker::Breaker).
///
/// # Default
///
/// A window of the last 100 calls; open at a failure rate of 50 % once the
/// window holds at least 10 calls; no consecutive-failure or slow-call
/// threshold; open for 30 s without backoff; 3 trial calls in half-open,
/// all 3 must succeed to close; no minimum interval between transitions;
/// the last 64 transitions kept for the audit trail.
///
/// In a TOML file (every field optional; durations as `"30s"`, `"500ms"`):
///
/// ```toml
/// window = { count = 100 }          # or { time = "60s" }
/// failure_rate = 0.5
/// consecutive_failures = 5
/// slow_call = { duration = "2s", rate = 0.8 }
/// minimum_calls = 10
/// half_open_calls = 3
/// successes_to_close = 3
/// open_for = "30s"
/// open_backoff = { factor = 2.0, max = "5m" }
/// min_transition_interval = "1s"
/// audit_capacity = 64
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// The window rates are measured over.
    pub window: Window,
    /// The failure rate (0 < rate ≤ 1) that opens a closed breaker.
    pub failure_rate: f64,
    /// Open after this many failures in a row, whatever the rate.
    pub consecutive_failures: Option<NonZeroU32>,
    /// The slow-call threshold, if slow calls count.
    pub slow_call: Option<SlowCall>,
    /// Rates are not judged before the window holds this many calls. It
    /// may exceed a count window's size, as in Resilience4j; the rates are
    /// then never judged (only `consecutive_failures` opens the breaker).
    pub minimum_calls: NonZeroU32,
    /// Trial calls permitted in half-open.
    pub half_open_calls: NonZeroU32,
    /// Successful trial calls that close the breaker (at most
    /// `half_open_calls`).
    pub successes_to_close: NonZeroU32,
    /// How long the breaker stays open before trial calls.
    /// `Duration::MAX`, or any value whose end the clock cannot hold (a
    /// TOML `"18446744073709551615s"`), means open until a manual
    /// [`reset`](crate::resilience::breaker::Breaker::reset): the breaker never goes
    /// half-open by itself. Values beyond `Duration`'s range are rejected
    /// when the file is read.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Longer open durations for openings in a row.
    pub open_backoff: Option<OpenBackoff>,
    /// No two automatic transitions closer than this (anti-flapping).
    /// `Duration::MAX` means the breaker never moves by itself, only by
    /// hand.
    #[serde(with = "humantime_serde")]
    pub min_transition_interval: Duration,
    /// How many transitions the audit trail keeps.
    pub audit_capacity: usize,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        let n = |v: u32| NonZeroU32::new(v).expect("not zero");
        BreakerConfig {
            window: Window::Count(n(100)),
            failure_rate: 0.5,
            consecutive_failures: None,
            slow_call: None,
            minimum_calls: n(10),
            half_open_calls: n(3),
            successes_to_close: n(3),
            open_for: Duration::from_secs(30),
            open_backoff: None,
            min_transition_interval: Duration::ZERO,
            audit_capacity: 64,
        }
    }
}

fn rate(r: f64, field: &'static str) -> Result<(), ConfigError> {
    if r > 0.0 && r <= 1.0 {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            "must be a rate above 0 and at most 1",
        ))
    }
}

/// A field's name: as in the configuration file, or under `breaker.` when
/// an operator or a gate that holds the breaker reports it.
macro_rules! field {
    ($prefixed:expr, $name:literal) => {
        if $prefixed {
            concat!("breaker.", $name)
        } else {
            $name
        }
    };
}

impl BreakerConfig {
    /// Checks the values that types cannot. A
    /// [`Breaker`](crate::resilience::breaker::Breaker) is checked when a
    /// [`CircuitBreaker`](crate::resilience::breaker::CircuitBreaker) (or a
    /// [`HealthGate`](crate::HealthGate)) using it is piped, with the
    /// fields under `breaker.` (`breaker.failure_rate`); a
    /// [`BreakerRegistry`](crate::resilience::breaker::BreakerRegistry)
    /// checks each configuration it reads.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the field (as in the configuration file): a
    /// rate outside (0, 1], a zero window or open duration, more successes
    /// to close than trial calls, a backoff factor below 1.
    ///
    /// ```
    /// use streamz::breaker::BreakerConfig;
    ///
    /// let mut config = BreakerConfig::default();
    /// config.failure_rate = 1.5;
    /// let err = config.validate().unwrap_err();
    /// assert_eq!(err.field(), "failure_rate");
    /// assert_eq!(err.to_string(), "`failure_rate` must be a rate above 0 and at most 1");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check(false)
    }

    /// [`validate`](BreakerConfig::validate), with the fields under
    /// `breaker.` if `prefixed`.
    pub(crate) fn check(&self, prefixed: bool) -> Result<(), ConfigError> {
        rate(self.failure_rate, field!(prefixed, "failure_rate"))?;
        if let Some(slow) = self.slow_call {
            rate(slow.rate, field!(prefixed, "slow_call.rate"))?;
            nonzero(slow.duration, field!(prefixed, "slow_call.duration"))?;
        }
        if let Window::Time(d) = self.window {
            nonzero(d, field!(prefixed, "window"))?;
        }
        nonzero(self.open_for, field!(prefixed, "open_for"))?;
        if self.successes_to_close > self.half_open_calls {
            return Err(ConfigError::new(
                field!(prefixed, "successes_to_close"),
                "must not exceed half_open_calls",
            ));
        }
        if let Some(b) = self.open_backoff {
            if !(b.factor >= 1.0 && b.factor.is_finite()) {
                return Err(ConfigError::new(
                    field!(prefixed, "open_backoff.factor"),
                    "must be a finite number of at least 1",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_named_as_in_the_file_or_under_breaker() {
        assert_eq!(BreakerConfig::default().validate(), Ok(()));
        let config = BreakerConfig {
            open_for: Duration::ZERO,
            ..BreakerConfig::default()
        };
        assert_eq!(
            config.validate().unwrap_err(),
            ConfigError::zero("open_for")
        );
        assert_eq!(
            config.check(true).unwrap_err(),
            ConfigError::zero("breaker.open_for")
        );
        let mut config = BreakerConfig {
            window: Window::Count(NonZeroU32::new(5).unwrap()),
            ..BreakerConfig::default()
        };
        // More calls to judge than the window holds: allowed, never judged.
        assert_eq!(config.validate(), Ok(()));
        config.window = Window::Time(Duration::ZERO);
        assert_eq!(config.check(true).unwrap_err().field(), "breaker.window");
        let config = BreakerConfig {
            successes_to_close: NonZeroU32::new(4).unwrap(),
            ..BreakerConfig::default()
        };
        assert_eq!(
            config.check(true).unwrap_err().field(),
            "breaker.successes_to_close"
        );
        let mut config = BreakerConfig {
            slow_call: Some(SlowCall {
                duration: Duration::ZERO,
                rate: 0.5,
            }),
            ..BreakerConfig::default()
        };
        assert_eq!(config.validate().unwrap_err().field(), "slow_call.duration");
        config.slow_call = Some(SlowCall {
            duration: Duration::from_secs(1),
            rate: 0.0,
        });
        assert_eq!(config.validate().unwrap_err().field(), "slow_call.rate");
        let config = BreakerConfig {
            open_backoff: Some(OpenBackoff {
                factor: f64::INFINITY,
                max: Duration::MAX,
            }),
            ..BreakerConfig::default()
        };
        assert_eq!(
            config.check(true).unwrap_err().field(),
            "breaker.open_backoff.factor"
        );
    }
}
