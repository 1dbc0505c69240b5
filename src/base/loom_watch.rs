//! tokio's `watch` channel as far as the health gate uses it, on loom's
//! lock, for the model tests only (`--cfg streamz_loom`): loom cannot see
//! tokio's own lock and atomics, so with tokio's `watch` a model would not
//! explore the steps of a change reaching its receivers.
//!
//! It keeps tokio's documented contract:
//! - a value sent is seen by every receiver's `borrow`;
//! - `changed` resolves once a value newer than the receiver last saw was
//!   sent (even one sent before `changed` was called), marking it seen;
//!   only when there is none and the sender is gone does it fail;
//! - `borrow_and_update` marks the current value seen;
//! - a clone of a receiver has seen what the original has.
//!
//! The wake-up goes through the model of `Notify` (its `Notified` is
//! created before the version is read, as tokio's `changed` does).

use std::fmt;
use std::ops::Deref;

use loom::sync::{Arc, Mutex, MutexGuard};

use super::loom_notify::Notify;

struct State<T> {
    value: T,
    /// Values sent so far.
    version: u64,
    /// `Sender` handles alive: the channel closes when the last goes.
    senders: usize,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    changed: Notify,
}

/// The sending half: [`tokio::sync::watch::Sender`]'s model.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// A receiving half: [`tokio::sync::watch::Receiver`]'s model.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// The version this receiver has seen.
    seen: u64,
}

/// A borrowed value (holds the channel's lock, as tokio's `Ref` holds its
/// read lock).
pub(crate) struct Ref<'a, T>(MutexGuard<'a, State<T>>);

impl<T> Deref for Ref<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0.value
    }
}

/// The sender is gone and every value it sent was seen.
#[derive(Debug)]
pub(crate) struct RecvError;

pub(crate) fn channel<T>(value: T) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            value,
            version: 0,
            senders: 1,
        }),
        changed: Notify::new(),
    });
    let rx = Receiver {
        shared: shared.clone(),
        seen: 0,
    };
    (Sender { shared }, rx)
}

impl<T> Sender<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.shared.state.lock().unwrap()
    }

    pub(crate) fn borrow(&self) -> Ref<'_, T> {
        Ref(self.lock())
    }

    pub(crate) fn subscribe(&self) -> Receiver<T> {
        let seen = self.lock().version;
        Receiver {
            shared: self.shared.clone(),
            seen,
        }
    }

    /// Changes the value in place; a change (`modify` returned `true`) is
    /// a new version, and wakes the receivers.
    pub(crate) fn send_if_modified(&self, modify: impl FnOnce(&mut T) -> bool) -> bool {
        {
            let mut state = self.lock();
            if !modify(&mut state.value) {
                return false;
            }
            state.version += 1;
        }
        self.shared.changed.notify_waiters();
        true
    }

    pub(crate) fn send_modify(&self, modify: impl FnOnce(&mut T)) {
        self.send_if_modified(|value| {
            modify(value);
            true
        });
    }

    pub(crate) fn send_replace(&self, value: T) -> T {
        let mut old = None;
        self.send_if_modified(|current| {
            old = Some(std::mem::replace(current, value));
            true
        });
        old.expect("the value was replaced")
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        {
            let mut state = self.lock();
            state.senders -= 1;
            if state.senders > 0 {
                return;
            }
        }
        // The last sender is gone: receivers waiting for a change fail.
        self.shared.changed.notify_waiters();
    }
}

impl<T> Receiver<T> {
    pub(crate) fn borrow(&self) -> Ref<'_, T> {
        Ref(self.shared.state.lock().unwrap())
    }

    pub(crate) fn borrow_and_update(&mut self) -> Ref<'_, T> {
        let state = self.shared.state.lock().unwrap();
        self.seen = state.version;
        Ref(state)
    }

    pub(crate) async fn changed(&mut self) -> Result<(), RecvError> {
        loop {
            let notified = self.shared.changed.notified();
            {
                let state = self.shared.state.lock().unwrap();
                if state.version != self.seen {
                    self.seen = state.version;
                    return Ok(());
                }
                if state.senders == 0 {
                    return Err(RecvError);
                }
            }
            notified.await;
        }
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        Receiver {
            shared: self.shared.clone(),
            seen: self.seen,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl<T: fmt::Debug> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

/// The current value, then each newer one (`tokio_stream::wrappers::WatchStream`'s
/// model); ends when the sender is gone.
pub(crate) fn stream<T: Clone + Send + Sync + 'static>(
    rx: Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first {
            rx.changed().await.ok()?;
        }
        let value = rx.borrow_and_update().clone();
        Some((value, (rx, false)))
    })
}
