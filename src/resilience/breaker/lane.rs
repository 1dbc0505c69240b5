//! The breaker's fast lane: how [`CircuitBreaker`](super::CircuitBreaker)
//! guards calls inside its mapper's task without taking the breaker's lock
//! per call.
//!
//! The breaker publishes one atomic word ([`Machine::lane`]): its
//! generation, and whether it is in a state where any call is let through
//! and a quick success (not slow) cannot change a decision — closed, with
//! nothing pending and a count window holding at least the minimum calls,
//! or disabled. While the word says so, [`Lane`] admits a call with one
//! atomic load and keeps its quick success back; it reports the kept-back
//! successes (and the admissions) in one locked step when a failure, a slow
//! call or a refusal needs the lock, and whenever the task is about to
//! wait (at most one wake-up of the task later). Its own outcomes reach
//! the breaker in the order they happened.
//!
//! Why this loses nothing: a success reported at the flush is the same as
//! a call that finished at the flush. Calls admitted in between were
//! admitted by the state without that success, which is what the state
//! was at that point of the order. A call admitted on the lane in a
//! generation that has since ended is counted and otherwise ignored, as
//! for any permit.
//!
//! Everything else (half-open trials, open and forced-open states, time
//! windows) takes the lock as [`Breaker::try_acquire`] does; a half-open
//! trial holds an [`OwnedPermit`], so it frees its slot even if the task
//! is dropped.
//!
//! [`Machine::lane`]: super::machine::Machine::lane

use std::time::Duration;

use tokio::time::Instant;

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::machine::Ticket;
use super::{Breaker, CallOutcome, OpenPolicy, OwnedPermit};
use crate::base::error::BoxError;
use crate::base::time;
use crate::resilience::async_mapper::{Guard, Verdict};

/// A classifier of results, over the mapper's output and error types
/// (erased: the mapper's guard does not know them).
pub(crate) type Classify = Box<dyn Fn(Result<&dyn Any, &dyn Any>) -> CallOutcome + Send>;

/// The per-task side of the fast lane (a [`Guard`] of the mapper).
pub(crate) struct Lane {
    breaker: Breaker,
    /// A success slower than this is a slow call (and is never kept back).
    slow_after: Option<Duration>,
    /// Calls admitted on the lane, not yet counted by the breaker.
    permitted: u64,
    /// Lane calls dropped without an outcome, not yet counted.
    cancelled: u64,
    /// Quick successes kept back: the generation they belong to and how
    /// many.
    quick: Option<(u64, u64)>,
    /// How results count, if not a value for a success and an error for a
    /// failure.
    classify: Option<Classify>,
    /// What a refused attempt does.
    policy: OpenPolicy,
    /// While attempts wait for a permit ([`OpenPolicy::Wait`]): woken by
    /// the breaker's next change, and at the end of its open period.
    waiter: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    timer: time::Timer,
}

/// A call's hold on the breaker while it runs.
pub(crate) enum Token {
    /// Admitted on the lane, durations not measured: the generation.
    Lane(u64),
    /// Admitted outside a half-open trial: the generation, and when the
    /// call started if durations matter.
    Call {
        generation: u64,
        start: Option<Instant>,
    },
    /// A half-open trial: a permit that frees its slot when dropped (boxed:
    /// trials are rare, and a small token is cheap to move per call).
    Trial(Box<OwnedPermit>),
}

impl Lane {
    pub(crate) fn new(breaker: Breaker, classify: Option<Classify>, policy: OpenPolicy) -> Self {
        let slow_after = breaker.config().slow_call.map(|s| s.duration);
        Lane {
            breaker,
            slow_after,
            permitted: 0,
            cancelled: 0,
            quick: None,
            classify,
            policy,
            waiter: None,
            timer: time::Timer::new(),
        }
    }

    fn flush_now(&mut self) {
        if self.permitted == 0 && self.cancelled == 0 && self.quick.is_none() {
            return;
        }
        let (permitted, cancelled, quick) = (self.permitted, self.cancelled, self.quick.take());
        self.permitted = 0;
        self.cancelled = 0;
        self.breaker.with_machine(|m, now, out| {
            m.stats.permitted += permitted;
            m.stats.cancelled += cancelled;
            if let Some((generation, n)) = quick {
                m.record_quick(generation, n, now, out);
            }
        });
    }
}

impl Guard for Lane {
    type Token = Token;

    // Always inlined into the mapper's `start`: the lane's fast path is a
    // few instructions, a call costs as many again (the slow paths are
    // out of line: `admit_locked`, `poll_permit`).
    #[inline(always)]
    fn poll_admit(
        &mut self,
        cx: &mut Context<'_>,
        token: &mut Option<Token>,
        stopping: bool,
    ) -> Poll<Result<(), BoxError>> {
        if let Some(generation) = self.breaker.lane() {
            self.permitted += 1;
            *token = Some(match self.breaker.start() {
                None => Token::Lane(generation),
                start => Token::Call { generation, start },
            });
            return Poll::Ready(Ok(()));
        }
        if self.policy == OpenPolicy::Reject || stopping {
            *token = Some(self.admit_locked()?);
            return Poll::Ready(Ok(()));
        }
        self.poll_permit(cx, token)
    }

    #[inline]
    fn judges(&self) -> bool {
        self.classify.is_some()
    }

    fn judge(&self, result: Result<&dyn Any, &dyn Any>) -> Verdict {
        let ok = result.is_ok();
        match self.classify.as_ref().map(|classify| classify(result)) {
            None if ok => Verdict::Success,
            None => Verdict::Failure,
            Some(CallOutcome::Success) => Verdict::Success,
            Some(CallOutcome::Failure) => Verdict::Failure,
            Some(CallOutcome::Ignored) => Verdict::Ignored,
        }
    }

    #[inline]
    fn settle(&mut self, token: Token, verdict: Verdict) {
        let ok = match verdict {
            Verdict::Success => true,
            Verdict::Failure => false,
            Verdict::Ignored => return self.ignore(token),
        };
        if let Token::Lane(generation) = token {
            if ok && self.breaker.lane() == Some(generation) {
                if let Some((g, n)) = &mut self.quick {
                    if *g == generation {
                        *n += 1;
                        return;
                    }
                }
            }
        }
        self.settle_slowly(token, ok);
    }

    fn cancel(&mut self, token: Token) {
        match token {
            // Dropping the permit releases the trial slot.
            Token::Trial(permit) => {
                self.flush_now();
                drop(permit);
            }
            Token::Lane(_) | Token::Call { .. } => self.cancelled += 1,
        }
    }

    fn flush(&mut self) {
        self.flush_now();
    }
}

impl Lane {
    /// [`OpenPolicy::Wait`]: a permit, or `Pending` until the breaker
    /// changes (a transition, a freed trial slot) or its open period ends.
    #[cold]
    fn poll_permit(
        &mut self,
        cx: &mut Context<'_>,
        token: &mut Option<Token>,
    ) -> Poll<Result<(), BoxError>> {
        loop {
            // Registered before asking, so a change in between wakes us.
            let waiter = self.waiter.get_or_insert_with(|| {
                let inner = self.breaker.inner.clone();
                Box::pin(async move { inner.changed.notified().await })
            });
            if waiter.as_mut().poll(cx).is_ready() {
                self.waiter = None;
                continue;
            }
            self.flush_now();
            let acquired = self.breaker.with_machine(|m, now, out| {
                m.acquire(now, out).map_err(|refusal| {
                    // A call that waits is not refused.
                    m.uncount_rejection();
                    refusal.retry_at.or(m.next_tick())
                })
            });
            match acquired {
                Ok(ticket) => {
                    self.waiter = None;
                    *token = Some(self.token(ticket));
                    return Poll::Ready(Ok(()));
                }
                Err(retry) => {
                    let at = retry.and_then(|at| {
                        time::after(Instant::now(), at.saturating_sub(self.breaker.now()))
                    });
                    self.timer.set(at);
                    if self.timer.poll_due(cx).is_ready() {
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn token(&self, ticket: Ticket) -> Token {
        let start = self.breaker.start();
        if ticket.half_open {
            Token::Trial(Box::new(OwnedPermit {
                breaker: self.breaker.clone(),
                ticket,
                start,
                done: false,
            }))
        } else {
            Token::Call {
                generation: ticket.generation,
                start,
            }
        }
    }

    /// A call whose outcome is ignored: released uncounted, after what was
    /// kept back.
    #[cold]
    fn ignore(&mut self, token: Token) {
        self.flush_now();
        match token {
            Token::Trial(permit) => permit.report(CallOutcome::Ignored),
            Token::Lane(generation) | Token::Call { generation, .. } => {
                let ticket = Ticket {
                    generation,
                    half_open: false,
                };
                self.breaker.release(ticket, true);
            }
        }
    }

    /// Admission when the lane is shut: under the breaker's lock.
    #[cold]
    #[inline(never)]
    fn admit_locked(&mut self) -> Result<Token, BoxError> {
        // What was kept back goes first, in order.
        self.flush_now();
        let ticket = self.breaker.acquire_ticket()?;
        Ok(self.token(ticket))
    }

    /// Everything [`settle`](Guard::settle)'s inline path does not cover:
    /// the first success of a batch, timed calls, failures, trials.
    #[inline(never)]
    fn settle_slowly(&mut self, token: Token, ok: bool) {
        let (generation, start) = match token {
            Token::Trial(permit) => {
                self.flush_now();
                permit.record(ok);
                return;
            }
            Token::Lane(generation) => (generation, None),
            Token::Call { generation, start } => (generation, start),
        };
        let took = start.map_or(Duration::ZERO, |s| s.elapsed());
        let quick = ok && self.slow_after.is_none_or(|d| took < d);
        if quick && self.breaker.lane() == Some(generation) {
            match &mut self.quick {
                Some((g, n)) if *g == generation => *n += 1,
                _ => {
                    self.flush_now();
                    self.quick = Some((generation, 1));
                }
            }
            return;
        }
        // A failure, a slow call, or the lane shut since: under the lock,
        // after what was kept back.
        self.flush_now();
        let ticket = Ticket {
            generation,
            half_open: false,
        };
        self.breaker.finish(ticket, !ok, took);
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.flush_now();
    }
}
