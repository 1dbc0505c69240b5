//! [`CircuitBreaker`]: an async call per item, guarded by a [`Breaker`].

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::base::config::ConfigError;
use crate::base::error::{BoxError, ErrorKind, StreamError};
use crate::flow::Flow;
use crate::flow::processor::Processor;
use crate::flow::step::{Emit, Item, Step};
use crate::resilience::async_mapper::AsyncMapper;
use crate::resilience::breaker::lane::{Classify, Lane};
use crate::resilience::breaker::{Breaker, BreakerState, CallOutcome, OwnedPermit};

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
/// [`CircuitBreaker::new`] is an [`AsyncMapper`] with a breaker
/// ([`AsyncMapper::with_breaker`]), concurrency 1 and the name
/// `circuit_breaker`: every setting of the mapper applies, and composes
/// with the breaker (see below). With [`OpenPolicy::Reject`] the mapper
/// asks the breaker before it builds an item's future, so a refused item
/// costs no call at all; with [`OpenPolicy::Wait`] the future is built
/// with `&item` and polled once a permit is given. A call that panics
/// counts as a failure; a call cancelled by an abort releases its permit,
/// so a half-open breaker is never left waiting for it.
///
/// # With the mapper's timeout, retries and order
///
/// - [`with_timeout`](AsyncMapper::with_timeout): a call cut off by the
///   timeout is a `timed_out` error item and a **failure** of the
///   breaker's call.
/// - [`with_retry`](AsyncMapper::with_retry): every attempt asks the
///   breaker and reports to it. An attempt the breaker refuses ends the
///   item as `circuit_open`, with its attempts so far.
/// - [`unordered`](AsyncMapper::unordered): items leave as their calls
///   end.
/// - [`classify`](AsyncMapper::classify): which results count as
///   successes, failures, or neither.
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
/// [`OpenPolicy::Reject`], concurrency 1, ordered, no timeout, no retries,
/// named `circuit_breaker`.
///
/// # Validation
///
/// Checked when the stage is piped: the mapper's settings (a zero
/// concurrency is refused with field `concurrency`) and the breaker's
/// configuration (fields under `breaker.`, see [`Breaker::validate`]),
/// refused with a [`ConfigError`] naming `CircuitBreaker` and the stage.
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
///
/// With a timeout and retries, unordered:
///
/// ```
/// use std::time::Duration;
/// use streamz::breaker::{Breaker, BreakerConfig, CircuitBreaker};
/// use streamz::{ErrorKind, Retry};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let breaker = Breaker::new("ledger", BreakerConfig::default());
/// // A ledger that hangs: every attempt times out.
/// let stage = CircuitBreaker::new(breaker.clone(), |_: &u32| std::future::pending::<Result<u32, std::io::Error>>())
///     .with_timeout(Duration::from_millis(100))
///     .with_retry(Retry::attempts(2).with_timeouts_retried(true))
///     .with_concurrency(4)
///     .unordered();
/// let out = streamz::iter(0..3u32).pipe(stage).collect().await;
/// assert!(out.iter().all(|r| r.as_ref().unwrap_err().kind() == ErrorKind::TimedOut));
/// assert_eq!(breaker.metrics().failures, 6); // every attempt failed the breaker's call
/// # }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct CircuitBreaker;

impl CircuitBreaker {
    /// Calls `f` for each item through `breaker`: an [`AsyncMapper`]
    /// named `circuit_breaker` with concurrency 1 and
    /// [`with_breaker(breaker)`](AsyncMapper::with_breaker).
    // A mapper, so that every setting of the mapper applies to the stage.
    #[allow(clippy::new_ret_no_self)]
    pub fn new<In, Out, E, F, Fut>(breaker: Breaker, f: F) -> AsyncMapper<In, Out, E, F>
    where
        F: Fn(&In) -> Fut,
        Fut: Future<Output = Result<Out, E>>,
    {
        let mut mapper = AsyncMapper::new(f)
            .named("circuit_breaker")
            .with_concurrency(1)
            .with_breaker(breaker);
        mapper.operator = "CircuitBreaker";
        mapper
    }
}

/// How results count for the breaker, over the mapper's types.
pub(crate) type Classifier<Out, E> = Arc<dyn Fn(Result<&Out, &E>) -> CallOutcome + Send + Sync>;

/// A mapper's breaker settings ([`AsyncMapper::with_breaker`]).
pub(crate) struct BreakerSettings<Out, E> {
    pub(crate) breaker: Option<Breaker>,
    pub(crate) policy: OpenPolicy,
    pub(crate) classify: Option<Classifier<Out, E>>,
}

impl<Out, E> Default for BreakerSettings<Out, E> {
    fn default() -> Self {
        BreakerSettings {
            breaker: None,
            policy: OpenPolicy::Reject,
            classify: None,
        }
    }
}

impl<In, Out, E, F> AsyncMapper<In, Out, E, F> {
    /// Guards every attempt with `breaker` (feature `circuit-breaker`):
    /// see [`CircuitBreaker`] for how it composes with the mapper's
    /// timeout, retries and order. The breaker's configuration is checked
    /// when the mapper is piped (fields under `breaker.`).
    pub fn with_breaker(mut self, breaker: Breaker) -> Self {
        self.breaker.breaker = Some(breaker);
        self
    }

    /// Sets what happens to items while the breaker refuses calls
    /// ([`OpenPolicy::Reject`] by default). Without a breaker it does
    /// nothing.
    pub fn with_open_policy(mut self, policy: OpenPolicy) -> Self {
        self.breaker.policy = policy;
        self
    }

    /// Decides how each call's result counts for the breaker: a success,
    /// a failure or neither ([`CallOutcome::Ignored`]); by default a value
    /// is a success and an error a failure. Resilience4j's
    /// `recordExceptions`/`ignoreExceptions` (on errors) and
    /// `recordResult` (on values). Only the breaker's count changes: the
    /// item still becomes its value or its error (retried as usual). A
    /// classifier that panics counts the call as failed and fails the item
    /// as `panicked`. Without a breaker it does nothing.
    ///
    /// ```
    /// use std::num::NonZeroU32;
    /// use streamz::breaker::{Breaker, BreakerConfig, BreakerState, CallOutcome, CircuitBreaker};
    ///
    /// #[derive(Debug)]
    /// enum Http { NotFound, Unavailable }
    /// impl std::fmt::Display for Http {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { write!(f, "{self:?}") }
    /// }
    /// impl std::error::Error for Http {}
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut config = BreakerConfig::default();
    /// config.consecutive_failures = NonZeroU32::new(3);
    /// let breaker = Breaker::new("catalogue", config);
    /// // Every lookup is a 404: the items fail, the service is fine.
    /// let stage = CircuitBreaker::new(breaker.clone(), |_: &u32| async { Err::<u32, _>(Http::NotFound) })
    ///     .classify(|result: Result<&u32, &Http>| match result {
    ///         Err(Http::NotFound) => CallOutcome::Ignored,
    ///         Err(Http::Unavailable) => CallOutcome::Failure,
    ///         Ok(_) => CallOutcome::Success,
    ///     });
    /// let out = streamz::iter(0..10u32).pipe(stage).collect().await;
    /// assert!(out.iter().all(Result::is_err));
    /// assert_eq!(breaker.state(), BreakerState::Closed);
    /// assert_eq!((breaker.metrics().ignored, breaker.metrics().failures), (10, 0));
    /// # }
    /// ```
    pub fn classify<C>(mut self, classify: C) -> Self
    where
        C: Fn(Result<&Out, &E>) -> CallOutcome + Send + Sync + 'static,
    {
        self.breaker.classify = Some(Arc::new(classify));
        self
    }
}

/// Runs a mapper that has a breaker.
pub(crate) fn spawn<In, Out, E, F, Fut>(
    mut mapper: AsyncMapper<In, Out, E, F>,
    breaker: Breaker,
    input: Flow<In>,
) -> Flow<Out>
where
    In: Send + 'static,
    Out: Send + 'static,
    E: Into<BoxError> + Send + 'static,
    F: Fn(&In) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Out, E>> + Send + 'static,
{
    let settings = std::mem::take(&mut mapper.breaker);
    let classify = settings.classify.map(|c| -> Classify {
        Box::new(move |result| match result {
            Ok(v) => c(Ok(v
                .downcast_ref::<Out>()
                .expect("the mapper's output type"))),
            Err(e) => c(Err(e.downcast_ref::<E>().expect("the mapper's error type"))),
        })
    });
    // The mapper asks the breaker before it builds each call, on the
    // breaker's lock-free lane while it is closed (lane.rs).
    mapper.spawn_guarded(input, Lane::new(breaker, classify, settings.policy))
}

impl CircuitBreaker {
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
