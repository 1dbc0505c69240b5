//! [`CircuitBreaker`]: an async call per item, guarded by a [`Breaker`].

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::async_mapper::AsyncMapper;
use crate::breaker::{Breaker, BreakerState};
use crate::config::ConfigError;
use crate::error::BoxError;
use crate::flow::Flow;
use crate::processor::Processor;

/// Why a call was not made: the breaker refused it. The source of a
/// `circuit_open` error item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker `{breaker}` is {state:?}; the call was not made")]
pub struct CircuitOpen {
    pub(crate) breaker: String,
    pub(crate) state: BreakerState,
    pub(crate) retry_in: Option<Duration>,
}

impl CircuitOpen {
    /// The breaker's name.
    pub fn breaker(&self) -> &str {
        &self.breaker
    }

    /// Its state when it refused.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// How long until it may permit calls again, if it knows.
    pub fn retry_in(&self) -> Option<Duration> {
        self.retry_in
    }
}

/// What [`CircuitBreaker`] does with an item while its breaker refuses
/// calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OpenPolicy {
    /// Fail the item at once: a `circuit_open` error item carrying it, so
    /// a dead-letter queue keeps it (the default).
    #[default]
    Reject,
    /// Wait until the breaker permits a call (the end of the open period,
    /// a free trial slot). The stage's slots fill and upstream feels
    /// backpressure.
    Wait,
}

/// Calls an async function per item through a [`Breaker`]: each call asks
/// the breaker first and reports its outcome and duration (a failure is
/// an `Err`; a slow call is measured, not cut off).
///
/// Read the warnings in [the module docs](crate::breaker) first.
///
/// Runs like an [`AsyncMapper`] (the item's future is built with `&item`,
/// then polled only once a permit is given): `concurrency` calls at a
/// time, in order. A call cancelled by an abort releases its permit, so a
/// half-open breaker is never left waiting for it.
///
/// # Default
///
/// [`OpenPolicy::Reject`], concurrency 1, named `circuit_breaker`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::breaker::{Breaker, BreakerConfig, CircuitBreaker};
/// use streamz::ErrorKind;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), streamz::ConfigError> {
/// let mut config = BreakerConfig::default();
/// config.consecutive_failures = std::num::NonZeroU32::new(2);
/// let breaker = Breaker::new("ledger", config)?;
///
/// // A ledger that is down: two failures open the breaker, and the rest
/// // of the items fail fast without a call.
/// let stage = CircuitBreaker::new(breaker.clone(), |n: &u32| {
///     let n = *n;
///     async move { if n < 100 { Err("ledger unavailable") } else { Ok(n) } }
/// });
/// let out = streamz::iter([1u32, 2, 3, 4]).pipe(stage).collect().await;
/// let kinds: Vec<ErrorKind> = out.iter().map(|r| r.as_ref().unwrap_err().kind()).collect();
/// assert_eq!(kinds, [ErrorKind::Failed, ErrorKind::Failed, ErrorKind::CircuitOpen, ErrorKind::CircuitOpen]);
/// assert_eq!(breaker.metrics().rejected, 2);
/// # Ok(()) }
/// ```
pub struct CircuitBreaker<F> {
    breaker: Breaker,
    f: F,
    policy: OpenPolicy,
    concurrency: usize,
    name: Cow<'static, str>,
}

impl<F> fmt::Debug for CircuitBreaker<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("breaker", &self.breaker)
            .field("policy", &self.policy)
            .field("concurrency", &self.concurrency)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<F> CircuitBreaker<F> {
    /// Calls `f` for each item through `breaker`.
    pub fn new(breaker: Breaker, f: F) -> Self {
        CircuitBreaker {
            breaker,
            f,
            policy: OpenPolicy::Reject,
            concurrency: 1,
            name: Cow::Borrowed("circuit_breaker"),
        }
    }

    /// Sets what happens to items while the breaker refuses calls.
    pub fn when_open(mut self, policy: OpenPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How many calls may run at once (1 by default).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for zero.
    pub fn with_concurrency(mut self, n: usize) -> Result<Self, ConfigError> {
        if n == 0 {
            return Err(ConfigError::Zero {
                field: "concurrency",
            });
        }
        self.concurrency = n;
        Ok(self)
    }

    /// Names the stage (for counters, spans and errors).
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }
}

impl<In, Out, E, F, Fut> Processor<In, Out> for CircuitBreaker<F>
where
    In: Send + 'static,
    Out: Send + 'static,
    E: Into<BoxError> + Send + 'static,
    F: Fn(&In) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Out, E>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn process(self, input: Flow<In>) -> Flow<Out> {
        let CircuitBreaker {
            breaker,
            f,
            policy,
            concurrency,
            name,
        } = self;
        let guarded = move |item: &In| {
            let call = f(item);
            let breaker = breaker.clone();
            async move {
                let permit = match policy {
                    OpenPolicy::Wait => breaker.acquire().await,
                    _ => breaker.try_acquire().map_err(BoxError::from)?,
                };
                let result = call.await;
                permit.record(result.is_ok());
                result.map_err(Into::into)
            }
        };
        AsyncMapper::new(guarded)
            .named(name)
            .with_concurrency(concurrency)
            .expect("the concurrency was checked when set")
            .process(input)
    }
}
