//! The breaker's state machine, free of locks and clocks: every call gets
//! the time as a [`Duration`] since the breaker was made, so tests (and
//! loom models) drive it exactly.

use std::collections::VecDeque;
use std::time::Duration;

use crate::resilience::breaker::config::{BreakerConfig, Window};
use crate::resilience::breaker::{BreakerState, Transition};

/// The time since the breaker was made, read from its clock only when
/// needed and then once: a closed breaker with a count window and no
/// slow-call threshold never reads the clock.
pub(crate) struct Now<'a> {
    read: &'a dyn Fn() -> Duration,
    at: Option<Duration>,
}

impl<'a> Now<'a> {
    pub(crate) fn new(read: &'a dyn Fn() -> Duration) -> Self {
        Now { read, at: None }
    }

    pub(crate) fn get(&mut self) -> Duration {
        *self.at.get_or_insert_with(|| (self.read)())
    }
}

/// Calls and their outcomes in the sliding window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

impl Counts {
    fn add(&mut self, failed: bool, slow: bool) {
        self.calls += 1;
        self.failures += u64::from(failed);
        self.slow += u64::from(slow);
    }

    fn sub(&mut self, other: Counts) {
        self.calls -= other.calls;
        self.failures -= other.failures;
        self.slow -= other.slow;
    }
}

/// The sliding window: the last `n` calls, or the calls of the last
/// duration in buckets of at most a second (see [`bucket_width`]). Its
/// memory is bounded either way.
#[derive(Debug)]
enum Outcomes {
    Count {
        size: usize,
        ring: VecDeque<(bool, bool)>,
        totals: Counts,
    },
    Time {
        /// The window's length.
        span: Duration,
        bucket: Duration,
        /// Each bucket's number (time / bucket) and counts; oldest first.
        buckets: VecDeque<(u64, Counts)>,
        totals: Counts,
    },
}

/// The most buckets a time window keeps (a window longer than this many
/// seconds gets buckets longer than a second).
const MAX_BUCKETS: u128 = 1000;

/// A time window's bucket: a second, as Resilience4j's, for windows of 10
/// s to 1,000 s; a tenth of shorter windows; a thousandth of longer ones.
/// A call leaves the window when its bucket's start is `span` in the
/// past: never later than `span` after it was recorded, and at most one
/// bucket earlier.
fn bucket_width(span: Duration) -> Duration {
    let nanos = span.as_nanos();
    let second = Duration::from_secs(1).as_nanos();
    let width = (nanos / 10)
        .min(second)
        .max(nanos.div_ceil(MAX_BUCKETS))
        .max(1);
    Duration::from_nanos(u64::try_from(width).unwrap_or(u64::MAX))
}

impl Outcomes {
    fn new(window: Window) -> Self {
        match window {
            Window::Count(size) => Outcomes::Count {
                size: size.get() as usize,
                ring: VecDeque::with_capacity(size.get() as usize),
                totals: Counts::default(),
            },
            Window::Time(span) => Outcomes::Time {
                span,
                bucket: bucket_width(span),
                buckets: VecDeque::new(),
                totals: Counts::default(),
            },
        }
    }

    /// Adds an outcome; returns the calls now in the window.
    fn record(&mut self, now: &mut Now<'_>, failed: bool, slow: bool) -> u64 {
        self.expire(now);
        match self {
            Outcomes::Count { size, ring, totals } => {
                if ring.len() == *size {
                    if let Some((f, s)) = ring.pop_front() {
                        totals.sub(Counts {
                            calls: 1,
                            failures: u64::from(f),
                            slow: u64::from(s),
                        });
                    }
                }
                ring.push_back((failed, slow));
                totals.add(failed, slow);
                totals.calls
            }
            Outcomes::Time {
                bucket,
                buckets,
                totals,
                ..
            } => {
                let n = bucket_of(now.get(), *bucket);
                match buckets.back_mut() {
                    Some((b, counts)) if *b == n => counts.add(failed, slow),
                    _ => {
                        let mut counts = Counts::default();
                        counts.add(failed, slow);
                        buckets.push_back((n, counts));
                    }
                }
                totals.add(failed, slow);
                totals.calls
            }
        }
    }

    /// Drops the buckets that fell out of a time window.
    /// Records `n` quick successes at once (a count window only; the
    /// caller checked).
    fn add_successes(&mut self, n: u64) {
        if let Outcomes::Count { size, ring, totals } = self {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n >= *size {
                ring.clear();
                *totals = Counts::default();
            }
            let n = n.min(*size);
            let evicted = (ring.len() + n).saturating_sub(*size);
            for (f, s) in ring.drain(..evicted) {
                totals.sub(Counts {
                    calls: 1,
                    failures: u64::from(f),
                    slow: u64::from(s),
                });
            }
            ring.extend(std::iter::repeat_n((false, false), n));
            totals.calls += n as u64;
        }
    }

    /// Whether this is a count window holding at least `minimum` calls:
    /// one where a quick success can no longer open the breaker.
    fn settled(&self, minimum: u32) -> bool {
        matches!(self, Outcomes::Count { totals, .. } if totals.calls >= u64::from(minimum))
    }

    fn expire(&mut self, now: &mut Now<'_>) {
        if let Outcomes::Time {
            span,
            bucket,
            buckets,
            totals,
        } = self
        {
            let now = now.get();
            while let Some(&(b, counts)) = buckets.front() {
                // A bucket leaves once its start is a whole window ago, so
                // no call stays longer than the window.
                let start = u128::from(b) * bucket.as_nanos();
                let start = Duration::from_nanos(u64::try_from(start).unwrap_or(u64::MAX));
                if start.saturating_add(*span) > now {
                    break;
                }
                totals.sub(counts);
                buckets.pop_front();
            }
        }
    }

    fn totals(&mut self, now: &mut Now<'_>) -> Counts {
        self.expire(now);
        match self {
            Outcomes::Count { totals, .. } | Outcomes::Time { totals, .. } => *totals,
        }
    }

    fn clear(&mut self) {
        match self {
            Outcomes::Count { ring, totals, .. } => {
                ring.clear();
                *totals = Counts::default();
            }
            Outcomes::Time {
                buckets, totals, ..
            } => {
                buckets.clear();
                *totals = Counts::default();
            }
        }
    }
}

fn bucket_of(now: Duration, bucket: Duration) -> u64 {
    u64::try_from(now.as_nanos() / bucket.as_nanos()).unwrap_or(u64::MAX)
}

/// A permission to make one call, as the machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    /// The state's generation when the permit was given: an outcome from
    /// an earlier generation no longer moves the state.
    pub(crate) generation: u64,
    pub(crate) half_open: bool,
}

/// Why a call was not permitted, and when to ask again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) state: BreakerState,
    /// When the breaker may permit calls again, if it knows.
    pub(crate) retry_at: Option<Duration>,
}

#[derive(Debug)]
pub(crate) struct Machine {
    pub(crate) config: BreakerConfig,
    pub(crate) state: BreakerState,
    /// When the current state began.
    since: Duration,
    /// Until when an open breaker refuses calls; `None`: until a manual
    /// transition (an open duration of `Duration::MAX`, or one that ends
    /// beyond what a `Duration` since the start can hold).
    open_until: Option<Duration>,
    /// Openings since the breaker was last closed (for the backoff).
    opens_in_a_row: u32,
    outcomes: Outcomes,
    consecutive_failures: u32,
    half_open_in_flight: u32,
    half_open_done: u32,
    half_open_successes: u32,
    pub(crate) generation: u64,
    /// Calls refused since the current state began.
    pub(crate) rejected_in_state: u64,
    /// A transition decided but held back by the minimum interval.
    pending: Option<(BreakerState, String)>,
    pub(crate) stats: Stats,
    /// `stats` as last exported (feature `metrics`).
    #[cfg(feature = "metrics")]
    pub(crate) published: Stats,
}

/// Counters over the breaker's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    pub(crate) permitted: u64,
    pub(crate) rejected: u64,
    pub(crate) successes: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
    pub(crate) cancelled: u64,
    /// Permitted calls whose outcome the caller chose to ignore.
    pub(crate) ignored: u64,
    pub(crate) transitions: u64,
}

impl Machine {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Machine {
            outcomes: Outcomes::new(config.window),
            config,
            state: BreakerState::Closed,
            since: Duration::ZERO,
            open_until: Some(Duration::ZERO),
            opens_in_a_row: 0,
            consecutive_failures: 0,
            half_open_in_flight: 0,
            half_open_done: 0,
            half_open_successes: 0,
            generation: 0,
            rejected_in_state: 0,
            pending: None,
            stats: Stats::default(),
            #[cfg(feature = "metrics")]
            published: Stats::default(),
        }
    }

    /// Asks to make a call at `now`. Transitions it causes (open to
    /// half-open) are appended to `out`.
    pub(crate) fn acquire(
        &mut self,
        now: &mut Now<'_>,
        out: &mut Vec<Transition>,
    ) -> Result<Ticket, Refusal> {
        self.tick(now, out);
        let granted = match self.state {
            BreakerState::Closed | BreakerState::Disabled => Some(false),
            BreakerState::HalfOpen => {
                let used = self.half_open_in_flight + self.half_open_done;
                if used < self.config.half_open_calls.get() && self.pending.is_none() {
                    self.half_open_in_flight += 1;
                    Some(true)
                } else {
                    None
                }
            }
            BreakerState::Open | BreakerState::ForcedOpen => None,
        };
        match granted {
            Some(half_open) => {
                self.stats.permitted += 1;
                Ok(Ticket {
                    generation: self.generation,
                    half_open,
                })
            }
            None => {
                self.stats.rejected += 1;
                self.rejected_in_state += 1;
                Err(Refusal {
                    state: self.state,
                    retry_at: if self.state == BreakerState::Open {
                        self.open_until
                    } else {
                        None
                    },
                })
            }
        }
    }

    /// Takes back the rejection [`acquire`](Self::acquire) just counted:
    /// a call that waits for a permit is not refused.
    pub(crate) fn uncount_rejection(&mut self) {
        self.stats.rejected -= 1;
        self.rejected_in_state -= 1;
    }

    /// The outcome of a permitted call.
    pub(crate) fn record(
        &mut self,
        ticket: Ticket,
        now: &mut Now<'_>,
        failed: bool,
        took: Duration,
        out: &mut Vec<Transition>,
    ) {
        let slow = self.config.slow_call.is_some_and(|s| took >= s.duration);
        self.stats.successes += u64::from(!failed);
        self.stats.failures += u64::from(failed);
        self.stats.slow += u64::from(slow);
        if ticket.generation != self.generation {
            // The state moved on (a reset, a forced open, or other calls'
            // outcomes) since this call was permitted.
            self.apply_pending(now, out);
            return;
        }
        if ticket.half_open {
            self.half_open_in_flight -= 1;
            self.half_open_done += 1;
            if failed || slow {
                let why = if failed {
                    "a trial call failed"
                } else {
                    "a trial call was slow"
                };
                self.decide(BreakerState::Open, now, why.into(), out);
            } else {
                self.half_open_successes += 1;
                if self.half_open_successes >= self.config.successes_to_close.get() {
                    let why = format!("{} trial calls succeeded", self.half_open_successes);
                    self.decide(BreakerState::Closed, now, why, out);
                }
            }
            self.apply_pending(now, out);
            return;
        }
        if self.state != BreakerState::Closed {
            return; // disabled: outcomes are counted, never acted on
        }
        let calls = self.outcomes.record(now, failed, slow);
        self.consecutive_failures = if failed {
            self.consecutive_failures + 1
        } else {
            0
        };
        // A quick success in a count window cannot raise a rate, so it
        // cannot open the breaker, except as the call that makes the
        // window long enough to judge. (A time window can lose old
        // successes between calls, so it is always judged.)
        let judged = failed
            || slow
            || calls == u64::from(self.config.minimum_calls.get())
            || matches!(self.config.window, Window::Time(_));
        if judged {
            if let Some(why) = self.should_open(now) {
                self.decide(BreakerState::Open, now, why, out);
            }
        }
        self.apply_pending(now, out);
    }

    /// Records `n` quick successes (not slow) of calls permitted in
    /// `generation`, in one step when the result is the same as `n` calls
    /// of [`record`](Self::record).
    pub(crate) fn record_quick(
        &mut self,
        generation: u64,
        n: u64,
        now: &mut Now<'_>,
        out: &mut Vec<Transition>,
    ) {
        // Closed, nothing pending, a count window that holds enough calls:
        // a quick success only lowers the rates and ends a run of
        // failures, so no success of the batch is judged.
        let inert = generation == self.generation
            && self.state == BreakerState::Closed
            && self.pending.is_none()
            && self.outcomes.settled(self.config.minimum_calls.get());
        if generation == self.generation && self.state == BreakerState::Disabled {
            self.stats.successes += n; // counted, never acted on
            return;
        }
        if !inert {
            let ticket = Ticket {
                generation,
                half_open: false,
            };
            for _ in 0..n {
                self.record(ticket, now, false, Duration::ZERO, out);
            }
            return;
        }
        self.stats.successes += n;
        self.outcomes.add_successes(n);
        self.consecutive_failures = 0;
    }

    /// The word a breaker publishes for calls admitted without its lock:
    /// `generation << 1 | 1` while the state lets any call through and a
    /// quick success cannot change a decision (closed with nothing
    /// pending and a count window holding at least the minimum calls, or
    /// disabled), 0 otherwise.
    pub(crate) fn lane(&self) -> u64 {
        let open_lane = self.pending.is_none()
            && match self.state {
                BreakerState::Disabled => true,
                BreakerState::Closed => self.outcomes.settled(self.config.minimum_calls.get()),
                _ => false,
            };
        if open_lane {
            (self.generation << 1) | 1
        } else {
            0
        }
    }

    /// A permitted call that ended without an outcome the breaker counts:
    /// cancelled, or `ignored` by the caller's choice. A half-open trial's
    /// slot is freed, so half-open can never get stuck.
    pub(crate) fn release(
        &mut self,
        ticket: Ticket,
        ignored: bool,
        now: &mut Now<'_>,
        out: &mut Vec<Transition>,
    ) {
        if ignored {
            self.stats.ignored += 1;
        } else {
            self.stats.cancelled += 1;
        }
        if ticket.half_open && ticket.generation == self.generation {
            self.half_open_in_flight -= 1;
        }
        self.apply_pending(now, out);
    }

    /// Why a closed breaker should open now, if it should.
    fn should_open(&mut self, now: &mut Now<'_>) -> Option<String> {
        if let Some(limit) = self.config.consecutive_failures {
            if self.consecutive_failures >= limit.get() {
                return Some(format!(
                    "{} consecutive failures",
                    self.consecutive_failures
                ));
            }
        }
        let counts = self.outcomes.totals(now);
        if counts.calls < u64::from(self.config.minimum_calls.get()) {
            return None;
        }
        let calls = counts.calls as f64;
        if counts.failures as f64 >= self.config.failure_rate * calls {
            let rate = counts.failures as f64 / calls;
            return Some(format!(
                "failure rate {:.0}% over {} calls (threshold {:.0}%)",
                rate * 100.0,
                counts.calls,
                self.config.failure_rate * 100.0
            ));
        }
        if let Some(slow) = self.config.slow_call {
            if counts.slow as f64 >= slow.rate * calls {
                let rate = counts.slow as f64 / calls;
                return Some(format!(
                    "slow-call rate {:.0}% over {} calls (threshold {:.0}% at {:?})",
                    rate * 100.0,
                    counts.calls,
                    slow.rate * 100.0,
                    slow.duration
                ));
            }
        }
        None
    }

    /// Moves to `to` now, or once the minimum interval since the last
    /// transition has passed.
    fn decide(
        &mut self,
        to: BreakerState,
        now: &mut Now<'_>,
        why: String,
        out: &mut Vec<Transition>,
    ) {
        // Once an opening waits, nothing else replaces it: a failed trial
        // is not undone by later successes.
        if matches!(&self.pending, Some((BreakerState::Open, _))) && to != BreakerState::Open {
            return;
        }
        if self.interval_passed(now) {
            self.transition(to, now, why, out);
        } else {
            self.pending = Some((to, why));
        }
    }

    /// Applies what time alone decides: a waiting transition whose
    /// interval passed, and the end of the open period. (Also run when
    /// only the state is read, so a breaker nobody calls still moves on.)
    pub(crate) fn tick(&mut self, now: &mut Now<'_>, out: &mut Vec<Transition>) {
        self.apply_pending(now, out);
        if self.state == BreakerState::Open && self.open_until.is_some_and(|at| now.get() >= at) {
            self.transition(
                BreakerState::HalfOpen,
                now,
                "the open duration passed".into(),
                out,
            );
        }
    }

    /// Whether the minimum interval since the last transition has passed
    /// (reads the clock only if there is an interval).
    fn interval_passed(&self, now: &mut Now<'_>) -> bool {
        self.config.min_transition_interval.is_zero()
            || now.get().saturating_sub(self.since) >= self.config.min_transition_interval
    }

    fn apply_pending(&mut self, now: &mut Now<'_>, out: &mut Vec<Transition>) {
        if self.pending.is_some() && self.interval_passed(now) {
            if let Some((to, why)) = self.pending.take() {
                self.transition(to, now, why, out);
            }
        }
    }

    /// When a pending transition may happen, if one waits and its time
    /// is representable (a `Duration::MAX` interval never passes).
    pub(crate) fn pending_at(&self) -> Option<Duration> {
        self.pending
            .as_ref()
            .and_then(|_| self.since.checked_add(self.config.min_transition_interval))
    }

    /// When time alone moves the breaker next (the end of an open period,
    /// a transition waiting for the minimum interval), if it will.
    pub(crate) fn next_tick(&self) -> Option<Duration> {
        let open_ends = match self.state {
            BreakerState::Open => self.open_until,
            _ => None,
        };
        match (open_ends, self.pending_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Enters `to`, resetting what the new state counts.
    pub(crate) fn transition(
        &mut self,
        to: BreakerState,
        now: &mut Now<'_>,
        reason: String,
        out: &mut Vec<Transition>,
    ) {
        let now = now.get();
        let from = self.state;
        self.pending = None;
        self.state = to;
        self.since = now;
        self.generation += 1;
        self.rejected_in_state = 0;
        self.stats.transitions += 1;
        self.half_open_in_flight = 0;
        self.half_open_done = 0;
        self.half_open_successes = 0;
        match to {
            BreakerState::Open => {
                // An end a `Duration` cannot hold is never. (`now + wait`
                // used to panic here, after the state had changed, leaving
                // the breaker open with a stale end: half-open at once.)
                let wait = self.open_duration();
                self.opens_in_a_row = self.opens_in_a_row.saturating_add(1);
                self.open_until = match wait.max(self.config.min_transition_interval) {
                    Duration::MAX => None,
                    wait => now.checked_add(wait),
                };
            }
            BreakerState::Closed => {
                self.opens_in_a_row = 0;
                self.outcomes.clear();
                self.consecutive_failures = 0;
            }
            BreakerState::HalfOpen | BreakerState::ForcedOpen | BreakerState::Disabled => {}
        }
        out.push(Transition {
            from,
            to,
            reason,
            by: None,
            at: std::time::SystemTime::now(),
        });
    }

    /// A transition by hand, by `by`: always at once (no minimum
    /// interval), and none if the breaker is already in `to`. An opening
    /// by hand lasts the open duration (with the backoff) and then goes
    /// half-open as any other.
    pub(crate) fn manual(
        &mut self,
        to: BreakerState,
        by: String,
        why: String,
        now: &mut Now<'_>,
        out: &mut Vec<Transition>,
    ) {
        if self.state != to {
            self.transition(to, now, why, out);
            if let Some(t) = out.last_mut() {
                t.by = Some(by);
            }
        }
    }

    /// How long the next opening lasts: the open duration, times the
    /// backoff factor for each opening since the breaker last closed,
    /// capped (a product too large for a `Duration` is the cap).
    /// `Duration::MAX` means until a manual transition.
    fn open_duration(&self) -> Duration {
        let base = self.config.open_for;
        match self.config.open_backoff {
            None => base,
            Some(b) => {
                let factor = b.factor.powi(self.opens_in_a_row.min(64) as i32);
                Duration::try_from_secs_f64(base.as_secs_f64() * factor)
                    .unwrap_or(b.max)
                    .min(b.max)
            }
        }
    }

    /// What a restart keeps: the state, how much longer an open state
    /// lasts (`None` when it is not open, or open until a manual
    /// transition), and the openings since the breaker last closed (for
    /// the backoff).
    pub(crate) fn persisted(&self, now: Duration) -> (BreakerState, Option<Duration>, u32) {
        let remaining = match self.state {
            BreakerState::Open => self.open_until.map(|at| at.saturating_sub(now)),
            _ => None,
        };
        (self.state, remaining, self.opens_in_a_row)
    }

    /// Enters a persisted state (see [`persisted`](Self::persisted)): a
    /// transition if the state differs, with `reason`; an open state ends
    /// `remaining` from now (`None`: at a manual transition).
    pub(crate) fn restore(
        &mut self,
        state: BreakerState,
        remaining: Option<Duration>,
        opens_in_a_row: u32,
        now: &mut Now<'_>,
        reason: String,
        out: &mut Vec<Transition>,
    ) {
        if self.state != state {
            self.transition(state, now, reason, out);
        }
        if state == BreakerState::Open {
            self.open_until = remaining.and_then(|r| now.get().checked_add(r));
        }
        self.opens_in_a_row = opens_in_a_row;
    }

    /// The window's counts now.
    pub(crate) fn window(&mut self, now: &mut Now<'_>) -> Counts {
        self.outcomes.totals(now)
    }

    /// Half-open calls in flight (for the invariants the tests check).
    pub(crate) fn half_open_in_flight(&self) -> u32 {
        self.half_open_in_flight
    }
}
