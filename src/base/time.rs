//! Deadlines that cannot overflow.
//!
//! Users write `Duration::MAX` for "no limit". `Instant + Duration::MAX`
//! panics, and a deadline clamped to "thirty years from now" still makes
//! every user of it reason about a fake instant. So every deadline in the
//! crate is a [`Deadline`]: `None` means never. Only this module adds a
//! duration to an instant.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A point in time, or `None` for never.
pub(crate) type Deadline = Option<Instant>;

/// `now + after`, or never if that is not representable (`Duration::MAX`
/// and anything past the clock's range).
#[inline]
pub(crate) fn after(now: Instant, after: Duration) -> Deadline {
    now.checked_add(after)
}

/// `t + d`, or about thirty years after `t` (tokio's own far future) if
/// that is not representable: for a boundary that must be an instant, such
/// as the end of a window that never closes by time.
pub(crate) fn far_after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or_else(|| {
        t.checked_add(Duration::from_secs(86_400 * 365 * 30))
            .unwrap_or(t)
    })
}

/// The earlier of two deadlines (never is later than any instant).
#[inline]
pub(crate) fn earliest(a: Deadline, b: Deadline) -> Deadline {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// `d` as a whole number of nanoseconds, saturating (`Duration::MAX` is
/// about 5.8e20 ns, beyond `u64`).
#[inline]
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One reusable timer that can also wait for "never".
///
/// Created once per operator and re-armed with [`Timer::set`]; an unarmed
/// or never-armed timer is simply pending.
#[derive(Debug)]
pub(crate) struct Timer {
    sleep: Pin<Box<Sleep>>,
    at: Deadline,
}

impl Timer {
    pub(crate) fn new() -> Self {
        Timer {
            sleep: Box::pin(tokio::time::sleep_until(Instant::now())),
            at: None,
        }
    }

    /// Arms the timer for `at` (never: disarms it). Re-arming for the
    /// deadline it already has costs nothing.
    pub(crate) fn set(&mut self, at: Deadline) {
        if self.at == at {
            return;
        }
        self.at = at;
        if let Some(at) = at {
            self.sleep.as_mut().reset(at);
        }
    }

    /// The deadline the timer is armed for.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn deadline(&self) -> Deadline {
        self.at
    }

    /// Ready once the armed deadline has passed; then disarmed.
    pub(crate) fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<Instant> {
        let Some(at) = self.at else {
            return Poll::Pending;
        };
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.at = None;
                Poll::Ready(at)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Sleeps until `at`; never returns for "never".
pub(crate) async fn sleep_until(at: Deadline) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs `fut` with a time limit of `limit` (`Duration::MAX`: none).
///
/// # Errors
///
/// `Elapsed` if the limit passed first.
pub(crate) async fn timeout<F: Future>(
    limit: Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match after(Instant::now(), limit) {
        Some(at) => tokio::time::timeout_at(at, fut).await,
        None => Ok(fut.await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[tokio::test(start_paused = true)]
    async fn max_means_never() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::MAX), None);
        assert_eq!(
            after(now, Duration::from_secs(1)),
            Some(now + Duration::from_secs(1))
        );
        assert_eq!(earliest(None, Some(now)), Some(now));
        assert_eq!(earliest(Some(now), None), Some(now));
        assert_eq!(nanos(Duration::MAX), u64::MAX);

        let mut t = Timer::new();
        t.set(after(now, Duration::MAX));
        tokio::time::advance(Duration::from_secs(86_400 * 365 * 100)).await;
        assert!(poll_fn(|cx| Poll::Ready(t.poll_due(cx).is_pending())).await);

        let limited = timeout(Duration::MAX, async { 7 }).await;
        assert_eq!(limited.unwrap(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn timer_fires_once_then_disarms() {
        let mut t = Timer::new();
        let at = Instant::now() + Duration::from_millis(5);
        t.set(Some(at));
        assert_eq!(poll_fn(|cx| t.poll_due(cx)).await, at);
        assert_eq!(t.deadline(), None);
        assert!(poll_fn(|cx| Poll::Ready(t.poll_due(cx).is_pending())).await);
    }
}
