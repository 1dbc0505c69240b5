//! [`HealthGate`]: stop pulling input while a dependency is unhealthy.
//!
//! A gate sits at the ingress of a pipeline. A checker task asks a
//! [`HealthCheck`] every poll interval; after enough consecutive unhealthy
//! answers the gate closes, after enough healthy ones it opens again
//! (hysteresis). While it is closed the gate takes nothing from upstream,
//! so producers feel backpressure and nothing is dropped; what it already
//! took passes on. The gate's state is observable through a
//! [`GateHandle`] (a watch channel and counters) and tracing events.

mod check;
mod checker;
mod gate;
#[cfg(feature = "http")]
mod http;

pub use check::{Health, HealthCheck, HealthFn, health_fn};
#[cfg(feature = "http")]
pub use http::HttpProbe;

use std::borrow::Cow;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::base::config::{ConfigError, EdgeConfig};
use crate::flow::Flow;
use crate::flow::driver;
use crate::flow::processor::Processor;

use checker::Checker;
use gate::Gate;

/// Whether a [`HealthGate`] lets items through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateState {
    /// Items pass.
    Open,
    /// The gate takes no input.
    Closed,
}

/// What a [`GateHandle`] reports: the state, why, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GateStatus {
    /// Open or closed.
    pub state: GateState,
    /// The last unhealthy answer's reason while closed; `None` while open
    /// or before the first check.
    pub reason: Option<String>,
    /// When the gate entered this state (for a gate that starts closed:
    /// when the pipeline was built).
    pub since: Instant,
}

/// What a [`HealthGate`] does when it has been closed longer than the
/// limit set with [`HealthGate::when_closed_longer_than`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClosedPolicy {
    /// Keep waiting (the default, and the behaviour without a limit).
    #[default]
    Wait,
    /// End the stream: the gate sends one `gate_closed` error (without an
    /// item, so not counted in `failed`) whose source is
    /// [`GateError::ClosedTooLong`], and stops taking input; upstream stops
    /// as when its output is dropped.
    Fail,
    /// Take input again, but pass each value on as a `gate_closed` error
    /// item carrying it (so a dead-letter queue keeps it), until the gate
    /// opens. Errors from upstream pass unchanged.
    Reject,
}

/// Why a [`HealthGate`] failed items or the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GateError {
    /// The gate stayed closed longer than its limit.
    #[error("the health gate has been closed for longer than {limit:?}: {reason}")]
    ClosedTooLong {
        /// The limit.
        limit: Duration,
        /// The last unhealthy answer.
        reason: String,
    },
    /// The pipeline shut down gracefully while the gate was closed: what
    /// waited at the gate's input leaves as `gate_closed` errors carrying
    /// the items, so a dead-letter queue downstream keeps them.
    #[error("the pipeline shut down while the health gate was closed: {reason}")]
    ShutDownWhileClosed {
        /// The last unhealthy answer.
        reason: String,
    },
}

/// Gates a stream's ingress on an external health signal.
///
/// Put it right after the source. A checker task asks the [`HealthCheck`]
/// at once and then every poll interval (a dependency's
/// [`changed`](HealthCheck::changed) signal triggers a check at once). A
/// check that panics or takes longer than its time limit counts as
/// unhealthy.
///
/// - `close_after` consecutive unhealthy answers close an open gate;
///   `open_after` consecutive healthy ones open a closed gate.
/// - While closed, the gate stops pulling from upstream: the producer
///   waits, nothing is dropped. An optional limit with a [`ClosedPolicy`]
///   decides what happens when it stays closed too long.
/// - Transitions are logged (`warn` on closing, `info` on opening) and
///   published on the [`GateHandle`]'s watch channel.
///
/// # Default
///
/// Poll every second, each check limited to 5 s, close after 3 unhealthy
/// answers, open after 1 healthy answer, start closed (the first check
/// runs at once and opens the gate if the dependency is up), no limit on
/// how long the gate stays closed, named `health_gate`.
///
/// # Counters
///
/// A one-in-one-out stage: `received = emitted + errors_passed + failed +
/// aborted` (`failed` counts values passed on as `gate_closed` errors by
/// [`ClosedPolicy::Reject`]).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::{GateState, Health, HealthGate};
/// use tokio::sync::watch;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), streamz::ConfigError> {
/// let (health, signal) = watch::channel(Health::unhealthy("starting"));
/// let gate = HealthGate::new(signal).with_interval(Duration::from_millis(100))?;
/// let handle = gate.handle();
///
/// let (tx, flow) = streamz::channel::<u32>();
/// let out = tokio::spawn(flow.pipe(gate).collect());
/// tx.send(1).await.unwrap();
/// tokio::time::sleep(Duration::from_secs(1)).await;
/// assert_eq!(handle.state(), GateState::Closed); // nothing passed yet
///
/// health.send(Health::Healthy).unwrap();          // the dependency is up
/// drop(tx);
/// assert_eq!(out.await.unwrap().len(), 1);
/// assert_eq!(handle.state(), GateState::Open);
/// # Ok(()) }
/// ```
pub struct HealthGate<C> {
    name: Cow<'static, str>,
    check: C,
    config: GateConfig,
    status: watch::Sender<GateStatus>,
    stats: Arc<Stats>,
    edge: Option<EdgeConfig>,
}

#[derive(Debug, Clone, Copy)]
struct GateConfig {
    interval: Duration,
    check_timeout: Duration,
    close_after: NonZeroU32,
    open_after: NonZeroU32,
    limit: Option<(Duration, ClosedPolicy)>,
}

impl<C> fmt::Debug for HealthGate<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthGate")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

fn positive(d: Duration, field: &'static str) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(ConfigError::Zero { field })
    } else {
        Ok(d)
    }
}

fn nonzero(n: u32, field: &'static str) -> Result<NonZeroU32, ConfigError> {
    NonZeroU32::new(n).ok_or(ConfigError::Zero { field })
}

impl<C: HealthCheck> HealthGate<C> {
    /// A gate asking `check`, with the defaults above.
    pub fn new(check: C) -> Self {
        let (status, _) = watch::channel(GateStatus {
            state: GateState::Closed,
            reason: None,
            since: Instant::now(),
        });
        HealthGate {
            name: Cow::Borrowed("health_gate"),
            check,
            config: GateConfig {
                interval: Duration::from_secs(1),
                check_timeout: Duration::from_secs(5),
                close_after: NonZeroU32::new(3).expect("3 is not zero"),
                open_after: NonZeroU32::MIN,
                limit: None,
            },
            status,
            stats: Arc::default(),
            edge: None,
        }
    }

    /// How often to check (1 s by default).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for a zero interval.
    pub fn with_interval(mut self, interval: Duration) -> Result<Self, ConfigError> {
        self.config.interval = positive(interval, "interval")?;
        Ok(self)
    }

    /// How long one check may take before it counts as unhealthy (5 s by
    /// default); `Duration::MAX` for no limit.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for a zero timeout.
    pub fn with_check_timeout(mut self, timeout: Duration) -> Result<Self, ConfigError> {
        self.config.check_timeout = positive(timeout, "check timeout")?;
        Ok(self)
    }

    /// Closes an open gate after `n` consecutive unhealthy answers (3 by
    /// default).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for zero.
    pub fn close_after(mut self, n: u32) -> Result<Self, ConfigError> {
        self.config.close_after = nonzero(n, "close after")?;
        Ok(self)
    }

    /// Opens a closed gate after `n` consecutive healthy answers (1 by
    /// default).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for zero.
    pub fn open_after(mut self, n: u32) -> Result<Self, ConfigError> {
        self.config.open_after = nonzero(n, "open after")?;
        Ok(self)
    }

    /// Starts open instead of closed: items pass before the first check.
    pub fn starting_open(self) -> Self {
        self.status.send_modify(|s| s.state = GateState::Open);
        self
    }

    /// What to do once the gate has been closed for longer than `limit`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for a zero limit.
    pub fn when_closed_longer_than(
        mut self,
        limit: Duration,
        policy: ClosedPolicy,
    ) -> Result<Self, ConfigError> {
        self.config.limit = Some((positive(limit, "closed limit")?, policy));
        Ok(self)
    }

    /// Names the stage (for counters, spans and errors).
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the stage's output edge.
    pub fn with_edge(mut self, edge: EdgeConfig) -> Self {
        self.edge = Some(edge);
        self
    }

    /// A handle on the gate's state and counters, usable while it runs.
    pub fn handle(&self) -> GateHandle {
        GateHandle {
            status: self.status.subscribe(),
            stats: self.stats.clone(),
        }
    }
}

/// Watches a [`HealthGate`]: its state and its counters.
#[derive(Debug, Clone)]
pub struct GateHandle {
    status: watch::Receiver<GateStatus>,
    stats: Arc<Stats>,
}

#[derive(Debug, Default)]
struct Stats {
    checks: AtomicU64,
    unhealthy: AtomicU64,
    closings: AtomicU64,
}

impl GateHandle {
    /// The current status.
    pub fn status(&self) -> GateStatus {
        self.status.borrow().clone()
    }

    /// The current state.
    pub fn state(&self) -> GateState {
        self.status.borrow().state
    }

    /// A receiver that sees every transition (and reason updates while
    /// closed).
    pub fn subscribe(&self) -> watch::Receiver<GateStatus> {
        self.status.clone()
    }

    /// Checks made.
    pub fn checks(&self) -> u64 {
        self.stats.checks.load(Relaxed)
    }

    /// Checks that answered unhealthy (including timeouts and panics).
    pub fn unhealthy_checks(&self) -> u64 {
        self.stats.unhealthy.load(Relaxed)
    }

    /// Times the gate closed after being open.
    pub fn closings(&self) -> u64 {
        self.stats.closings.load(Relaxed)
    }
}

impl<T, C> Processor<T, T> for HealthGate<C>
where
    T: Send + 'static,
    C: HealthCheck,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn process(self, input: Flow<T>) -> Flow<T> {
        let pipeline = input.pipeline().clone();
        self.status.send_modify(|s| s.since = Instant::now());
        // The checker runs as long as the gate's task: the gate holds the
        // guard that stops it.
        let stop = CancellationToken::new();
        let checker = Checker {
            check: self.check,
            config: self.config,
            status: self.status.clone(),
            stats: self.stats,
            stage: Arc::from(self.name.as_ref()),
        };
        let name: Arc<str> = format!("{}.check", self.name).into();
        pipeline.spawn(name, checker.run(stop.clone()));
        let gate = Gate::new(
            self.status.subscribe(),
            self.config.limit,
            stop.drop_guard(),
        );
        driver::spawn(input, &self.name, self.edge, gate)
    }
}
