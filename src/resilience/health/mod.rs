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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::base::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

// The holders' count and its release signal: loom's (and a model of
// tokio's `Notify`) under the model tests (tests/loom_gate.rs).
#[cfg(streamz_loom)]
use crate::base::loom_notify::Notify;
#[cfg(streamz_loom)]
use loom::sync::atomic::AtomicUsize;
#[cfg(not(streamz_loom))]
use std::sync::atomic::AtomicUsize;
#[cfg(not(streamz_loom))]
use tokio::sync::Notify;

use crate::base::config::{ConfigError, EdgeConfig, nonzero};
use crate::base::telemetry::GateSeries;
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
/// limit set with [`HealthGate::with_closed_limit`].
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
/// - `failures_to_close` consecutive unhealthy answers close an open gate;
///   `successes_to_open` consecutive healthy ones open a closed gate.
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
/// # Validation
///
/// The setters never fail; the settings are checked when the gate is
/// piped. A zero `interval`, `check_timeout`, `failures_to_close`, `successes_to_open`
/// or `closed_limit`, an explicit edge with a zero (`edge.capacity`,
/// `edge.max_chunk`), or a check whose own settings are invalid
/// ([`HealthCheck::validate`]: an `HttpProbe`'s `probe.url`, a circuit
/// breaker's `breaker.*`) is refused then with a [`ConfigError`] naming
/// `HealthGate`, the stage and the field.
///
/// ```
/// use std::time::Duration;
/// use streamz::{Health, HealthGate};
/// use tokio::sync::watch;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (_health, signal) = watch::channel(Health::Healthy);
/// let gate = HealthGate::new(signal).with_failures_to_close(0).named("ingress");
/// let err = streamz::iter([1u32]).try_pipe(gate).unwrap_err();
/// assert_eq!((err.operator(), err.stage(), err.field()), (Some("HealthGate"), Some("ingress"), "failures_to_close"));
/// assert_eq!(err.to_string(), "HealthGate `ingress`: `failures_to_close` must be greater than zero");
/// # }
/// ```
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
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let (health, signal) = watch::channel(Health::unhealthy("starting"));
/// let gate = HealthGate::new(signal).with_interval(Duration::from_millis(100));
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
/// # }
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
    close_after: u32,
    open_after: u32,
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

impl GateConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.interval, "interval")?;
        nonzero(self.check_timeout, "check_timeout")?;
        nonzero(self.close_after, "failures_to_close")?;
        nonzero(self.open_after, "successes_to_open")?;
        match self.limit {
            Some((limit, _)) => nonzero(limit, "closed_limit"),
            None => Ok(()),
        }
    }
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
                close_after: 3,
                open_after: 1,
                limit: None,
            },
            status,
            stats: Arc::default(),
            edge: None,
        }
    }

    /// How often to check (1 s by default). Zero is refused when the gate
    /// is piped ([`ConfigError`], field `interval`).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.config.interval = interval;
        self
    }

    /// How long one check may take before it counts as unhealthy (5 s by
    /// default); `Duration::MAX` for no limit. Zero is refused when the
    /// gate is piped ([`ConfigError`], field `check_timeout`).
    pub fn with_check_timeout(mut self, timeout: Duration) -> Self {
        self.config.check_timeout = timeout;
        self
    }

    /// Closes an open gate after `n` consecutive unhealthy answers (3 by
    /// default). Zero is refused when the gate is piped ([`ConfigError`],
    /// field `failures_to_close`).
    pub fn with_failures_to_close(mut self, n: u32) -> Self {
        self.config.close_after = n;
        self
    }

    /// Opens a closed gate after `n` consecutive healthy answers (1 by
    /// default). Zero is refused when the gate is piped ([`ConfigError`],
    /// field `successes_to_open`).
    pub fn with_successes_to_open(mut self, n: u32) -> Self {
        self.config.open_after = n;
        self
    }

    /// Starts open instead of closed: items pass before the first check.
    pub fn starting_open(self) -> Self {
        self.status.send_modify(|s| s.state = GateState::Open);
        self
    }

    /// What to do once the gate has been closed for longer than `limit`.
    /// A zero limit is refused when the gate is piped ([`ConfigError`],
    /// field `closed_limit`).
    pub fn with_closed_limit(mut self, limit: Duration, policy: ClosedPolicy) -> Self {
        self.config.limit = Some((limit, policy));
        self
    }

    crate::flow::processor::name_and_edge!("Sets the stage's output edge.");

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
    /// Mappers holding their calls on the gate's state
    /// ([`DependencySignal`](crate::DependencySignal)): the checker goes
    /// on after the gate ends while any is left.
    holders: AtomicUsize,
    /// Woken when a holder lets go.
    released: Notify,
}

/// A mapper's hold on a gate's checker: keeps it checking after the gate
/// itself has ended, until the mapper lets go.
#[derive(Debug)]
pub(crate) struct Holder(Arc<Stats>);

impl Drop for Holder {
    fn drop(&mut self) {
        self.0
            .holders
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.released.notify_waiters();
    }
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

    /// Keeps the gate's checker running after the gate ends, while the
    /// returned value lives.
    pub(crate) fn hold(&self) -> Holder {
        self.stats
            .holders
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Holder(self.stats.clone())
    }
}

/// What the model tests (tests/loom_gate.rs, only with `--cfg
/// streamz_loom`) drive of the gate's shared state.
#[cfg(streamz_loom)]
#[doc(hidden)]
pub mod loom_hooks {
    use std::task::{Context, Poll};

    use tokio_util::sync::CancellationToken;

    use super::checker::Checker;
    use super::gate::Gate;
    use super::{GateHandle, GateState, Health, HealthCheck, HealthGate};
    use crate::flow::driver::Demand;
    use crate::resilience::async_mapper::DependencySignal;

    /// The lingering checker's stop condition: resolves once no mapper
    /// holds its calls on the gate's state.
    pub async fn released(handle: &GateHandle) {
        super::checker::released(&handle.stats).await;
    }

    /// A gate's two sides as `process` makes them, without a pipeline or
    /// a clock: the checker (fed answers by hand) and the gate's operator.
    pub fn parts<C: HealthCheck>(gate: HealthGate<C>) -> (ModelChecker<C>, ModelGate) {
        let operator = Gate::new(
            gate.status.subscribe(),
            gate.config.limit,
            CancellationToken::new().drop_guard(),
        );
        let checker = Checker {
            check: gate.check,
            config: gate.config,
            status: gate.status,
            stats: gate.stats,
            stage: "model".into(),
            series: super::GateSeries::new(&crate::base::telemetry::StageLabels::new(
                None,
                &"model".into(),
            )),
        };
        let checker = ModelChecker {
            checker,
            runs: (0, 0),
        };
        (checker, ModelGate(operator))
    }

    /// The checker's side: records answers as its schedule would; dropping
    /// it is the checker ending.
    pub struct ModelChecker<C> {
        checker: Checker<C>,
        runs: (u32, u32),
    }

    impl<C: HealthCheck> ModelChecker<C> {
        /// Records one answer of the health check.
        pub fn answer(&mut self, health: Health) {
            let (healthy, unhealthy) = &mut self.runs;
            self.checker.record(health, healthy, unhealthy);
        }
    }

    impl<C> std::fmt::Debug for ModelChecker<C> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ModelChecker").finish_non_exhaustive()
        }
    }

    /// The gate operator's side, as its driver sees it.
    pub struct ModelGate(Gate);

    impl std::fmt::Debug for ModelGate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_tuple("ModelGate").field(&self.0.state()).finish()
        }
    }

    impl ModelGate {
        /// Takes the checker's latest status once it changed (the driver's
        /// `poll_work`).
        pub fn poll_status(&mut self, cx: &mut Context<'_>) -> Poll<()> {
            self.0.poll_status(cx)
        }

        /// A graceful shutdown reached the gate.
        pub fn shut_down(&mut self) {
            self.0.shut_down();
        }

        /// Whether the driver would feed the gate input now.
        pub fn takes_input(&self) -> bool {
            self.0.wants() == Demand::Input
        }

        /// The state the gate's task last saw.
        pub fn state(&self) -> GateState {
            self.0.state()
        }

        /// Whether the gate still follows its checker (until it ends).
        pub fn follows_the_checker(&self) -> bool {
            self.0.follows_the_checker()
        }
    }

    /// Whether a mapper holding its calls on `signal` may call now; while
    /// not, `cx` is woken at the next update.
    pub fn poll_up(signal: &mut DependencySignal, cx: &mut Context<'_>) -> bool {
        signal.poll_up(cx)
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

    fn validate(&self) -> Result<(), ConfigError> {
        self.config
            .validate()
            .and_then(|()| self.edge.map_or(Ok(()), |e| e.validate()))
            .and_then(|()| self.check.validate())
            .map_err(|e| e.in_stage("HealthGate", &self.name))
    }

    fn process(self, input: Flow<T>) -> Flow<T> {
        self.status.send_modify(|s| s.since = Instant::now());
        let edge = self.edge;
        let name = self.name.clone();
        driver::spawn_with(input, &name, edge, move |pipeline, counters| {
            // The checker runs as long as the gate's task (the gate holds
            // the guard that stops it), and after it, untracked, while
            // mappers hold their calls on its state (until they let go or
            // an abort).
            let stop = CancellationToken::new();
            let checker = Checker {
                check: self.check,
                config: self.config,
                status: self.status.clone(),
                stats: self.stats,
                stage: Arc::from(self.name.as_ref()),
                series: GateSeries::new(&counters.labels()),
            };
            let task: Arc<str> = format!("{}.check", counters.name()).into();
            pipeline.spawn(task, checker.run(stop.clone(), pipeline.abort_token()));
            Gate::new(
                self.status.subscribe(),
                self.config.limit,
                stop.drop_guard(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Signal = watch::Receiver<Health>;

    fn gate() -> HealthGate<Signal> {
        let (_tx, rx) = watch::channel(Health::Healthy);
        HealthGate::new(rx).named("ingress")
    }

    fn refused(gate: HealthGate<Signal>) -> (Option<&'static str>, Option<String>, &'static str) {
        let err = crate::iter([1u8]).try_pipe(gate).map(drop).unwrap_err();
        (err.operator(), err.stage().map(str::to_owned), err.field())
    }

    #[test]
    fn zero_settings_are_refused_when_piped() {
        assert_eq!(Processor::<u8, u8>::validate(&gate()), Ok(()));
        let at = |field| (Some("HealthGate"), Some("ingress".to_owned()), field);
        assert_eq!(
            refused(gate().with_interval(Duration::ZERO)),
            at("interval")
        );
        assert_eq!(
            refused(gate().with_check_timeout(Duration::ZERO)),
            at("check_timeout")
        );
        assert_eq!(
            refused(gate().with_failures_to_close(0)),
            at("failures_to_close")
        );
        assert_eq!(
            refused(gate().with_successes_to_open(0)),
            at("successes_to_open")
        );
        assert_eq!(
            refused(gate().with_closed_limit(Duration::ZERO, ClosedPolicy::Fail)),
            at("closed_limit")
        );
        assert_eq!(
            refused(gate().with_edge(EdgeConfig::new(8, 0))),
            at("edge.max_chunk")
        );
    }

    /// A check with a setting of its own.
    struct Picky;

    impl HealthCheck for Picky {
        fn validate(&self) -> Result<(), ConfigError> {
            Err(ConfigError::new("probe.url", "must be reachable"))
        }

        async fn check(&mut self) -> Health {
            Health::Healthy
        }
    }

    #[test]
    fn the_checks_own_settings_are_refused_as_the_gates() {
        let err = Processor::<u8, u8>::validate(&HealthGate::new(Picky)).unwrap_err();
        assert_eq!(
            (err.operator(), err.stage(), err.field()),
            (Some("HealthGate"), Some("health_gate"), "probe.url")
        );
        assert_eq!(
            err.to_string(),
            "HealthGate `health_gate`: `probe.url` must be reachable"
        );
    }
}
