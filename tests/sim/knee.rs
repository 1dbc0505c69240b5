//! A simulated dependency for adaptive concurrency: its latency is flat up
//! to a knee and grows in proportion to the calls in flight beyond it (a
//! service with `knee` workers and a queue), and it can be told to shed
//! load with an overload error above some concurrency.
//!
//! Shared by `tests/adaptive_concurrency.rs` (paused clock) and
//! `benches/adaptive.rs` (real clock).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The dependency's answer when it sheds load (an HTTP 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("503 Service Unavailable")]
pub struct Overloaded;

/// The simulated dependency. Clones share it.
#[derive(Debug, Clone)]
pub struct Knee {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    knee: usize,
    base: Duration,
    active: AtomicUsize,
    /// Above this many calls in flight a call is refused (usize::MAX: never).
    shed_above: AtomicUsize,
    calls: AtomicUsize,
}

/// Leaves the in-flight count when the call ends or is cancelled.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[allow(dead_code)] // each user takes what it needs
impl Knee {
    /// Latency `base` up to `knee` calls at once, `base × n / knee` for
    /// `n` beyond it.
    pub fn new(knee: usize, base: Duration) -> Self {
        Knee {
            inner: Arc::new(Inner {
                knee,
                base,
                active: AtomicUsize::new(0),
                shed_above: AtomicUsize::new(usize::MAX),
                calls: AtomicUsize::new(0),
            }),
        }
    }

    /// From now on, refuse calls beyond `n` in flight with [`Overloaded`]
    /// (after a tenth of the base latency, as a fast 503).
    pub fn shed_above(&self, n: usize) {
        self.inner.shed_above.store(n, Ordering::SeqCst);
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    /// Calls made so far.
    pub fn calls(&self) -> usize {
        self.inner.calls.load(Ordering::SeqCst)
    }

    /// One call.
    pub async fn call(self) -> Result<(), Overloaded> {
        let inner = &*self.inner;
        inner.calls.fetch_add(1, Ordering::SeqCst);
        let n = inner.active.fetch_add(1, Ordering::SeqCst) + 1;
        let _in_flight = InFlight(&inner.active);
        if n > inner.shed_above.load(Ordering::SeqCst) {
            tokio::time::sleep(inner.base / 10).await;
            return Err(Overloaded);
        }
        let latency = if n <= inner.knee {
            inner.base
        } else {
            inner.base * n as u32 / inner.knee as u32
        };
        tokio::time::sleep(latency).await;
        Ok(())
    }
}
