//! A pipeline's stop signals (shutdown, abort), readable without a lock.
//!
//! tokio-util's `CancellationToken::is_cancelled` takes a mutex. The
//! operator driver asks about abort and shutdown on every wake-up, and that
//! lock was the largest single cost of a batcher's loop. A [`Signal`] pairs
//! the token with a flag that [`Signal::raise`] sets before it cancels the
//! token, so the pipeline's own `shutdown` and `abort` are seen with one
//! atomic load.
//!
//! A shutdown token can also be cancelled from outside (a token the user
//! passed to `Pipeline::with_shutdown_token`, or a parent of it), which
//! sets no flag. A [`Watch`] therefore also asks the token itself every
//! [`RECHECK`] looks, and a task that waits registers on the token's future
//! anyway, so an outside cancellation is seen at the latest after a few
//! events of a busy stage, and at once by an idle one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tokio_util::sync::CancellationToken;

/// How many looks a [`Watch`] answers from the flag alone before it also
/// asks the token.
pub(crate) const RECHECK: u32 = 32;

/// A cancellation token with a lock-free flag for cancellations made
/// through [`raise`](Signal::raise).
#[derive(Clone, Debug)]
pub(crate) struct Signal {
    token: CancellationToken,
    raised: Arc<AtomicBool>,
}

impl Signal {
    pub(crate) fn new(token: CancellationToken) -> Self {
        Signal {
            token,
            raised: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sets the flag, then cancels the token: whoever sees the token
    /// cancelled and then looks at the flag finds it set.
    pub(crate) fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Whether the signal is raised: exact (it asks the token), and so
    /// takes the token's lock unless the flag is already set.
    pub(crate) fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire) || self.token.is_cancelled()
    }

    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// A task-local reader of the signal for a hot loop.
    pub(crate) fn watch(&self) -> Watch {
        Watch {
            signal: self.clone(),
            countdown: AtomicU32::new(RECHECK),
        }
    }
}

/// A task's view of a [`Signal`]: mostly the flag, now and then the token.
#[derive(Debug)]
pub(crate) struct Watch {
    signal: Signal,
    /// Task-local (an atomic only so that `&Watch` may cross an `.await`
    /// of a `Send` future): plain loads and stores, no read-modify-write.
    countdown: AtomicU32,
}

impl Watch {
    /// Whether the signal is raised. Exact for [`Signal::raise`]; a token
    /// cancelled from outside is seen within [`RECHECK`] looks.
    #[inline]
    pub(crate) fn is_raised(&self) -> bool {
        if self.signal.raised.load(Ordering::Acquire) {
            return true;
        }
        let left = self.countdown.load(Ordering::Relaxed) - 1;
        if left > 0 {
            self.countdown.store(left, Ordering::Relaxed);
            return false;
        }
        self.countdown.store(RECHECK, Ordering::Relaxed);
        if self.signal.token.is_cancelled() {
            self.signal.raised.store(true, Ordering::Release);
            return true;
        }
        false
    }

    pub(crate) fn token(&self) -> &CancellationToken {
        &self.signal.token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_signal_is_seen_at_once() {
        let signal = Signal::new(CancellationToken::new());
        let watch = signal.watch();
        assert!(!watch.is_raised());
        signal.raise();
        assert!(watch.is_raised());
        assert!(signal.token().is_cancelled());
    }

    #[test]
    fn a_token_cancelled_from_outside_is_seen_within_recheck_looks() {
        let token = CancellationToken::new();
        let signal = Signal::new(token.child_token());
        let watch = signal.watch();
        token.cancel();
        assert!(signal.is_raised(), "the exact reading asks the token");
        let looks = (1..=RECHECK).find(|_| watch.is_raised());
        assert!(looks.is_some(), "not seen within {RECHECK} looks");
        // Once seen, the flag holds it for every other reader.
        assert!(signal.watch().is_raised());
    }
}
