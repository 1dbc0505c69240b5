//! An opt-in circuit breaker (cargo feature `circuit-breaker`).
//!
//! # Read this first
//!
//! A circuit breaker inside a stream is usually the wrong tool, and
//! streamz ships it behind a feature that is off by default for that
//! reason:
//!
//! - **It changes the stream's meaning by injecting failures.** While it
//!   is open, items that would have been processed become `circuit_open`
//!   errors (or wait). A failure of some items now fails others that had
//!   nothing wrong with them.
//! - **It keeps state across runs.** Its counters live in a [`Breaker`]
//!   handle you create and share, so one run's failures change the next
//!   run's behaviour. That is the point, and also what makes it hard to
//!   reason about and to debug.
//! - **It interacts with backpressure.** An open breaker that rejects
//!   makes the stage fast, so upstream speeds up into a wall of errors;
//!   one that waits stalls the pipeline like a closed gate, from the
//!   middle of the chain.
//! - **Better tools usually exist:** [`Throttle`](crate::Throttle) to stay
//!   under a dependency's limit, [`AsyncMapper`](crate::AsyncMapper)
//!   timeouts and [`Retry`](crate::Retry) for transient failures, a
//!   [`DeadLetterQueue`](crate::DeadLetterQueue) to keep failed items
//!   without stopping, and a [`HealthGate`](crate::HealthGate) to stop
//!   taking input while a dependency is down.
//!
//! **When it is the right tool:** a dependency that fails under load and
//! recovers only when the load stops (a database in a connection storm),
//! shared by several pipelines or runs that should back off together, and
//! where failing items fast into a dead-letter queue is acceptable. Then a
//! breaker stops hammering it, and its half-open trial calls find out when
//! it is back. Pair it with a `DeadLetterQueue`, watch its transitions
//! ([`Breaker::on_transition`]) and its audit trail, and consider
//! [`ClosedPolicy`](crate::ClosedPolicy)-style gating at the ingress with
//! the breaker as the gate's check (a [`Breaker`] is a
//! [`HealthCheck`]).
//!
//! # The state machine
//!
//! ```text
//!            failure rate, slow-call rate or consecutive failures
//!   Closed ───────────────────────────────────────────────────▶ Open
//!     ▲                                                          │
//!     │ successes_to_close trial calls succeed   open_for passes │
//!     │                                                          ▼
//!     └──────────────────────────── HalfOpen ◀───────────────────┘
//!                                      │  a trial call fails or is slow
//!                                      └──────────────────────▶ Open (longer, with backoff)
//! ```
//!
//! Manual control: [`Breaker::transition_to`] any state, by someone, for a
//! reason (open now and recover normally, half-open now to try it, ...),
//! and the shorthands [`Breaker::reset`] (to closed),
//! [`Breaker::force_open`] (stays open until the next transition by hand)
//! and [`Breaker::disable`] (always permits, never opens). See
//! `docs/circuit-breaker.md`.

mod config;
mod lane;
mod machine;
mod operator;
mod registry;

pub use config::{BreakerConfig, OpenBackoff, SlowCall, Window};
pub(crate) use operator::{BreakerSettings, spawn};
pub use operator::{CircuitBreaker, CircuitOpen, Guarded, OpenPolicy};
pub use registry::{BreakerRegistry, RegistryError};

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[cfg(streamz_loom)]
use crate::base::loom_notify::Notify;
#[cfg(not(streamz_loom))]
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::base::config::ConfigError;
use crate::resilience::health::{Health, HealthCheck};
use machine::{Machine, Now, Ticket};

#[cfg(streamz_loom)]
use loom::sync::{
    Mutex, MutexGuard, RwLock,
    atomic::{AtomicU64, Ordering},
};
#[cfg(not(streamz_loom))]
use std::sync::{
    Mutex, MutexGuard, RwLock,
    atomic::{AtomicU64, Ordering},
};

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls pass; outcomes are counted.
    Closed,
    /// Calls are refused until the open duration passes.
    Open,
    /// A few trial calls pass; their outcomes decide.
    HalfOpen,
    /// Opened by hand: refused until [`Breaker::reset`].
    ForcedOpen,
    /// Switched off by hand: every call passes, nothing opens it.
    Disabled,
}

impl BreakerState {
    /// Every state, in the order of [`as_str`](Self::as_str)'s table.
    #[cfg(feature = "metrics")]
    const ALL: [BreakerState; 5] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
        BreakerState::ForcedOpen,
        BreakerState::Disabled,
    ];

    /// The state's name in snake case: `closed`, `open`, `half_open`,
    /// `forced_open`, `disabled` (the `state` label of the exported
    /// series).
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::ForcedOpen => "forced_open",
            BreakerState::Disabled => "disabled",
        }
    }

    /// Whether calls may pass (some, in half-open).
    pub fn permits_calls(self) -> bool {
        matches!(
            self,
            BreakerState::Closed | BreakerState::HalfOpen | BreakerState::Disabled
        )
    }
}

/// One change of state, as listeners and the audit trail see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The state left.
    pub from: BreakerState,
    /// The state entered.
    pub to: BreakerState,
    /// Why, in words (for alerts and the audit trail).
    pub reason: String,
    /// Who moved it by hand ([`Breaker::transition_to`]; `"hand"` for
    /// [`reset`](Breaker::reset), [`force_open`](Breaker::force_open) and
    /// [`disable`](Breaker::disable)), `None` when the breaker moved
    /// itself (rates, failures in a row, the open duration, trial calls).
    pub by: Option<String>,
    /// When, by the wall clock.
    pub at: SystemTime,
}

/// What a restart keeps of a breaker ([`Breaker::snapshot`],
/// [`Breaker::restore`]); serde, so it can be stored anywhere.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BreakerSnapshot {
    /// The breaker's name.
    pub name: String,
    /// Its state.
    pub state: BreakerState,
    /// For an open breaker, when it lets trial calls through, by the wall
    /// clock; `None` otherwise, and while it is open until a manual
    /// transition.
    pub open_until: Option<SystemTime>,
    /// Openings since it last closed (the backoff's exponent).
    pub opens_in_a_row: u32,
    /// When the snapshot was taken.
    pub taken_at: SystemTime,
}

/// A snapshot of a breaker's state and counters: totals over its life,
/// and, as Resilience4j's metrics, what its window holds now.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BreakerMetrics {
    /// The breaker's name.
    pub name: String,
    /// Its state.
    pub state: BreakerState,
    /// Calls permitted, over the breaker's life.
    pub permitted: u64,
    /// Calls refused, over the breaker's life.
    pub rejected: u64,
    /// Permitted calls that succeeded.
    pub successes: u64,
    /// Permitted calls that failed.
    pub failures: u64,
    /// Permitted calls that were slow.
    pub slow_calls: u64,
    /// Permitted calls that ended without an outcome (cancelled).
    pub cancelled: u64,
    /// Permitted calls whose outcome was ignored
    /// ([`CallOutcome::Ignored`]): neither a success nor a failure.
    pub ignored: u64,
    /// Trial calls in flight in half-open (never more than
    /// `half_open_calls`).
    pub trials_in_flight: u32,
    /// State changes.
    pub transitions: u64,
    /// Calls in the window now (R4J's buffered calls). Only a closed
    /// breaker counts calls into its window; any transition to closed
    /// empties it.
    pub window_calls: u64,
    /// Failed calls in the window now.
    pub window_failures: u64,
    /// Slow calls in the window now.
    pub window_slow_calls: u64,
    /// Calls refused since the breaker entered its current state (R4J's
    /// not-permitted calls).
    pub rejected_in_state: u64,
    /// The failure rate over the window, `None` while the window holds
    /// fewer than `minimum_calls` (R4J's -1, "not evaluated").
    pub failure_rate: Option<f64>,
    /// The slow-call rate over the window, `None` while the window holds
    /// fewer than `minimum_calls`.
    pub slow_call_rate: Option<f64>,
}

/// How a call counts for a breaker: reported on a [`Permit`]
/// ([`Permit::report`]) or decided per result by
/// [`AsyncMapper::classify`](crate::AsyncMapper::classify).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallOutcome {
    /// A success (slow if it took the slow-call duration or longer).
    Success,
    /// A failure.
    Failure,
    /// Neither: the call is forgotten, as if it was never permitted,
    /// except that [`BreakerMetrics::ignored`] counts it. A half-open trial
    /// slot it held is freed. Resilience4j's `ignoreExceptions`: a 404, a
    /// validation error, anything that says nothing about the
    /// dependency's health.
    Ignored,
}

type Listener = dyn Fn(&Transition) + Send + Sync;

struct Inner {
    name: String,
    /// Whether call durations matter (a slow-call threshold is set).
    times_calls: bool,
    origin: Clock,
    machine: Mutex<Machine>,
    /// [`Machine::lane`], written under the machine's lock after every
    /// change: whether a call may be admitted, and its quick success
    /// reported later, without the lock (see `lane.rs`).
    lane: AtomicU64,
    audit: Mutex<VecDeque<Transition>>,
    /// Transitions waiting for the listeners, in order.
    outbox: Mutex<VecDeque<Transition>>,
    /// Held by the thread calling the listeners.
    delivering: Mutex<()>,
    listeners: RwLock<Vec<Arc<Listener>>>,
    /// Woken on every transition and every freed half-open slot.
    changed: Notify,
    /// Exported series (feature `metrics`).
    #[cfg(feature = "metrics")]
    series: series::BreakerSeries,
}

/// A circuit breaker's shared state: create one, clone it into every
/// stage, run or [`HealthGate`](crate::HealthGate) that should share it.
///
/// Calls ask for a [`Permit`] ([`try_acquire`](Breaker::try_acquire), or
/// [`acquire`](Breaker::acquire) to wait) and report the outcome on it; a
/// permit dropped without an outcome (a cancelled call) frees its slot.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::breaker::{Breaker, BreakerConfig, BreakerState};
///
/// let mut config = BreakerConfig::default();
/// config.consecutive_failures = std::num::NonZeroU32::new(2);
/// let breaker = Breaker::new("payments", config);
///
/// for _ in 0..2 {
///     let permit = breaker.try_acquire().expect("closed: calls pass");
///     permit.failure(Duration::from_millis(5));
/// }
/// assert_eq!(breaker.state(), BreakerState::Open);
/// assert!(breaker.try_acquire().is_err());
/// assert_eq!(breaker.audit_trail()[0].reason, "2 consecutive failures");
/// ```
#[derive(Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.inner.name)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Breaker {
    /// A closed breaker named `name` (for logs, metrics and errors).
    ///
    /// The configuration is checked ([`BreakerConfig::validate`]) when a
    /// [`CircuitBreaker`] or [`Guarded`] stage using the breaker, or a
    /// [`HealthGate`](crate::HealthGate) gating on it, is piped: an invalid
    /// one is refused then with a [`ConfigError`] naming the stage and the
    /// field under `breaker.` (`breaker.failure_rate`). A breaker used only
    /// by hand ([`try_acquire`](Breaker::try_acquire)) is checked only
    /// here, with an `error` event in the log: call
    /// [`validate`](Breaker::validate) to act on it. An unchecked invalid
    /// configuration does not panic, but the breaker may never open (a
    /// failure rate above 1) or never close (more successes to close than
    /// trial calls).
    ///
    /// ```
    /// use streamz::breaker::{Breaker, BreakerConfig, CircuitBreaker};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut config = BreakerConfig::default();
    /// config.failure_rate = 0.0;
    /// let breaker = Breaker::new("ledger", config);
    /// let stage = CircuitBreaker::new(breaker, |n: &u32| std::future::ready(Ok::<_, std::io::Error>(*n)))
    ///     .named("post");
    /// let err = streamz::iter([1u32]).try_pipe(stage).unwrap_err();
    /// assert_eq!(err.field(), "breaker.failure_rate");
    /// assert_eq!(
    ///     err.to_string(),
    ///     "CircuitBreaker `post`: `breaker.failure_rate` must be a rate above 0 and at most 1"
    /// );
    /// # }
    /// ```
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Self {
        let name = name.into();
        if let Err(error) = config.check(true) {
            // Not an error value (`new` never fails), but never silent.
            tracing::error!(breaker = %name, %error, "invalid breaker configuration: stages using it will not start");
        }
        let machine = Machine::new(config);
        #[cfg(feature = "metrics")]
        let name_for_series = name.clone();
        Breaker {
            inner: Arc::new(Inner {
                name,
                times_calls: config.slow_call.is_some(),
                origin: Clock::now(),
                lane: AtomicU64::new(machine.lane()),
                machine: Mutex::new(machine),
                audit: Mutex::new(VecDeque::new()),
                outbox: Mutex::new(VecDeque::new()),
                delivering: Mutex::new(()),
                listeners: RwLock::new(Vec::new()),
                changed: Notify::new(),
                #[cfg(feature = "metrics")]
                series: series::BreakerSeries::new(&name_for_series),
            }),
        }
    }

    /// Checks the breaker's configuration ([`BreakerConfig::validate`]),
    /// with the fields under `breaker.`. The stages and gates using the
    /// breaker call it when they are piped.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for the field, such as `breaker.open_for`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::breaker::{Breaker, BreakerConfig};
    ///
    /// let mut config = BreakerConfig::default();
    /// config.open_for = Duration::ZERO;
    /// let err = Breaker::new("payments", config).validate().unwrap_err();
    /// assert_eq!(err.field(), "breaker.open_for");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.config().check(true)
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its configuration.
    pub fn config(&self) -> BreakerConfig {
        self.machine().config
    }

    fn now(&self) -> Duration {
        Clock::now().since(self.inner.origin)
    }

    fn machine(&self) -> MutexGuard<'_, Machine> {
        // The machine is consistent between calls; a panic cannot leave it
        // half-updated (no user code runs under the lock).
        lock(&self.inner.machine)
    }

    /// Runs `f` on the machine. The transitions it makes go to the audit
    /// trail and the listeners' queue while the machine is still locked,
    /// so both see them in the order they happened; listeners are called
    /// after the lock is released.
    fn with_machine<R>(
        &self,
        f: impl FnOnce(&mut Machine, &mut Now<'_>, &mut Vec<Transition>) -> R,
    ) -> R {
        let mut transitions = Vec::new();
        let read = || self.now();
        let mut now = Now::new(&read);
        let r = {
            let mut machine = self.machine();
            let r = f(&mut machine, &mut now, &mut transitions);
            self.inner.lane.store(machine.lane(), Ordering::Release);
            #[cfg(feature = "metrics")]
            self.inner.series.publish(&mut machine, &transitions);
            if !transitions.is_empty() {
                let capacity = machine.config.audit_capacity;
                let mut audit = lock(&self.inner.audit);
                for t in &transitions {
                    if capacity > 0 {
                        if audit.len() == capacity {
                            audit.pop_front();
                        }
                        audit.push_back(t.clone());
                    }
                }
                lock(&self.inner.outbox).extend(transitions.iter().cloned());
            }
            r
        };
        if !transitions.is_empty() {
            self.deliver();
            self.inner.changed.notify_waiters();
        }
        r
    }

    /// Calls the listeners with queued transitions, in order, one thread
    /// at a time. A thread that finds another delivering leaves its
    /// transitions to it (which also makes a listener that moves the
    /// breaker safe: its transitions are delivered after the current one).
    fn deliver(&self) {
        loop {
            let Ok(delivering) = self.inner.delivering.try_lock() else {
                return;
            };
            loop {
                let Some(t) = lock(&self.inner.outbox).pop_front() else {
                    break;
                };
                match t.to {
                    BreakerState::Open | BreakerState::ForcedOpen => {
                        tracing::warn!(breaker = %self.inner.name, from = ?t.from, to = ?t.to, reason = %t.reason, "circuit breaker opens")
                    }
                    _ => {
                        tracing::info!(breaker = %self.inner.name, from = ?t.from, to = ?t.to, reason = %t.reason, "circuit breaker transition")
                    }
                }
                // A copy of the list: a listener may add listeners.
                let listeners: Vec<Arc<Listener>> = self
                    .inner
                    .listeners
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                for listener in listeners {
                    let call = std::panic::AssertUnwindSafe(|| listener(&t));
                    if std::panic::catch_unwind(call).is_err() {
                        tracing::error!(breaker = %self.inner.name, "a transition listener panicked");
                    }
                }
            }
            drop(delivering);
            // Something queued after the last look but before the release
            // would otherwise wait for the next transition.
            if lock(&self.inner.outbox).is_empty() {
                return;
            }
        }
    }

    /// Asks to make a call now.
    ///
    /// # Errors
    ///
    /// [`CircuitOpen`] while the breaker is open, forced open, or in
    /// half-open with every trial slot taken.
    pub fn try_acquire(&self) -> Result<Permit<'_>, CircuitOpen> {
        let ticket = self.acquire_ticket()?;
        Ok(Permit {
            breaker: self,
            ticket,
            start: self.start(),
            done: false,
        })
    }

    fn acquire_ticket(&self) -> Result<Ticket, CircuitOpen> {
        self.with_machine(|m, now, out| m.acquire(now, out))
            .map_err(|refusal| CircuitOpen {
                breaker: self.inner.name.clone(),
                state: refusal.state,
                retry_in: refusal.retry_at.map(|at| at.saturating_sub(self.now())),
            })
    }

    /// When a call starts, if durations matter.
    #[inline]
    fn start(&self) -> Option<Instant> {
        self.inner.times_calls.then(Instant::now)
    }

    /// The generation a call admitted without the lock belongs to, while
    /// the breaker allows that.
    #[inline]
    fn lane(&self) -> Option<u64> {
        let word = self.inner.lane.load(Ordering::Acquire);
        (word & 1 == 1).then_some(word >> 1)
    }

    /// Waits until a call may be made: through an open period, and for a
    /// free trial slot in half-open.
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            let notified = self.inner.changed.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before asking, so a transition in between wakes us.
            notified.as_mut().enable();
            let retry_in = match self.try_acquire() {
                Ok(permit) => return permit,
                Err(open) => open.retry_in,
            };
            let pending_in = self
                .machine()
                .pending_at()
                .map(|at| at.saturating_sub(self.now()));
            // Neither known (forced open, an endless open duration): only
            // a transition wakes us.
            let wake_at = retry_in
                .into_iter()
                .chain(pending_in)
                .min()
                .and_then(|wait| crate::base::time::after(Instant::now(), wait));
            tokio::select! {
                () = notified => {}
                () = crate::base::time::sleep_until(wake_at) => {}
            }
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        // Reading the state applies what time alone decides (the end of
        // the open period), so a gate watching an idle breaker sees it.
        self.with_machine(|m, now, out| {
            m.tick(now, out);
            m.state
        })
    }

    /// Closes the breaker by hand: counters of the window are cleared.
    /// ([`transition_to`](Breaker::transition_to) `Closed`, by `"hand"`.)
    pub fn reset(&self) {
        self.transition_to(BreakerState::Closed, "hand", "reset by hand");
    }

    /// Opens the breaker by hand until [`reset`](Breaker::reset) (or
    /// another transition by hand).
    pub fn force_open(&self) {
        self.transition_to(BreakerState::ForcedOpen, "hand", "forced open by hand");
    }

    /// Switches the breaker off by hand: every call passes and nothing
    /// opens it, until [`reset`](Breaker::reset).
    pub fn disable(&self) {
        self.transition_to(BreakerState::Disabled, "hand", "disabled by hand");
    }

    /// Moves the breaker to `to` by hand, now, whatever its state and the
    /// minimum interval between transitions; `by` (who: an operator, a
    /// runbook, a deploy) and `why` go into the [`Transition`] the audit
    /// trail and the listeners see. Resilience4j's
    /// `transitionTo{Closed,Open,HalfOpen,ForcedOpen,Disabled}State`:
    ///
    /// | `to` | the breaker then |
    /// |---|---|
    /// | `Closed` | counts afresh: the window is emptied |
    /// | `Open` | stays open for `open_for` (with the backoff), then goes half-open by itself: "open now, recover normally" |
    /// | `HalfOpen` | lets `half_open_calls` trial calls through; they decide as usual |
    /// | `ForcedOpen` | refuses every call until the next transition by hand |
    /// | `Disabled` | permits every call and never opens, until the next transition by hand |
    ///
    /// Moving to the state the breaker is in does nothing. Outcomes of
    /// calls permitted before the transition no longer move it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::breaker::{Breaker, BreakerConfig, BreakerState};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let mut config = BreakerConfig::default();
    /// config.open_for = Duration::from_secs(10);
    /// let breaker = Breaker::new("payments", config);
    /// breaker.transition_to(BreakerState::Open, "on-call", "the database is being failed over");
    /// assert!(breaker.try_acquire().is_err());
    /// tokio::time::advance(Duration::from_secs(10)).await;
    /// assert_eq!(breaker.state(), BreakerState::HalfOpen); // recovers as usual
    /// let opened = &breaker.audit_trail()[0];
    /// assert_eq!((opened.by.as_deref(), opened.reason.as_str()), (Some("on-call"), "the database is being failed over"));
    /// assert_eq!(breaker.audit_trail()[1].by, None); // the breaker moved itself
    /// # }
    /// ```
    pub fn transition_to(&self, to: BreakerState, by: impl Into<String>, why: impl Into<String>) {
        let (by, why) = (by.into(), why.into());
        self.with_machine(|m, now, out| m.manual(to, by, why, now, out));
    }

    /// Calls `listener` on every transition (an alert, a metric). It runs
    /// on the thread that caused the transition, after the breaker's lock
    /// is released; keep it short. A listener that panics is logged and
    /// kept.
    pub fn on_transition(&self, listener: impl Fn(&Transition) + Send + Sync + 'static) {
        self.inner
            .listeners
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::new(listener));
    }

    /// The last transitions, oldest first (up to the configured
    /// `audit_capacity`).
    pub fn audit_trail(&self) -> Vec<Transition> {
        lock(&self.inner.audit).iter().cloned().collect()
    }

    /// What a restart needs to carry this breaker on where it was: its
    /// state, when an open state ends (by the wall clock) and how many
    /// times it opened since it last closed (for the backoff). Save it
    /// with serde (or with [`BreakerRegistry::save`]) and give it to
    /// [`restore`](Breaker::restore) after the restart.
    ///
    /// The window's counts are not kept: a restored closed breaker
    /// judges its rates on calls made after the restart.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::breaker::{Breaker, BreakerConfig, BreakerState};
    ///
    /// let mut config = BreakerConfig::default();
    /// config.open_for = Duration::from_secs(60);
    /// let before = Breaker::new("payments", config);
    /// before.force_open();
    /// let saved = serde_json::to_string(&before.snapshot()).unwrap();
    ///
    /// // After a restart:
    /// let after = Breaker::new("payments", config);
    /// after.restore(&serde_json::from_str(&saved).unwrap());
    /// assert_eq!(after.state(), BreakerState::ForcedOpen);
    /// ```
    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = self.now();
        let (state, remaining, opens_in_a_row) = self.machine().persisted(now);
        let taken_at = SystemTime::now();
        BreakerSnapshot {
            name: self.inner.name.clone(),
            state,
            open_until: remaining.and_then(|r| taken_at.checked_add(r)),
            opens_in_a_row,
            taken_at,
        }
    }

    /// Puts the breaker in the state `snapshot` recorded (a transition
    /// with the reason "restored from a snapshot", in the audit trail and
    /// to listeners, if the state differs). An open breaker stays open
    /// for what was left of its open time by the wall clock, so one whose
    /// time ran out while the process was down goes half-open at its next
    /// call; one open until a manual transition stays so. The name in the
    /// snapshot is not checked: restore the snapshot of the same breaker.
    pub fn restore(&self, snapshot: &BreakerSnapshot) {
        let remaining = match (snapshot.state, snapshot.open_until) {
            (BreakerState::Open, Some(until)) => Some(
                until
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO),
            ),
            _ => None,
        };
        self.with_machine(|m, now, out| {
            m.restore(
                snapshot.state,
                remaining,
                snapshot.opens_in_a_row,
                now,
                "restored from a snapshot".to_owned(),
                out,
            );
        });
    }

    /// A snapshot of the state and counters.
    pub fn metrics(&self) -> BreakerMetrics {
        let read = || self.now();
        let mut now = Now::new(&read);
        let mut m = self.machine();
        let window = m.window(&mut now);
        let judged = window.calls > 0 && window.calls >= u64::from(m.config.minimum_calls.get());
        let rate = |n: u64| judged.then(|| n as f64 / window.calls as f64);
        BreakerMetrics {
            name: self.inner.name.clone(),
            state: m.state,
            permitted: m.stats.permitted,
            rejected: m.stats.rejected,
            successes: m.stats.successes,
            failures: m.stats.failures,
            slow_calls: m.stats.slow,
            cancelled: m.stats.cancelled,
            ignored: m.stats.ignored,
            trials_in_flight: m.half_open_in_flight(),
            transitions: m.stats.transitions,
            window_calls: window.calls,
            window_failures: window.failures,
            window_slow_calls: window.slow,
            rejected_in_state: m.rejected_in_state,
            failure_rate: rate(window.failures),
            slow_call_rate: rate(window.slow),
        }
    }
}

impl Breaker {
    /// Whether the breaker permits calls, as health answers: the current
    /// one first, then one per change (transitions, and the end of an
    /// open period, which only time decides).
    pub(crate) fn health_updates(self) -> impl futures::Stream<Item = Health> + Send {
        futures::stream::unfold((self, None::<bool>), |(breaker, last)| async move {
            loop {
                let inner = breaker.inner.clone();
                let notified = inner.changed.notified();
                let mut notified = std::pin::pin!(notified);
                // Registered before the state is read: no change is missed.
                notified.as_mut().enable();
                let state = breaker.state();
                let up = state.permits_calls();
                if last != Some(up) {
                    let health = if up {
                        Health::Healthy
                    } else {
                        Health::unhealthy(format!(
                            "circuit breaker `{}` is {state:?}",
                            breaker.name()
                        ))
                    };
                    return Some((health, (breaker, Some(up))));
                }
                let wake_at = breaker
                    .machine()
                    .next_tick()
                    .map(|at| at.saturating_sub(breaker.now()))
                    .and_then(|wait| crate::base::time::after(Instant::now(), wait));
                tokio::select! {
                    () = notified => {}
                    () = crate::base::time::sleep_until(wake_at) => {}
                }
            }
        })
    }
}

/// A breaker's exported series (feature `metrics`), labelled with its
/// name: the state as one gauge per state (1 for the current one), calls
/// by outcome and transitions by the state entered. Published under the
/// machine's lock after each change, from the counts the machine keeps.
#[cfg(feature = "metrics")]
mod series {
    use super::BreakerState;
    use super::Transition;
    use super::machine::{Machine, Stats};
    use crate::base::telemetry::{self, Counter, Gauge};

    pub(super) struct BreakerSeries {
        states: [Gauge; 5],
        transitions: [Counter; 5],
        /// permitted, rejected, successes, failures, slow, cancelled, ignored
        calls: [Counter; 7],
    }

    impl BreakerSeries {
        pub(super) fn new(name: &str) -> Self {
            let label = |key, value: &str| (key, value.to_owned());
            let states = BreakerState::ALL.map(|s| {
                telemetry::gauge(
                    telemetry::BREAKER_STATE,
                    &[label("breaker", name), label("state", s.as_str())],
                )
            });
            states[0].set(1.0);
            BreakerSeries {
                states,
                transitions: BreakerState::ALL.map(|s| {
                    telemetry::counter(
                        telemetry::BREAKER_TRANSITIONS,
                        &[label("breaker", name), label("to", s.as_str())],
                    )
                }),
                calls: [
                    "permitted",
                    "rejected",
                    "success",
                    "failure",
                    "slow",
                    "cancelled",
                    "ignored",
                ]
                .map(|outcome| {
                    telemetry::counter(
                        telemetry::BREAKER_CALLS,
                        &[label("breaker", name), label("outcome", outcome)],
                    )
                }),
            }
        }

        fn counts(s: &Stats) -> [u64; 7] {
            [
                s.permitted,
                s.rejected,
                s.successes,
                s.failures,
                s.slow,
                s.cancelled,
                s.ignored,
            ]
        }

        pub(super) fn publish(&self, machine: &mut Machine, transitions: &[Transition]) {
            let now = Self::counts(&machine.stats);
            let before = Self::counts(&machine.published);
            for ((counter, now), before) in self.calls.iter().zip(now).zip(before) {
                if now > before {
                    counter.increment(now - before);
                }
            }
            machine.published = machine.stats;
            for t in transitions {
                let i = BreakerState::ALL
                    .iter()
                    .position(|&s| s == t.to)
                    .unwrap_or(0);
                self.transitions[i].increment(1);
            }
            if !transitions.is_empty() {
                for (gauge, state) in self.states.iter().zip(BreakerState::ALL) {
                    gauge.set(if state == machine.state { 1.0 } else { 0.0 });
                }
            }
        }
    }
}

/// The breaker's clock: tokio's (so paused-clock tests drive it), or
/// under loom a counter the model advances, so every explored execution
/// sees the same times.
#[cfg(not(streamz_loom))]
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

#[cfg(not(streamz_loom))]
impl Clock {
    fn now() -> Self {
        Clock(Instant::now())
    }

    fn since(self, origin: Clock) -> Duration {
        self.0.saturating_duration_since(origin.0)
    }
}

#[cfg(streamz_loom)]
#[derive(Debug, Clone, Copy)]
struct Clock(Duration);

#[cfg(streamz_loom)]
impl Clock {
    fn now() -> Self {
        Clock(loom_clock::now())
    }

    fn since(self, origin: Clock) -> Duration {
        self.0.saturating_sub(origin.0)
    }
}

/// What the model tests drive of a breaker beyond its public API (only
/// with `--cfg streamz_loom`).
#[cfg(streamz_loom)]
#[doc(hidden)]
pub mod loom_hooks {
    use super::Breaker;
    use crate::resilience::health::Health;

    /// The breaker's health as a mapper holding on it sees it: the
    /// current answer, then one per change.
    pub fn health_updates(breaker: Breaker) -> impl futures::Stream<Item = Health> + Send {
        breaker.health_updates()
    }
}

/// The model tests' clock (only with `--cfg streamz_loom`). Loom runs a model's
/// threads on one OS thread, so a thread-local clock is the model's own,
/// apart from other tests running at the same time.
#[cfg(streamz_loom)]
#[doc(hidden)]
pub mod loom_clock {
    use std::cell::Cell;
    use std::time::Duration;

    std::thread_local! {
        static NOW: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    }

    /// Moves the clock of every breaker of this model forward.
    pub fn advance(by: Duration) {
        NOW.with(|now| now.set(now.get() + by));
    }

    pub(crate) fn now() -> Duration {
        NOW.with(Cell::get)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Permission to make one call. Report its outcome with
/// [`success`](Permit::success) or [`failure`](Permit::failure) (or
/// [`record`](Permit::record), which measures the duration since the
/// permit was given); dropping it without an outcome releases it, so a
/// cancelled call never holds a half-open slot.
#[must_use = "report the call's outcome on the permit"]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    ticket: Ticket,
    /// When the call began, if durations matter.
    start: Option<Instant>,
    done: bool,
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("breaker", &self.breaker.inner.name)
            .field("half_open", &self.ticket.half_open)
            .finish_non_exhaustive()
    }
}

impl Permit<'_> {
    /// The call succeeded after `took`.
    pub fn success(self, took: Duration) {
        self.finish(false, took);
    }

    /// The call failed after `took`.
    pub fn failure(self, took: Duration) {
        self.finish(true, took);
    }

    /// The call succeeded (`ok`) or failed, taking the time since the
    /// permit was given (measured only if the breaker has a slow-call
    /// threshold).
    pub fn record(self, ok: bool) {
        let took = self.start.map_or(Duration::ZERO, |s| s.elapsed());
        self.finish(!ok, took);
    }

    /// The call ended in a way that says nothing about the dependency (a
    /// 404, a validation error): the breaker counts it as neither a
    /// success nor a failure ([`CallOutcome::Ignored`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::breaker::{Breaker, BreakerConfig};
    ///
    /// let breaker = Breaker::new("catalogue", BreakerConfig::default());
    /// breaker.try_acquire().unwrap().ignore();
    /// let m = breaker.metrics();
    /// assert_eq!((m.ignored, m.successes, m.failures, m.window_calls), (1, 0, 0, 0));
    /// ```
    pub fn ignore(mut self) {
        self.done = true;
        self.breaker.release(self.ticket, true);
    }

    /// Reports the call's outcome as a [`CallOutcome`], taking the time
    /// since the permit was given as [`record`](Permit::record) does.
    pub fn report(self, outcome: CallOutcome) {
        match outcome {
            CallOutcome::Success => self.record(true),
            CallOutcome::Failure => self.record(false),
            CallOutcome::Ignored => self.ignore(),
        }
    }

    fn finish(mut self, failed: bool, took: Duration) {
        self.done = true;
        self.breaker.finish(self.ticket, failed, took);
    }

    /// The same permit, owning a handle on its breaker (to keep it past
    /// the borrow, as a guarded processor does between its two ends).
    pub(crate) fn into_owned(mut self) -> OwnedPermit {
        self.done = true;
        OwnedPermit {
            breaker: self.breaker.clone(),
            ticket: self.ticket,
            start: self.start,
            done: false,
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.release(self.ticket, false);
        }
    }
}

/// A [`Permit`] that owns a handle on its breaker.
pub(crate) struct OwnedPermit {
    breaker: Breaker,
    ticket: Ticket,
    start: Option<Instant>,
    done: bool,
}

impl OwnedPermit {
    /// The call succeeded (`ok`) or failed; its duration is the time since
    /// the permit was given.
    pub(crate) fn record(mut self, ok: bool) {
        self.done = true;
        let took = self.start.map_or(Duration::ZERO, |s| s.elapsed());
        self.breaker.finish(self.ticket, !ok, took);
    }

    /// [`Permit::report`].
    pub(crate) fn report(mut self, outcome: CallOutcome) {
        match outcome {
            CallOutcome::Success => self.record(true),
            CallOutcome::Failure => self.record(false),
            CallOutcome::Ignored => {
                self.done = true;
                self.breaker.release(self.ticket, true);
            }
        }
    }
}

impl Drop for OwnedPermit {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.release(self.ticket, false);
        }
    }
}

impl Breaker {
    fn finish(&self, ticket: Ticket, failed: bool, took: Duration) {
        self.with_machine(|m, now, out| m.record(ticket, now, failed, took, out));
        if ticket.half_open {
            self.inner.changed.notify_waiters();
        }
    }

    /// A permitted call ends uncounted: cancelled, or `ignored`.
    fn release(&self, ticket: Ticket, ignored: bool) {
        self.with_machine(|m, now, out| m.release(ticket, ignored, now, out));
        if ticket.half_open {
            self.inner.changed.notify_waiters();
        }
    }
}

/// A breaker is a health check: healthy while it permits calls. Gate a
/// pipeline's ingress on it to stop taking input while it is open.
impl HealthCheck for Breaker {
    /// [`Breaker::validate`]: the gate refuses an invalid breaker.
    fn validate(&self) -> Result<(), ConfigError> {
        Breaker::validate(self)
    }

    async fn check(&mut self) -> Health {
        match self.state() {
            s if s.permits_calls() => Health::Healthy,
            s => Health::unhealthy(format!("circuit breaker `{}` is {s:?}", self.inner.name)),
        }
    }

    async fn changed(&mut self) {
        self.inner.changed.notified().await;
    }
}
