//! tokio's `Notify` as far as the crate uses it, on loom's lock, for the
//! model tests only (`--cfg streamz_loom`): loom cannot see tokio's own
//! lock, so with tokio's `Notify` a model would not explore the steps of a
//! wake-up. It keeps tokio's documented contract: a `Notified` receives
//! every `notify_waiters` made after it was created, polled or not.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use loom::sync::Mutex;

#[derive(Debug)]
pub(crate) struct Notify {
    /// Calls of `notify_waiters` so far, and the wakers waiting.
    state: Mutex<(u64, Vec<Waker>)>,
}

impl Default for Notify {
    fn default() -> Self {
        Notify {
            state: Mutex::new((0, Vec::new())),
        }
    }
}

impl Notify {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn notified(&self) -> Notified<'_> {
        let seen = self.state.lock().unwrap().0;
        Notified { notify: self, seen }
    }

    pub(crate) fn notify_waiters(&self) {
        let wakers = {
            let mut state = self.state.lock().unwrap();
            state.0 += 1;
            std::mem::take(&mut state.1)
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

pub(crate) struct Notified<'a> {
    notify: &'a Notify,
    seen: u64,
}

impl Notified<'_> {
    /// Nothing to do: created is enough to receive `notify_waiters`.
    pub(crate) fn enable(self: Pin<&mut Self>) {}
}

impl Future for Notified<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.notify.state.lock().unwrap();
        if state.0 != self.seen {
            return Poll::Ready(());
        }
        state.1.push(cx.waker().clone());
        Poll::Pending
    }
}
