//! [`CircuitBreaker`]: an async call per item, guarded by a [`Breaker`].

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::base::config::{ConfigError, nonzero};
use crate::base::error::{BoxError, ErrorKind, StreamError};
use crate::flow::Flow;
use crate::flow::processor::Processor;
use crate::flow::step::{Emit, Item, Step};
use crate::resilience::async_mapper::AsyncMapper;
use crate::resilience::breaker::lane::Lane;
use crate::resilience::breaker::{Breaker, BreakerState, OwnedPermit};

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
/// Read the warnings in [the module docs](crate::resilience::breaker) first.
///
/// Runs like an [`AsyncMapper`]: `concurrency` calls at a time, in order.
/// With [`OpenPolicy::Reject`] the mapper asks the breaker before it builds
/// an item's future, so a refused item costs no call at all; with
/// [`OpenPolicy::Wait`] the future is built with `&item` and polled once a
/// permit is given. A call that panics counts as a failure; a call
/// cancelled by an abort releases its permit, so a half-open breaker is
/// never left waiting for it.
///
/// While the breaker is closed (count window, enough calls seen) the stage
/// asks it without taking its lock, and reports quick successes in one
/// step when its task is about to wait: the breaker's decisions are the
/// same as with a permit per call (a property test checks that call for
/// call), but [`Breaker::metrics`] may lag a running stage by the
/// successes of one wake-up of its task.
///
/// # Default
///
/// [`OpenPolicy::Reject`], concurrency 1, named `circuit_breaker`.
///
/// # Validation
///
/// Checked when the stage is piped: a zero concurrency (field
/// `concurrency`) or an invalid breaker configuration (fields under
/// `breaker.`, see [`Breaker::validate`]) is refused with a
/// [`ConfigError`] naming `CircuitBreaker` and the stage.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::breaker::{Breaker, BreakerConfig, CircuitBreaker};
/// use streamz::ErrorKind;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let mut config = BreakerConfig::default();
/// config.consecutive_failures = std::num::NonZeroU32::new(2);
/// let breaker = Breaker::new("ledger", config);
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
/// # }
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
    pub fn with_open_policy(mut self, policy: OpenPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How many calls may run at once (1 by default). Zero is refused
    /// when the stage is piped ([`ConfigError`], field `concurrency`).
    ///
    /// ```
    /// use streamz::breaker::{Breaker, BreakerConfig, CircuitBreaker};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let breaker = Breaker::new("ledger", BreakerConfig::default());
    /// let stage = CircuitBreaker::new(breaker, |n: &u32| std::future::ready(Ok::<_, std::io::Error>(*n)))
    ///     .with_concurrency(0);
    /// let err = streamz::iter([1u32]).try_pipe(stage).unwrap_err();
    /// assert_eq!((err.operator(), err.stage(), err.field()), (Some("CircuitBreaker"), Some("circuit_breaker"), "concurrency"));
    /// # }
    /// ```
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
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

    fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.concurrency, "concurrency")
            .and_then(|()| self.breaker.validate())
            .map_err(|e| e.in_stage("CircuitBreaker", &self.name))
    }

    fn process(self, input: Flow<In>) -> Flow<Out> {
        let CircuitBreaker {
            breaker,
            f,
            policy,
            concurrency,
            name,
        } = self;
        if policy == OpenPolicy::Reject {
            // The mapper asks the breaker before it builds each call, on
            // the breaker's lock-free lane while it is closed (lane.rs).
            return AsyncMapper::new(f)
                .named(name)
                .with_concurrency(concurrency)
                .spawn_guarded(input, Lane::new(breaker));
        }
        // Waiting for a permit needs a future per call.
        let guarded = move |item: &In| {
            let call = f(item);
            let breaker = breaker.clone();
            async move {
                let permit = breaker.acquire().await;
                let result = call.await;
                permit.record(result.is_ok());
                result.map_err(Into::into)
            }
        };
        AsyncMapper::new(guarded)
            .named(name)
            .with_concurrency(concurrency)
            .process(input)
    }
}

impl CircuitBreaker<()> {
    /// Guards a whole inner processor instead of a call: each value asks
    /// `breaker` for a permit before it enters `inner`, and the item
    /// `inner` emits in its place reports the outcome (a value is a
    /// success, an error a failure). Items are matched by position, so
    /// errors from upstream, which pass through `inner` unchanged, settle
    /// nothing. Refused values become `circuit_open` error items carrying
    /// them, which pass through `inner` the same way. A call's duration
    /// (for a slow-call threshold) runs from admission to output, so it
    /// includes time queued inside `inner`.
    ///
    /// `inner` must emit exactly one item per input, in order: a map, a
    /// `try_map`, an ordered [`AsyncMapper`], a [`Stage`](crate::Stage) of
    /// such a step. (A filter or a batcher would pair outcomes with the
    /// wrong permits.) Refused items cannot wait here: the policy is
    /// always [`OpenPolicy::Reject`].
    ///
    /// When piped, the breaker's configuration is checked (fields under
    /// `breaker.`, refused as the `CircuitBreaker` stage), then `inner`'s
    /// own settings (refused as `inner` names itself).
    ///
    /// Admission runs ahead of the outcomes by what `inner` holds: a whole
    /// chunk is admitted before the first of its outcomes is known. Small
    /// chunks on this part of the pipeline ([`EdgeConfig`](crate::EdgeConfig))
    /// make the breaker react sooner.
    ///
    /// ```
    /// use std::num::NonZeroU32;
    /// use streamz::breaker::{Breaker, BreakerConfig, BreakerState, CircuitBreaker};
    /// use streamz::{EdgeConfig, ErrorKind, Pipeline, Stage, TryMap};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut config = BreakerConfig::default();
    /// config.consecutive_failures = NonZeroU32::new(2);
    /// let breaker = Breaker::new("parser", config);
    /// let parse = Stage::new("parse", TryMap::new(|s: &String| s.parse::<u32>()));
    /// // One item per chunk, so outcomes follow admissions closely.
    /// let pipeline = Pipeline::with_edge(EdgeConfig::new(1, 1));
    /// let out = pipeline
    ///     .iter((0..20).map(|_| String::from("not a number")))
    ///     .pipe(CircuitBreaker::around(breaker.clone(), parse))
    ///     .collect()
    ///     .await;
    /// let refused = out.iter().filter(|r| r.as_ref().unwrap_err().kind() == ErrorKind::CircuitOpen).count();
    /// assert!(refused > 10, "{refused}");
    /// assert_eq!(breaker.state(), BreakerState::Open);
    /// # }
    /// ```
    pub fn around<P>(breaker: Breaker, inner: P) -> Guarded<P> {
        Guarded {
            breaker,
            inner,
            name: Cow::Borrowed("circuit_breaker"),
        }
    }
}

/// An inner processor guarded by a breaker; see [`CircuitBreaker::around`].
pub struct Guarded<P> {
    breaker: Breaker,
    inner: P,
    name: Cow<'static, str>,
}

impl<P> fmt::Debug for Guarded<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("breaker", &self.breaker)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<P> Guarded<P> {
    /// Names the admitting stage (the stage refused items' errors name);
    /// the settling stage is named `<name>.settle`.
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }
}

/// What each item inside the inner processor holds, oldest first: a
/// permit for a value, nothing for an error passing through. Outputs are
/// matched by position, so an upstream error can never settle a permit.
type Slots = Arc<Mutex<VecDeque<Option<OwnedPermit>>>>;

fn next_slot(slots: &Slots) -> Option<Option<OwnedPermit>> {
    slots.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
}

fn push_slot(slots: &Slots, slot: Option<OwnedPermit>) {
    slots
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push_back(slot);
}

/// Before the inner processor: a permit per value, or a refusal.
struct Admit {
    breaker: Breaker,
    slots: Slots,
}

impl<T: Send + 'static> Step<T, T> for Admit {
    fn on_item(&mut self, item: Item<'_, T>, out: &mut Emit<'_, T>) {
        match self.breaker.try_acquire() {
            Ok(permit) => {
                push_slot(&self.slots, Some(permit.into_owned()));
                out.emit(item.take());
            }
            Err(open) => {
                push_slot(&self.slots, None);
                let err = StreamError::new(ErrorKind::CircuitOpen, out.stage().to_owned())
                    .with_source(open)
                    .with_item(item.take())
                    .with_attempts(0); // refused before any call
                out.error(err);
            }
        }
    }

    fn on_error(&mut self, error: Item<'_, StreamError>, out: &mut Emit<'_, T>) {
        push_slot(&self.slots, None);
        out.pass(error.take());
    }
}

/// After the inner processor: the item in each position settles that
/// position's permit (a value is a success, an error a failure).
struct Settle {
    slots: Slots,
}

impl<T: Send + 'static> Step<T, T> for Settle {
    fn on_item(&mut self, item: Item<'_, T>, out: &mut Emit<'_, T>) {
        // Popped first: listeners run without the queue locked.
        if let Some(Some(permit)) = next_slot(&self.slots) {
            permit.record(true);
        }
        out.emit(item.take());
    }

    fn on_error(&mut self, error: Item<'_, StreamError>, out: &mut Emit<'_, T>) {
        if let Some(Some(permit)) = next_slot(&self.slots) {
            permit.record(false);
        }
        out.pass(error.take());
    }

    fn on_end(&mut self, out: &mut Emit<'_, T>) {
        let left = std::mem::take(&mut *self.slots.lock().unwrap_or_else(|e| e.into_inner()));
        if left.iter().any(Option::is_some) {
            tracing::warn!(
                stage = out.stage(),
                items = left.len(),
                "the guarded processor emitted fewer items than it took; their permits are released"
            );
        }
    }
}

impl<In, Out, P> Processor<In, Out> for Guarded<P>
where
    In: Send + 'static,
    Out: Send + 'static,
    P: Processor<In, Out>,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), ConfigError> {
        // An error of `inner` names `inner` already (`in_stage` keeps it).
        self.breaker
            .validate()
            .and_then(|()| self.inner.validate())
            .map_err(|e| e.in_stage("CircuitBreaker", &self.name))
    }

    fn process(self, input: Flow<In>) -> Flow<Out> {
        let slots = Slots::default();
        let settle = format!("{}.settle", self.name);
        input
            .step(
                self.name,
                Admit {
                    breaker: self.breaker,
                    slots: slots.clone(),
                },
            )
            .pipe(self.inner)
            .step(settle, Settle { slots })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::breaker::BreakerConfig;

    type Refusal = (Option<&'static str>, Option<String>, &'static str);

    fn refused<P: Processor<u32, u32>>(p: P) -> Refusal {
        let err = crate::iter([1u32]).try_pipe(p).map(drop).unwrap_err();
        (err.operator(), err.stage().map(str::to_owned), err.field())
    }

    fn call(n: &u32) -> std::future::Ready<Result<u32, std::io::Error>> {
        std::future::ready(Ok(*n))
    }

    fn breaker(config: BreakerConfig) -> Breaker {
        Breaker::new("ledger", config)
    }

    #[test]
    fn a_zero_concurrency_or_a_bad_breaker_is_refused_when_piped() {
        let at = |field| (Some("CircuitBreaker"), Some("post".to_owned()), field);
        let ok = CircuitBreaker::new(breaker(BreakerConfig::default()), call).named("post");
        assert_eq!(Processor::<u32, u32>::validate(&ok), Ok(()));
        assert_eq!(refused(ok.with_concurrency(0)), at("concurrency"));
        let config = BreakerConfig {
            failure_rate: 2.0,
            ..BreakerConfig::default()
        };
        let stage = CircuitBreaker::new(breaker(config), call).named("post");
        assert_eq!(refused(stage), at("breaker.failure_rate"));
        let stage = CircuitBreaker::new(breaker(config), call)
            .with_open_policy(OpenPolicy::Wait)
            .named("post");
        assert_eq!(refused(stage), at("breaker.failure_rate"));
    }

    #[test]
    fn a_guarded_stage_checks_its_breaker_then_its_inner_processor() {
        let config = BreakerConfig {
            open_for: Duration::ZERO,
            ..BreakerConfig::default()
        };
        let inner = AsyncMapper::new(call).named("inner");
        let guarded = CircuitBreaker::around(breaker(config), inner).named("guard");
        assert_eq!(
            refused(guarded),
            (
                Some("CircuitBreaker"),
                Some("guard".to_owned()),
                "breaker.open_for"
            )
        );
        let inner = AsyncMapper::new(call).with_concurrency(0).named("inner");
        let guarded = CircuitBreaker::around(breaker(BreakerConfig::default()), inner);
        assert_eq!(
            refused(guarded),
            (Some("AsyncMapper"), Some("inner".to_owned()), "concurrency")
        );
    }
}
