//! The mapper's state machine: `concurrency` slots, the order they leave
//! in, and the input chunk waiting for free slots. The operator driver
//! runs it; its work in progress (the attempts) is polled from
//! [`Operator::poll_work`], also while the output waits for room, so a
//! timeout measures execution, never a slow consumer.

use std::collections::VecDeque;
use std::future::Future;
use std::task::{Context, Poll};

use super::Guard;
use super::slot::{Outcome, Phase, Policy, Slot};
use crate::base::ack::Ack;
use crate::base::chunk::{Chunk, IntoAcked};
use crate::base::error::{BoxError, Result};
use crate::flow::driver::{Demand, Operator, Out};

/// Items admitted per wake-up before the task yields to the runtime.
const YIELD_AFTER: usize = 2048;

/// The slots and the order they leave in.
pub(super) struct Machine<In, Out, E, F, Fut, G: Guard> {
    pub(super) policy: Policy<F, E, G>,
    pub(super) slots: Vec<Slot<In, Out, E, Fut, G::Token>>,
    pub(super) free: Vec<usize>,
    /// The concurrency: slots are created as items need them, up to this
    /// many, so a huge setting costs nothing until the input fills it.
    pub(super) limit: usize,
    /// Ordered mode: occupied slots in arrival order.
    pub(super) order: VecDeque<usize>,
    pub(super) ordered: bool,
    /// Unordered mode: how many slots are done.
    pub(super) finished: usize,
    /// The in-flight count last exported (feature `metrics`).
    pub(super) exported_busy: usize,
    /// The rest of the input chunk, waiting for free slots.
    pub(super) pending: IntoAcked<In>,
    /// Outputs gathered before the driver sends them: one chunk's worth.
    pub(super) max_chunk: usize,
}

impl<In, O, E, F, Fut, G: Guard> Machine<In, O, E, F, Fut, G>
where
    In: Send + 'static,
    O: 'static,
    E: Into<BoxError> + 'static,
    F: Fn(&In) -> Fut,
    Fut: Future<Output = std::result::Result<O, E>>,
{
    fn occupied(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// How many items may be held now: the fixed concurrency, or the
    /// adaptive limit where it stands.
    fn limit(&self) -> usize {
        self.policy
            .adaptive
            .as_ref()
            .map_or(self.limit, |a| a.limit())
    }

    /// Whether another item can be admitted now. (An adaptive limit may
    /// fall below the slots already made: the extra ones stay free.)
    fn has_room(&self) -> bool {
        self.occupied() < self.limit()
    }

    /// Puts an input item into a free slot (the caller checked there is
    /// room), creating the slot if all existing ones are busy.
    fn admit(&mut self, item: Result<In>, ack: Ack, cx: &mut Context<'_>) {
        let i = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::new());
            self.slots.len() - 1
        });
        let slot = &mut self.slots[i];
        slot.ack = ack;
        if self.ordered {
            self.order.push_back(i);
        }
        match item {
            Ok(value) => {
                slot.item = Some(value);
                slot.attempts = 0;
                slot.first_start = None;
                slot.first_failure = None;
                self.policy.start(slot, cx);
                if matches!(slot.phase, Phase::Done(_)) {
                    self.finished += 1;
                }
            }
            Err(e) => {
                slot.phase = Phase::Done(Outcome::Passed(e));
                self.finished += 1;
            }
        }
    }

    /// Polls every busy slot.
    fn poll_slots(&mut self, cx: &mut Context<'_>) {
        for slot in &mut self.slots {
            if slot.busy() && self.policy.poll(slot, cx) {
                self.finished += 1;
            }
        }
    }

    /// Moves finished items that may leave into `out`, until it holds a
    /// chunk's worth: beyond that they stay in their slots, which is what
    /// holds the input back while the output is full.
    fn take_done(&mut self, out: &mut Out<O>) -> bool {
        let room = self.max_chunk.saturating_sub(out.len());
        let mut moved = 0;
        if self.ordered {
            while moved < room {
                let Some(&i) = self.order.front() else { break };
                if !matches!(self.slots[i].phase, Phase::Done(_)) {
                    break;
                }
                self.order.pop_front();
                self.release(i, out);
                moved += 1;
            }
        } else if self.finished > 0 {
            for i in 0..self.slots.len() {
                if moved >= room {
                    break;
                }
                if matches!(self.slots[i].phase, Phase::Done(_)) {
                    self.release(i, out);
                    moved += 1;
                }
            }
        }
        moved > 0
    }

    fn release(&mut self, i: usize, out: &mut Out<O>) {
        let phase = std::mem::replace(&mut self.slots[i].phase, Phase::Free);
        let ack = std::mem::take(&mut self.slots[i].ack);
        self.finished -= 1;
        self.free.push(i);
        match phase {
            Phase::Done(Outcome::Value(v)) => out.emit(v, ack),
            Phase::Done(Outcome::Failed(e)) => out.fail(e.with_ack(ack)),
            Phase::Done(Outcome::Passed(e)) => out.pass(e),
            Phase::Free | Phase::Running | Phase::Backoff | Phase::Waiting => {
                unreachable!("released a busy slot")
            }
        }
    }
}

impl<In, O, E, F, Fut, G> Operator<In, O> for Machine<In, O, E, F, Fut, G>
where
    In: Send + 'static,
    O: Send + 'static,
    E: Into<BoxError> + Send + 'static,
    F: Fn(&In) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<O, E>> + Send + 'static,
    G: Guard,
{
    fn on_chunk(&mut self, chunk: Chunk<In>, _out: &mut Out<O>) {
        // Admitted (and started) from `poll_work`, as slots free up.
        self.pending = chunk.into_acked();
    }

    fn poll_work(&mut self, cx: &mut Context<'_>, out: &mut Out<O>) -> Poll<()> {
        let mut budget = YIELD_AFTER;
        let mut moved = false;
        loop {
            self.poll_slots(cx);
            let mut progress = self.take_done(out);
            while budget > 0 && self.has_room() {
                let Some((item, ack)) = self.pending.next() else {
                    break;
                };
                self.admit(item, ack, cx);
                let held = self.occupied();
                if let Some(adaptive) = &mut self.policy.adaptive {
                    adaptive.held(held);
                }
                progress = true;
                budget -= 1;
            }
            if !progress {
                break;
            }
            moved = true;
            if budget == 0 {
                cx.waker().wake_by_ref();
                break;
            }
        }
        out.count_attempts(
            std::mem::take(&mut self.policy.retries),
            std::mem::take(&mut self.policy.timeouts),
        );
        // What the guard kept back (a breaker's outcomes) is reported
        // before the task waits.
        self.policy.guard.flush();
        let busy = self.occupied();
        if busy != self.exported_busy {
            self.exported_busy = busy;
            self.policy.series.in_flight.set(busy as f64);
        }
        if moved {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn demand(&self) -> Demand {
        if self.pending.len() == 0 && self.has_room() {
            Demand::Input
        } else {
            Demand::Hold
        }
    }

    fn on_shutdown(&mut self, _out: &mut Out<O>) {
        // Waiting retries end at the next poll of their slots.
        self.policy.shutting_down = true;
    }

    fn held(&self) -> u64 {
        (self.occupied() + self.pending.len()) as u64
    }
}

impl<In, O, E, F, Fut, G: Guard> Drop for Machine<In, O, E, F, Fut, G> {
    /// A stage that stopped early (abort, closed output): the attempts in
    /// flight end without an outcome, and the guard hears of it.
    fn drop(&mut self) {
        for slot in &mut self.slots {
            slot.fut.as_mut().set(None);
            if let Some(token) = slot.token.take() {
                self.policy.guard.cancel(token);
            }
        }
        self.policy.guard.flush();
    }
}
