//! The router: the dead-letter queue's operator, run by the crate's
//! driver. Values pass on; each error becomes a [`DeadLetter`] record for
//! the writer's bounded buffer, under the stage's [`Overflow`] policy; what
//! the writer gives back goes downstream as error items.
//!
//! A record handed to the buffer leaves the router's count
//! ([`Out::hand_off`]): from then on the writer accounts for it
//! (`dead_lettered`, or `aborted` if it stops early) unless it comes back,
//! when the router takes it back ([`Out::take_back`]) and fails it.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::vec;

use tokio::sync::{Semaphore, TryAcquireError, mpsc};
use tokio_util::sync::PollSemaphore;

use super::writer::{Link, Returned};
use super::{DeadLetter, DlqError, Overflow, Redact, TakeItem};
use crate::base::ack::Ack;
use crate::base::chunk::Chunk;
use crate::base::counters::Counters;
use crate::base::error::{ErrorKind, PanicError, StreamError};
use crate::flow::driver::{Demand, Operator, Out};

/// What is left of the chunk being routed.
struct Rest<T> {
    values: vec::IntoIter<T>,
    /// The values' acknowledgements, if they have any.
    acks: Option<vec::IntoIter<Ack>>,
    errors: vec::IntoIter<(usize, StreamError)>,
    /// Values of the chunk emitted so far.
    moved: usize,
}

impl<T> Rest<T> {
    fn len(&self) -> u64 {
        (self.values.len() + self.errors.len()) as u64
    }

    /// The next value's acknowledgement.
    fn ack(&mut self) -> Ack {
        self.acks
            .as_mut()
            .and_then(Iterator::next)
            .unwrap_or_default()
    }
}

pub(super) struct Router<T, R> {
    items: TakeItem<R>,
    /// The user's redaction, applied to each record before it leaves.
    redact: Option<Redact<R>>,
    /// The writer's buffer; dropped at the end of the input, or when the
    /// stream fails, so that the writer drains it and closes the sink.
    queue: Option<mpsc::UnboundedSender<(DeadLetter<R>, Ack)>>,
    returned: mpsc::UnboundedReceiver<Returned<R>>,
    /// The writer has finished: nothing more comes back.
    writer_done: bool,
    /// Room in the buffer, one permit per record (see [`Link`]).
    permits: Arc<Semaphore>,
    /// The same permits, for waiting under [`Overflow::Block`].
    room: PollSemaphore,
    overflow: Overflow,
    buffer: usize,
    sequence: u64,
    /// The pipeline's name, for every record.
    pipeline: Option<String>,
    /// Records dropped since the buffer was last found with room.
    dropping: u64,
    /// Under [`Overflow::Block`]: the record waiting for room, and the
    /// rest of its chunk.
    waiting: Option<(DeadLetter<R>, Ack, Rest<T>)>,
    /// [`Overflow::Fail`] ended the stream.
    failed: bool,
    /// For what the writer gives back after the stage has stopped.
    counters: Counters,
}

impl<T, R> Router<T, R> {
    pub(super) fn new(
        link: Link<R>,
        items: TakeItem<R>,
        redact: Option<Redact<R>>,
        overflow: Overflow,
        buffer: usize,
        counters: Counters,
        pipeline: Option<String>,
    ) -> Self {
        let Link {
            queue,
            returned,
            permits,
        } = link;
        Router {
            items,
            redact,
            queue: Some(queue),
            returned,
            writer_done: false,
            room: PollSemaphore::new(permits.clone()),
            permits,
            overflow,
            buffer,
            sequence: 0,
            pipeline,
            dropping: 0,
            waiting: None,
            failed: false,
            counters,
        }
    }
}

impl<T, R> Drop for Router<T, R> {
    /// A stage that stops early counts what the writer gave back and it
    /// can no longer send on; once closed, the writer counts the rest.
    fn drop(&mut self) {
        self.returned.close();
        while let Ok(r) = self.returned.try_recv() {
            self.counters.add_aborted(match r {
                Returned::Unwritten(..) => 1,
                Returned::Lost(n, _) => n,
            });
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Router<T, R> {
    /// Emits the values of `rest` in order and turns each error into a
    /// record for the buffer, until the chunk is done, a record must wait
    /// for room (kept in `waiting`), or the policy fails the stream.
    fn route(&mut self, mut rest: Rest<T>, out: &mut Out<T>) {
        while let Some((position, mut error)) = rest.errors.next() {
            for _ in rest.moved..position {
                let v = rest
                    .values
                    .next()
                    .expect("an error's position is among the values");
                let ack = rest.ack();
                out.emit(v, ack);
            }
            rest.moved = position;
            self.sequence += 1;
            // The record carries the item's acknowledgement to the writer,
            // which meets it once the sink has written the record.
            let source = error.source_position().cloned();
            let ack = error.take_ack();
            let mut record = DeadLetter::from_error_with(self.sequence, error, &self.items);
            record.pipeline.clone_from(&self.pipeline);
            record.source = source;
            if let Some(redact) = &self.redact {
                redact_or_withhold(redact, &mut record);
            }
            // The writer hands the room back once the sink answered.
            let room = self.permits.try_acquire().map(|permit| permit.forget());
            match room {
                Ok(()) => self.queue(record, ack, out),
                Err(TryAcquireError::Closed) => sink_stopped(record, ack, out),
                Err(TryAcquireError::NoPermits) => match self.overflow {
                    Overflow::Block => {
                        self.waiting = Some((record, ack, rest));
                        return;
                    }
                    Overflow::DropAndCount => {
                        // One warning per episode, not one per record.
                        if self.dropping == 0 {
                            tracing::warn!(
                                sequence = record.sequence,
                                "dead-letter sink is full; dropping and counting records until it catches up"
                            );
                        }
                        self.dropping += 1;
                        out.drop(record, ack);
                    }
                    Overflow::Fail => return self.fail(record, ack, rest, out),
                },
            }
        }
        while let Some(v) = rest.values.next() {
            let ack = rest.ack();
            out.emit(v, ack);
        }
    }

    /// Hands `record`, for which room was taken, to the writer.
    fn queue(&mut self, record: DeadLetter<R>, ack: Ack, out: &mut Out<T>) {
        if self.dropping > 0 {
            tracing::warn!(
                dropped = self.dropping,
                "dead-letter sink caught up; records were dropped and counted"
            );
            self.dropping = 0;
        }
        let sent = match &self.queue {
            Some(queue) => queue.send((record, ack)).map_err(|e| e.0),
            None => Err((record, ack)),
        };
        match sent {
            Ok(()) => out.hand_off(1),
            Err((record, ack)) => sink_stopped(record, ack, out),
        }
    }

    /// [`Overflow::Fail`]: the record that did not fit ends the stream; the
    /// rest of its chunk is discarded (counted aborted, like what waits
    /// upstream, which the driver counts when it stops the input).
    fn fail(&mut self, record: DeadLetter<R>, ack: Ack, rest: Rest<T>, out: &mut Out<T>) {
        tracing::error!(
            sequence = record.sequence,
            "dead-letter sink is full; the stream fails"
        );
        out.fail(
            StreamError::new(ErrorKind::Failed, out.stage().to_string())
                .with_source(DlqError::Overflow {
                    buffered: self.buffer,
                })
                .with_item(record)
                .with_ack(ack),
        );
        // Discarded unprocessed: not acknowledged (a replaying source
        // offers them again).
        rest.values.for_each(|v| out.discard(v));
        rest.errors.for_each(|e| out.discard(e));
        self.failed = true;
        // The writer still writes what was accepted, then closes the sink.
        self.queue = None;
    }
}

/// The writer task is gone: the record travels on as an error item.
fn sink_stopped<T, R: Send + 'static>(record: DeadLetter<R>, ack: Ack, out: &mut Out<T>) {
    out.fail(
        StreamError::new(ErrorKind::Failed, out.stage().to_string())
            .with_source(DlqError::SinkStopped)
            .with_item(record)
            .with_ack(ack),
    );
}

/// Applies the user's redaction to `record`. A redaction that panics may
/// have left anything in place, so the record keeps only what no redaction
/// touches: the item and the error's text are withheld, and a note says
/// why (fail closed: a secret is never written because a hook failed).
fn redact_or_withhold<R>(redact: &Redact<R>, record: &mut DeadLetter<R>) {
    // The writer pairs records with their acknowledgements by sequence:
    // a redaction may not change it.
    let sequence = record.sequence;
    let redacted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| redact(record)));
    record.sequence = sequence;
    if redacted.is_err() {
        tracing::error!(
            sequence = record.sequence,
            stage = %record.stage,
            "the dead-letter redaction panicked; the record is written without its item and the error's text"
        );
        record.item = None;
        record.message = String::from("(withheld: the redaction panicked)");
        record.causes.clear();
        record.note = Some(String::from(
            "the redaction panicked: the item and the error's text were withheld",
        ));
    }
}

/// What the writer gave back goes downstream as error items of this stage.
fn give_out<T, R: Send + 'static>(returned: Returned<R>, out: &mut Out<T>) {
    match returned {
        Returned::Unwritten(u, ack) => {
            let (record, reason) = u.into_parts();
            let kind = if reason.is::<PanicError>() {
                ErrorKind::Panicked
            } else {
                ErrorKind::Failed
            };
            out.take_back(1);
            out.fail(
                StreamError::new(kind, out.stage().to_string())
                    .with_source(reason)
                    .with_item(record)
                    .with_ack(ack),
            );
        }
        Returned::Lost(n, panic) => {
            out.take_back(n);
            for _ in 0..n {
                out.fail(
                    StreamError::new(ErrorKind::Panicked, out.stage().to_string())
                        .with_source(panic.clone()),
                );
            }
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Operator<T, T> for Router<T, R> {
    fn on_chunk(&mut self, chunk: Chunk<T>, out: &mut Out<T>) {
        if chunk.errors.is_empty() {
            return out.forward(chunk);
        }
        let rest = Rest {
            values: chunk.values.into_iter(),
            acks: chunk.acks.map(Vec::into_iter),
            errors: chunk.errors.into_iter(),
            moved: 0,
        };
        self.route(rest, out);
    }

    /// Passes on what the writer gives back, and waits for room for the
    /// record in `waiting`.
    fn poll_work(&mut self, cx: &mut Context<'_>, out: &mut Out<T>) -> Poll<()> {
        let mut progress = false;
        while !self.writer_done {
            match self.returned.poll_recv(cx) {
                Poll::Ready(Some(r)) => give_out(r, out),
                Poll::Ready(None) => self.writer_done = true,
                Poll::Pending => break,
            }
            progress = true;
        }
        if self.waiting.is_some() {
            if let Poll::Ready(permit) = self.room.poll_acquire(cx) {
                let (record, ack, rest) = self.waiting.take().expect("a record waits");
                match permit {
                    Some(permit) => {
                        permit.forget();
                        self.queue(record, ack, out);
                    }
                    None => sink_stopped(record, ack, out),
                }
                self.route(rest, out);
                progress = true;
            }
        }
        if progress {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn demand(&self) -> Demand {
        if self.failed {
            Demand::Done
        } else if self.waiting.is_some() {
            Demand::Hold
        } else {
            Demand::Input
        }
    }

    /// Lets the writer drain the buffer and close the sink; what it gives
    /// back meanwhile still goes downstream (see `busy`).
    fn on_end(&mut self, _out: &mut Out<T>) {
        self.queue = None;
    }

    fn busy(&self) -> bool {
        !self.writer_done
    }

    fn held(&self) -> u64 {
        self.waiting
            .as_ref()
            .map_or(0, |(_, _, rest)| 1 + rest.len())
    }
}
