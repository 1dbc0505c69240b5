//! One slot of the mapper: an item, the future of its current attempt and
//! its timer, and the policies every slot shares (timeouts, retries, the
//! guard).

use crate::base::ack::Ack;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::adaptive::{Controller, Outcome as Observed};
use super::{DependencySignal, Guard, Predicate, TimeoutError, Verdict};
use crate::base::error::{BoxError, ErrorKind, StreamError};
use crate::base::telemetry::{MapperSeries, Stopwatch};
use crate::base::time;
use crate::resilience::retry::Retry;

/// What a slot is doing.
pub(super) enum Phase<Out> {
    Free,
    /// An attempt's future is running.
    Running,
    /// Waiting for the backoff timer before the next attempt.
    Backoff,
    /// The next attempt is held back: the dependency is down, or the
    /// guard (a breaker that waits) has no permit yet.
    Waiting,
    /// The outcome, waiting to be emitted.
    Done(Outcome<Out>),
}

pub(super) enum Outcome<Out> {
    Value(Out),
    /// A failure this stage produced.
    Failed(StreamError),
    /// An upstream error, passed on unchanged.
    Passed(StreamError),
}

/// One unit of concurrency, reused item after item.
pub(super) struct Slot<In, Out, E, Fut, T> {
    pub(super) item: Option<In>,
    /// The item's acknowledgement, given to what the item becomes.
    pub(super) ack: Ack,
    /// While the slot waits its backoff: the failure it retries, which
    /// becomes the item's final error if shutdown ends the wait.
    pub(super) last: Option<Failure<E>>,
    /// The guard's token for the running attempt.
    pub(super) token: Option<T>,
    pub(super) fut: Pin<Box<Option<Fut>>>,
    /// The running attempt's time limit, or the backoff.
    pub(super) timer: time::Timer,
    pub(super) attempts: u32,
    pub(super) first_start: Option<Instant>,
    /// Times the running attempt (feature `metrics`).
    pub(super) clock: Stopwatch,
    /// When the running attempt started, for adaptive concurrency.
    pub(super) began: Option<Instant>,
    /// When the item's first attempt failed, by the wall clock (for the
    /// error's record when a retry does not save it).
    pub(super) first_failure: Option<SystemTime>,
    pub(super) phase: Phase<Out>,
}

impl<In, Out, E, Fut, T> Slot<In, Out, E, Fut, T> {
    pub(super) fn new() -> Self {
        Slot {
            item: None,
            ack: Ack::none(),
            last: None,
            token: None,
            fut: Box::pin(None),
            timer: time::Timer::new(),
            attempts: 0,
            first_start: None,
            clock: Stopwatch::default(),
            began: None,
            first_failure: None,
            phase: Phase::Free,
        }
    }

    pub(super) fn busy(&self) -> bool {
        matches!(self.phase, Phase::Running | Phase::Backoff | Phase::Waiting)
    }
}

/// What every slot shares: the function, the policies and the counts of the
/// chunk in progress.
pub(super) struct Policy<F, E, G> {
    pub(super) f: F,
    pub(super) guard: G,
    /// Whether the dependency is up: attempts wait while it is down.
    pub(super) hold: Option<DependencySignal>,
    /// A graceful shutdown started: a waiting retry ends at once with its
    /// last error, and no retry is scheduled any more.
    pub(super) shutting_down: bool,
    pub(super) timeout: Option<Duration>,
    pub(super) retry: Retry,
    pub(super) retryable: Option<Predicate<E>>,
    /// Adaptive concurrency: the limit's controller, and which errors
    /// say the dependency is overloaded.
    pub(super) adaptive: Option<Controller>,
    pub(super) overload: Option<Predicate<E>>,
    pub(super) rng: fastrand::Rng,
    pub(super) stage: Arc<str>,
    /// Attempts retried and timed out since the driver last took them.
    pub(super) retries: u64,
    pub(super) timeouts: u64,
    /// Exported series (feature `metrics`).
    pub(super) series: MapperSeries,
}

/// Why an attempt failed.
pub(super) enum Failure<E> {
    Error(E),
    TimedOut(TimeoutError),
}

impl<F, E, G: Guard> Policy<F, E, G> {
    fn stage(&self) -> String {
        self.stage.to_string()
    }

    /// Starts the next attempt of the slot's item, or holds it back
    /// ([`Phase::Waiting`]) while the dependency is down or the guard
    /// says wait; after a shutdown a held attempt ends the item instead.
    pub(super) fn start<In, Out, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        cx: &mut Context<'_>,
    ) where
        In: Send + 'static,
        E: Into<BoxError>,
        F: Fn(&In) -> Fut,
    {
        // A retry held past the item's deadline ends with the failure it
        // was retrying: no call is made after the deadline.
        let deadline = self.deadline(slot);
        if slot.last.is_some() && deadline.is_some_and(|end| Instant::now() >= end) {
            let last = slot.last.take().expect("checked");
            return self.give_up(slot, last);
        }
        let down = self.hold.as_mut().is_some_and(|hold| !hold.poll_up(cx));
        let admitted = if down {
            Poll::Pending
        } else {
            self.guard
                .poll_admit(cx, &mut slot.token, self.shutting_down)
        };
        let refused = match admitted {
            Poll::Ready(Ok(())) => None,
            Poll::Ready(Err(refused)) => Some(refused),
            Poll::Pending if !self.shutting_down => {
                // Held: woken by the signal or the guard, or at the deadline.
                slot.phase = Phase::Waiting;
                slot.timer.set(deadline);
                return;
            }
            Poll::Pending => {
                // Shutdown while held: the failure it was retrying, or,
                // never tried, `gate_closed` (no attempt counted).
                if let Some(last) = slot.last.take() {
                    return self.give_up(slot, last);
                }
                let reason = self.hold.as_ref().map_or("down", |h| h.reason()).to_owned();
                let err = StreamError::new(ErrorKind::GateClosed, self.stage())
                    .with_source(DependencyDown { reason });
                return self.fail(slot, err);
            }
        };
        // A retry refused at shutdown ends with the failure it was retrying.
        if self.shutting_down && refused.is_some() {
            if let Some(last) = slot.last.take() {
                return self.give_up(slot, last);
            }
        }
        if slot.attempts > 0 {
            self.retries += 1;
        }
        slot.attempts += 1;
        slot.last = None;
        if let Some(refused) = refused {
            let err = StreamError::new(kind_of(&*refused), self.stage()).with_source(refused);
            self.fail(slot, err);
            return;
        }
        let item = slot.item.as_ref().expect("a started slot holds its item");
        match catch_unwind(AssertUnwindSafe(|| (self.f)(item))) {
            Ok(fut) => {
                slot.fut.as_mut().set(Some(fut));
                slot.clock = Stopwatch::start();
                if self.adaptive.is_some() {
                    slot.began = Some(Instant::now());
                }
            }
            Err(payload) => {
                self.end_attempt(slot, None);
                let err = StreamError::panicked(&self.stage, payload);
                self.fail(slot, err);
                return;
            }
        }
        slot.phase = Phase::Running;
        if self.timeout.is_none() && self.retry.deadline.is_none() {
            slot.timer.set(None);
            return;
        }
        let now = Instant::now();
        slot.first_start.get_or_insert(now);
        slot.timer.set(time::earliest(
            self.timeout.and_then(|t| time::after(now, t)),
            self.deadline(slot),
        ));
    }

    /// When the item's retry deadline ends, if it has one and has started.
    fn deadline<In, Out, Fut>(&self, slot: &Slot<In, Out, E, Fut, G::Token>) -> Option<Instant> {
        match (self.retry.deadline, slot.first_start) {
            (Some(d), Some(first)) => time::after(first, d),
            _ => None,
        }
    }

    /// Ends the item with a failure of this stage.
    pub(super) fn fail<In, Out, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        err: StreamError,
    ) where
        In: Send + 'static,
    {
        let mut err = err.with_attempts(slot.attempts);
        if let Some(first) = slot.first_failure.take() {
            err = err.with_first_time(first);
        }
        if let Some(item) = slot.item.take() {
            err = err.with_item(item);
        }
        slot.phase = Phase::Done(Outcome::Failed(err));
    }

    /// An attempt failed: retry after a backoff, or give up.
    fn failed<In, Out, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        failure: Failure<E>,
    ) where
        In: Send + 'static,
        E: Into<BoxError>,
    {
        let retryable = match &failure {
            Failure::Error(e) => match &self.retryable {
                None => true,
                Some(p) => match catch_unwind(AssertUnwindSafe(|| p(e))) {
                    Ok(r) => r,
                    Err(payload) => {
                        let err = StreamError::panicked(&self.stage, payload);
                        return self.fail(slot, err);
                    }
                },
            },
            Failure::TimedOut(TimeoutError::Attempt { .. }) => self.retry.retry_timeouts,
            Failure::TimedOut(TimeoutError::Deadline { .. }) => false,
        };
        if retryable && slot.attempts < self.retry.max_attempts {
            slot.first_failure.get_or_insert_with(SystemTime::now);
            // No retry is scheduled after shutdown.
            if !self.shutting_down {
                if let Some(at) = self.retry_at(slot) {
                    slot.timer.set(Some(at));
                    slot.last = Some(failure);
                    slot.phase = Phase::Backoff;
                    return;
                }
            }
        }
        self.give_up(slot, failure);
    }

    /// When the slot's next attempt starts, if it can: not if the delay
    /// never ends, nor at or after the item's deadline.
    fn retry_at<In, Out, Fut>(
        &mut self,
        slot: &Slot<In, Out, E, Fut, G::Token>,
    ) -> Option<Instant> {
        let delay = self.retry.delay(slot.attempts, &mut self.rng);
        let at = time::after(Instant::now(), delay)?;
        self.deadline(slot).is_none_or(|end| at < end).then_some(at)
    }

    /// Ends the item with `failure` as its final error.
    fn give_up<In, Out, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        failure: Failure<E>,
    ) where
        In: Send + 'static,
        E: Into<BoxError>,
    {
        let err = match failure {
            Failure::Error(e) => {
                let source: BoxError = e.into();
                StreamError::new(kind_of(&*source), self.stage()).with_source(source)
            }
            Failure::TimedOut(t) => {
                StreamError::new(ErrorKind::TimedOut, self.stage()).with_source(t)
            }
        };
        self.fail(slot, err);
    }

    /// Drives a busy slot as far as it goes; true once it is done.
    pub(super) fn poll<In, Out, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        cx: &mut Context<'_>,
    ) -> bool
    where
        In: Send + 'static,
        Out: 'static,
        E: Into<BoxError> + 'static,
        F: Fn(&In) -> Fut,
        Fut: Future<Output = std::result::Result<Out, E>>,
    {
        loop {
            match slot.phase {
                Phase::Running => {
                    let fut = slot.fut.as_mut();
                    let polled = catch_unwind(AssertUnwindSafe(|| {
                        fut.as_pin_mut()
                            .expect("a running slot has a future")
                            .poll(cx)
                    }));
                    match polled {
                        Ok(Poll::Pending) => {
                            let Poll::Ready(limit) = slot.timer.poll_due(cx) else {
                                return false;
                            };
                            slot.fut.as_mut().set(None);
                            slot.clock.record(&self.series.calls);
                            let failure = self.timeout_cause(slot, limit);
                            // The attempt's own timeout says the dependency
                            // is slow; the item's retry deadline says nothing.
                            let observed = match failure {
                                TimeoutError::Attempt { .. } => Observed::Overload,
                                TimeoutError::Deadline { .. } => Observed::Neither,
                            };
                            self.observe(slot, observed);
                            // A timed-out call is a failed call to a guard.
                            self.end_attempt(slot, Some(Verdict::Failure));
                            self.timeouts += 1;
                            self.failed(slot, Failure::TimedOut(failure));
                        }
                        Ok(Poll::Ready(Ok(value))) => {
                            slot.fut.as_mut().set(None);
                            slot.clock.record(&self.series.calls);
                            self.observe(slot, Observed::Success);
                            if let Err(panicked) = self.settle(slot, Ok(&value)) {
                                self.fail(slot, panicked);
                                continue;
                            }
                            slot.item = None;
                            slot.phase = Phase::Done(Outcome::Value(value));
                        }
                        Ok(Poll::Ready(Err(e))) => {
                            slot.fut.as_mut().set(None);
                            slot.clock.record(&self.series.calls);
                            if let Err(panicked) = self.observe_error(slot, &e) {
                                self.end_attempt(slot, Some(Verdict::Failure));
                                self.fail(slot, panicked);
                                continue;
                            }
                            match self.settle(slot, Err(&e)) {
                                Ok(()) => self.failed(slot, Failure::Error(e)),
                                Err(panicked) => self.fail(slot, panicked),
                            }
                        }
                        Err(payload) => {
                            slot.fut.as_mut().set(None);
                            slot.clock.record(&self.series.calls);
                            self.observe(slot, Observed::Neither);
                            self.end_attempt(slot, Some(Verdict::Failure));
                            let err = StreamError::panicked(&self.stage, payload);
                            self.fail(slot, err);
                        }
                    }
                }
                Phase::Backoff => {
                    // Shutdown ends the wait at once (before the timer is
                    // looked at: no attempt starts after shutdown).
                    if self.shutting_down {
                        slot.timer.set(None);
                        let last = slot.last.take().expect("a waiting slot keeps its failure");
                        self.give_up(slot, last);
                        continue;
                    }
                    if slot.timer.poll_due(cx).is_pending() {
                        return false;
                    }
                    self.start(slot, cx);
                }
                Phase::Waiting => {
                    // Its deadline passed while held (`start` ends it).
                    let _ = slot.timer.poll_due(cx);
                    self.start(slot, cx);
                    if matches!(slot.phase, Phase::Waiting) {
                        return false;
                    }
                }
                Phase::Done(_) => return true,
                Phase::Free => return false,
            }
        }
    }

    /// Tells the adaptive limit, if any, how the slot's attempt ended.
    fn observe<In, Out, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        observed: Observed,
    ) {
        let (Some(adaptive), Some(began)) = (&mut self.adaptive, slot.began.take()) else {
            return;
        };
        adaptive.ended(Instant::now(), began, observed);
    }

    /// Tells the adaptive limit, if any, of an error: an overload if the
    /// user's predicate says so. A predicate that panics fails the item
    /// as `panicked` (returned).
    fn observe_error<In, Out, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        error: &E,
    ) -> Result<(), StreamError> {
        if self.adaptive.is_none() {
            return Ok(());
        }
        let overload = match &self.overload {
            None => false,
            Some(p) => match catch_unwind(AssertUnwindSafe(|| p(error))) {
                Ok(overload) => overload,
                Err(payload) => {
                    self.observe(slot, Observed::Neither);
                    return Err(StreamError::panicked(&self.stage, payload));
                }
            },
        };
        let observed = if overload {
            Observed::Overload
        } else {
            Observed::Neither
        };
        self.observe(slot, observed);
        Ok(())
    }

    /// Tells the guard how the slot's attempt ended: as judged
    /// (`Some`), or with no outcome (`None`: a panic before the call).
    pub(super) fn end_attempt<In, Out, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        verdict: Option<Verdict>,
    ) {
        if let Some(token) = slot.token.take() {
            match verdict {
                Some(verdict) => self.guard.settle(token, verdict),
                None => self.guard.cancel(token),
            }
        }
    }

    /// Ends the slot's attempt with `result`, judged by the guard. A
    /// judgement that panics counts as a failed call and fails the item
    /// as `panicked` (returned).
    fn settle<In, Out: 'static, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        result: std::result::Result<&Out, &E>,
    ) -> Result<(), StreamError>
    where
        E: 'static,
    {
        if slot.token.is_none() {
            return Ok(());
        }
        if !self.guard.judges() {
            let verdict = if result.is_ok() {
                Verdict::Success
            } else {
                Verdict::Failure
            };
            self.end_attempt(slot, Some(verdict));
            return Ok(());
        }
        let result = result
            .map(|v| v as &dyn std::any::Any)
            .map_err(|e| e as &dyn std::any::Any);
        match catch_unwind(AssertUnwindSafe(|| self.guard.judge(result))) {
            Ok(verdict) => {
                self.end_attempt(slot, Some(verdict));
                Ok(())
            }
            Err(payload) => {
                self.end_attempt(slot, Some(Verdict::Failure));
                Err(StreamError::panicked(&self.stage, payload))
            }
        }
    }

    /// Which limit cut the attempt off at `at`: the per-attempt timeout,
    /// or the total deadline if that came first.
    fn timeout_cause<In, Out, Fut>(
        &self,
        slot: &Slot<In, Out, E, Fut, G::Token>,
        at: Instant,
    ) -> TimeoutError {
        match self.retry.deadline {
            Some(limit) if self.deadline(slot) == Some(at) => TimeoutError::Deadline { limit },
            _ => TimeoutError::Attempt {
                limit: self.timeout.unwrap_or_default(),
            },
        }
    }
}

/// Why an item held for its dependency ended without a call: a graceful
/// shutdown came while the dependency was down
/// ([`AsyncMapper::hold_while_down`](super::AsyncMapper::hold_while_down)).
/// The source of the item's `gate_closed` error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the dependency was down ({reason}) when the pipeline shut down; the call was not made")]
pub struct DependencyDown {
    reason: String,
}

impl DependencyDown {
    /// The dependency signal's last reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// The kind of an item's final error: `circuit_open` when a circuit
/// breaker refused the call, `failed` otherwise.
pub(super) fn kind_of(error: &(dyn std::error::Error + Send + Sync + 'static)) -> ErrorKind {
    if error.is::<DependencyDown>() {
        return ErrorKind::GateClosed;
    }
    #[cfg(feature = "circuit-breaker")]
    if error.is::<crate::resilience::breaker::CircuitOpen>() {
        return ErrorKind::CircuitOpen;
    }
    let _ = error;
    ErrorKind::Failed
}
