//! [`DependencySignal`]: whether a mapper's dependency is up, so that its
//! calls and retries wait while it is down instead of spending attempts
//! ([`AsyncMapper::hold_while_down`](super::AsyncMapper::hold_while_down)).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

use crate::resilience::health::{GateHandle, GateState, Health, Holder};

/// Whether a dependency is up, as an [`AsyncMapper`](super::AsyncMapper)
/// holding its calls sees it
/// ([`hold_while_down`](super::AsyncMapper::hold_while_down)).
///
/// Made from what already watches the dependency:
///
/// | from | up while |
/// |---|---|
/// | a [`GateHandle`] | the [`HealthGate`](crate::HealthGate) is open (its checker keeps checking after the gate's input ends, for as long as the signal lives, in a task the gate's pipeline does not wait for; an abort of that pipeline stops it) |
/// | a `watch::Receiver<Health>` | the value is [`Health::Healthy`] |
/// | a `watch::Receiver<bool>` | the value is `true` |
/// | a [`Breaker`] (feature `circuit-breaker`) | it permits calls (closed, half-open, disabled) |
/// | [`from_stream`](DependencySignal::from_stream) | the last [`Health`] the stream gave is healthy |
///
/// A mapper that holds on the same [`Breaker`]
/// that guards its calls wants [`OpenPolicy::Wait`]:
/// half-open counts as up, so every held item is released then, and only
/// the trial calls get a permit; with the default `Reject` the others
/// become `circuit_open` errors at that moment, with `Wait` they wait for
/// their permit.
///
/// Make a gate's signal while its pipeline runs (as when the pipeline is
/// built): one made after the gate and its checker have ended follows
/// nothing, and is up.
///
/// A signal whose source ends (its sender dropped, the stream over) is up
/// from then on: nothing could ever say the dependency is back, and a
/// mapper must not hold its items forever on a signal nobody sends.
///
/// ```
/// use streamz::{AsyncMapper, DependencySignal, Health};
/// use tokio::sync::watch;
///
/// let (health, signal) = watch::channel(Health::Healthy);
/// let lookup = AsyncMapper::new(|id: &u32| std::future::ready(Ok::<_, std::io::Error>(*id)))
///     .hold_while_down(signal);
/// // Elsewhere: health.send(Health::unhealthy("database failover"))
/// # drop(health);
/// ```
///
// The breaker's items exist with its feature only; without it the links
// lead to the crate's page, which says how to turn it on.
#[cfg_attr(
    feature = "circuit-breaker",
    doc = "[`Breaker`]: crate::breaker::Breaker"
)]
#[cfg_attr(
    feature = "circuit-breaker",
    doc = "[`OpenPolicy::Wait`]: crate::breaker::OpenPolicy::Wait"
)]
#[cfg_attr(not(feature = "circuit-breaker"), doc = "[`Breaker`]: crate")]
#[cfg_attr(not(feature = "circuit-breaker"), doc = "[`OpenPolicy::Wait`]: crate")]
pub struct DependencySignal {
    updates: Option<Pin<Box<dyn Stream<Item = Health> + Send>>>,
    /// The last answer: `None` while up, the reason while down.
    down: Option<String>,
    /// A gate's checker kept running for this signal.
    _holder: Option<Holder>,
}

impl fmt::Debug for DependencySignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DependencySignal")
            .field("down", &self.down)
            .finish_non_exhaustive()
    }
}

/// Updates taken per poll before the mapper's task yields.
const UPDATES_PER_POLL: usize = 64;

impl DependencySignal {
    /// A signal following `updates`: down after an unhealthy answer, up
    /// after a healthy one (up until the first answer).
    pub fn from_stream(updates: impl Stream<Item = Health> + Send + 'static) -> Self {
        DependencySignal {
            updates: Some(Box::pin(updates)),
            down: None,
            _holder: None,
        }
    }

    /// Takes every update that arrived and says whether the dependency is
    /// up now; while it is down, `cx` is woken at the next update.
    pub(crate) fn poll_up(&mut self, cx: &mut Context<'_>) -> bool {
        // A stream that always has another update must not keep the task.
        let mut budget = UPDATES_PER_POLL;
        while let Some(updates) = &mut self.updates {
            if budget == 0 {
                cx.waker().wake_by_ref();
                break;
            }
            budget -= 1;
            match updates.poll_next_unpin(cx) {
                Poll::Ready(Some(Health::Healthy)) => self.down = None,
                Poll::Ready(Some(Health::Unhealthy(reason))) => self.down = Some(reason),
                Poll::Ready(None) => {
                    if self.down.is_some() {
                        tracing::warn!("a dependency signal ended while down: calls go ahead");
                    }
                    self.updates = None;
                    self.down = None;
                }
                Poll::Pending => break,
            }
        }
        self.down.is_none()
    }

    /// Why the dependency is down (its last unhealthy answer).
    pub(crate) fn reason(&self) -> &str {
        self.down.as_deref().unwrap_or("down")
    }
}

impl From<watch::Receiver<Health>> for DependencySignal {
    fn from(rx: watch::Receiver<Health>) -> Self {
        DependencySignal::from_stream(WatchStream::new(rx))
    }
}

impl From<watch::Receiver<bool>> for DependencySignal {
    fn from(rx: watch::Receiver<bool>) -> Self {
        DependencySignal::from_stream(WatchStream::new(rx).map(Health::from))
    }
}

/// The gate's status, then each change.
#[cfg(not(streamz_loom))]
fn gate_updates(gate: &GateHandle) -> WatchStream<crate::GateStatus> {
    WatchStream::new(gate.subscribe())
}

/// The gate's status, then each change, through the model of `watch`.
#[cfg(streamz_loom)]
fn gate_updates(gate: &GateHandle) -> impl Stream<Item = crate::GateStatus> + Send + use<> {
    crate::base::loom_watch::stream(gate.subscribe())
}

impl From<GateHandle> for DependencySignal {
    fn from(gate: GateHandle) -> Self {
        DependencySignal::from(&gate)
    }
}

impl From<&GateHandle> for DependencySignal {
    fn from(gate: &GateHandle) -> Self {
        let updates = gate_updates(gate).map(|status| match status.state {
            GateState::Open => Health::Healthy,
            GateState::Closed => Health::Unhealthy(format!(
                "the health gate is closed: {}",
                status.reason.as_deref().unwrap_or("not yet healthy")
            )),
        });
        DependencySignal {
            _holder: Some(gate.hold()),
            ..DependencySignal::from_stream(updates)
        }
    }
}

#[cfg(feature = "circuit-breaker")]
impl From<crate::breaker::Breaker> for DependencySignal {
    fn from(breaker: crate::breaker::Breaker) -> Self {
        DependencySignal::from_stream(breaker.health_updates())
    }
}
