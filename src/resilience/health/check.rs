//! [`HealthCheck`]: what a [`HealthGate`](crate::HealthGate) asks, and the
//! closure and watch-channel checks.

use std::fmt;
use std::future::Future;

use tokio::sync::watch;

use crate::base::config::ConfigError;

/// The answer of one health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The dependency can take work.
    Healthy,
    /// It cannot, and why (for logs, tracing events and the gate's status).
    Unhealthy(String),
}

impl Health {
    /// An unhealthy answer with `reason`.
    ///
    /// ```
    /// use streamz::Health;
    ///
    /// assert_eq!(Health::unhealthy("disk full"), Health::Unhealthy("disk full".into()));
    /// ```
    pub fn unhealthy(reason: impl Into<String>) -> Self {
        Health::Unhealthy(reason.into())
    }

    /// Whether the answer is [`Health::Healthy`].
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

impl From<bool> for Health {
    /// `true` is healthy; `false` is unhealthy without a reason.
    fn from(healthy: bool) -> Self {
        if healthy {
            Health::Healthy
        } else {
            Health::unhealthy("reported unhealthy")
        }
    }
}

/// A health signal a [`HealthGate`](crate::HealthGate) polls.
///
/// The gate calls [`check`](HealthCheck::check) every poll interval (with
/// a time limit, and with panics caught: both count as unhealthy). A check
/// that learns of changes by itself (a watch channel) also implements
/// [`changed`](HealthCheck::changed), and the gate checks again at once.
///
/// Built in: closures ([`health_fn`]), `tokio::sync::watch` receivers of
/// [`Health`] or `bool`, and with the `http` feature an HTTP GET probe
/// (`HttpProbe`).
///
/// # Examples
///
/// ```
/// use streamz::{Health, HealthCheck};
///
/// /// Healthy while a queue has room.
/// struct QueueRoom(std::sync::Arc<std::sync::atomic::AtomicUsize>);
///
/// impl HealthCheck for QueueRoom {
///     async fn check(&mut self) -> Health {
///         let depth = self.0.load(std::sync::atomic::Ordering::Relaxed);
///         if depth < 1000 { Health::Healthy } else { Health::unhealthy(format!("queue depth {depth}")) }
///     }
/// }
/// ```
pub trait HealthCheck: Send + 'static {
    /// Checks the check's own settings (a probe's URL, a breaker's
    /// configuration). The [`HealthGate`](crate::HealthGate) calls it when
    /// it is piped and refuses to start on an error, which it names as its
    /// own. The default accepts everything.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field, under a prefix that says whose
    /// it is (`probe.timeout`).
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Asks once.
    fn check(&mut self) -> impl Future<Output = Health> + Send;

    /// Resolves when the signal may have changed, so the gate checks again
    /// before its next poll. The default never resolves.
    fn changed(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// A check that calls an async closure; see [`health_fn`].
pub struct HealthFn<F> {
    f: F,
}

impl<F> fmt::Debug for HealthFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthFn").finish_non_exhaustive()
    }
}

/// A check that calls `f` each time; `f` returns anything that converts
/// into [`Health`] (a `Health`, or a `bool`).
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicBool, Ordering};
///
/// let up = Arc::new(AtomicBool::new(true));
/// let check = streamz::health_fn(move || {
///     let up = up.clone();
///     async move { up.load(Ordering::Relaxed) }
/// });
/// # let _ = streamz::HealthGate::new(check);
/// ```
pub fn health_fn<F, Fut, H>(f: F) -> HealthFn<F>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = H> + Send,
    H: Into<Health>,
{
    HealthFn { f }
}

impl<F, Fut, H> HealthCheck for HealthFn<F>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = H> + Send,
    H: Into<Health>,
{
    async fn check(&mut self) -> Health {
        (self.f)().await.into()
    }
}

/// The latest value on the channel; a change triggers a check at once. A
/// channel whose sender is gone reads as unhealthy.
impl HealthCheck for watch::Receiver<Health> {
    async fn check(&mut self) -> Health {
        if self.has_changed().is_err() {
            return Health::unhealthy("the health signal's sender was dropped");
        }
        self.borrow_and_update().clone()
    }

    async fn changed(&mut self) {
        if watch::Receiver::changed(self).await.is_err() {
            // Closed: `check` reports it; nothing will change again.
            std::future::pending::<()>().await;
        }
    }
}

/// The latest value on the channel (`true` is healthy); a change triggers
/// a check at once. A channel whose sender is gone reads as unhealthy.
impl HealthCheck for watch::Receiver<bool> {
    async fn check(&mut self) -> Health {
        if self.has_changed().is_err() {
            return Health::unhealthy("the health signal's sender was dropped");
        }
        Health::from(*self.borrow_and_update())
    }

    async fn changed(&mut self) {
        if watch::Receiver::changed(self).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
