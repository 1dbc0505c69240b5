//! The gate itself: an operator that takes input only while the gate is
//! open (see [`HealthGate`](super::HealthGate) for the behaviour).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::base::watch;
use tokio::time::Instant;
use tokio_util::sync::DropGuard;

use super::{ClosedPolicy, GateError, GateState, GateStatus};
use crate::base::chunk::Chunk;
use crate::base::error::{ErrorKind, StreamError};
use crate::base::time::{self, Deadline};
use crate::flow::driver::{Demand, Operator, Out};

type Changed = Pin<Box<dyn Future<Output = Option<watch::Receiver<GateStatus>>> + Send>>;

/// Waits for the next change of the gate's state; `None` once the checker
/// is gone (the state then stays as it is).
fn next_change(mut status: watch::Receiver<GateStatus>) -> Changed {
    Box::pin(async move { status.changed().await.ok().map(|()| status) })
}

pub(super) struct Gate {
    /// The state as last seen.
    status: GateStatus,
    changed: Option<Changed>,
    limit: Option<(Duration, ClosedPolicy)>,
    /// Closed past the limit (with a policy other than `Wait`).
    overdue: bool,
    /// A graceful shutdown started: what waits at a closed gate's input
    /// leaves as `gate_closed` errors carrying the items.
    shutting_down: bool,
    /// The `Fail` policy ended the stream.
    failed: bool,
    _stop_checker: DropGuard,
}

impl Gate {
    pub(super) fn new(
        mut status: watch::Receiver<GateStatus>,
        limit: Option<(Duration, ClosedPolicy)>,
        stop_checker: DropGuard,
    ) -> Self {
        let current = status.borrow_and_update().clone();
        Gate {
            status: current,
            changed: Some(next_change(status)),
            limit,
            overdue: false,
            shutting_down: false,
            failed: false,
            _stop_checker: stop_checker,
        }
    }

    fn reason(&self) -> String {
        self.status
            .reason
            .clone()
            .unwrap_or_else(|| "no healthy answer yet".into())
    }

    /// What a value gets when it passes a closed gate.
    fn rejection(&self) -> GateError {
        match self.limit {
            Some((limit, _)) if self.overdue => GateError::ClosedTooLong {
                limit,
                reason: self.reason(),
            },
            _ => GateError::ShutDownWhileClosed {
                reason: self.reason(),
            },
        }
    }
}

impl<T: Send + 'static> Operator<T, T> for Gate {
    fn on_chunk(&mut self, chunk: Chunk<T>, out: &mut Out<T>) {
        if self.status.state == GateState::Open {
            return out.forward(chunk);
        }
        let error = self.rejection();
        for (item, ack) in chunk.into_acked() {
            match item {
                Ok(value) => out.fail(
                    StreamError::new(ErrorKind::GateClosed, out.stage().to_string())
                        .with_source(error.clone())
                        .with_item(value)
                        .with_ack(ack)
                        .with_attempts(0), // never tried: the gate held it
                ),
                Err(e) => out.pass(e),
            }
        }
    }

    fn poll_work(&mut self, cx: &mut Context<'_>, _out: &mut Out<T>) -> Poll<()> {
        self.poll_status(cx)
    }

    fn deadline(&self) -> Deadline {
        match self.limit {
            Some((limit, policy))
                if policy != ClosedPolicy::Wait
                    && self.status.state == GateState::Closed
                    && !self.overdue =>
            {
                time::after(self.status.since, limit)
            }
            _ => None,
        }
    }

    fn on_deadline(&mut self, _now: Instant, out: &mut Out<T>) {
        let Some((limit, policy)) = self.limit else {
            return;
        };
        self.overdue = true;
        if policy == ClosedPolicy::Fail {
            let reason = self.reason();
            tracing::error!(stage = %out.stage(), ?limit, %reason, "health gate closed too long; the stream fails");
            let error = StreamError::new(ErrorKind::GateClosed, out.stage().to_string())
                .with_source(GateError::ClosedTooLong { limit, reason });
            // Stands for no input item: the items waiting upstream are
            // counted as aborted when the driver stops the input.
            out.push_error(error, 0);
            self.failed = true;
        }
    }

    fn on_shutdown(&mut self, _out: &mut Out<T>) {
        self.shut_down();
    }

    fn demand(&self) -> Demand {
        self.wants()
    }
}

impl Gate {
    /// Takes the checker's latest status once it changes (ready then).
    pub(super) fn poll_status(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(changed) = &mut self.changed else {
            return Poll::Pending;
        };
        let Poll::Ready(next) = changed.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        self.changed = next.map(|mut status| {
            self.status = status.borrow_and_update().clone();
            self.overdue = false;
            next_change(status)
        });
        Poll::Ready(())
    }

    /// A graceful shutdown started.
    pub(super) fn shut_down(&mut self) {
        self.shutting_down = true;
    }

    /// Whether the checker's status is still followed (until the checker
    /// is gone).
    #[cfg(streamz_loom)]
    pub(super) fn follows_the_checker(&self) -> bool {
        self.changed.is_some()
    }

    /// The state as the gate's task last saw it.
    #[cfg(streamz_loom)]
    pub(super) fn state(&self) -> GateState {
        self.status.state
    }

    /// What the gate wants of its input now.
    pub(super) fn wants(&self) -> Demand {
        if self.failed {
            Demand::Done
        } else if self.status.state == GateState::Open || self.overdue || self.shutting_down {
            Demand::Input
        } else {
            Demand::Hold
        }
    }
}
