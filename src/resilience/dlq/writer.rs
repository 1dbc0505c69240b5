//! The writer task: takes records from the stage's buffer in batches, hands
//! them to the sink, flushes when the sink asks and closes it at the end.
//!
//! It is not an operator (no input flow, no output edge): it reads the
//! router's buffer and sends back what the sink did not take. It counts
//! what the sink confirmed (`dead_lettered`) and, if it stops early, what
//! it held (`aborted`); the router counts everything else.

use std::future::poll_fn;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::{DeadLetter, DeadLetterSink, Unwritten};
use crate::base::ack::Ack;
use crate::base::counters::Counters;
use crate::base::error::PanicError;
use crate::base::telemetry::{self, Counter};
use crate::flow::pipeline::Pipeline;

/// Records the stage hands its sink at most per write (fewer with a
/// smaller buffer: a batch counts against the buffer).
const MAX_BATCH: usize = 256;

/// How long a sink may take to close after an abort before the writer
/// gives up on it, so a stuck sink cannot keep `Pipeline::join` waiting.
const CLOSE_AFTER_ABORT: Duration = Duration::from_secs(5);

/// The router's ends of the link to a running writer.
pub(super) struct Link<R> {
    /// The buffer; the writer drains it and closes the sink once this is
    /// dropped.
    pub(super) queue: mpsc::UnboundedSender<(DeadLetter<R>, Ack)>,
    /// What the sink did not take; closed when the writer has finished.
    pub(super) returned: mpsc::UnboundedReceiver<Returned<R>>,
    /// Room in the buffer, one permit per record: taken by the router for
    /// each record it queues, given back by the writer once the sink has
    /// answered for it, so the buffer bounds queued records and the batch
    /// in the sink's hands together. Closed when the writer stops.
    pub(super) permits: Arc<Semaphore>,
}

/// Spawns the writer of the stage counted by `counters`, writing to `sink`
/// with room for `buffer` records.
pub(super) fn spawn<R, S>(
    pipeline: &Pipeline,
    counters: &Counters,
    sink: S,
    buffer: usize,
) -> Link<R>
where
    R: Send + 'static,
    S: DeadLetterSink<R>,
{
    let permits = Arc::new(Semaphore::new(buffer));
    let (queue, records) = mpsc::unbounded_channel();
    let (returns, returned) = mpsc::unbounded_channel();
    let writer = Writer {
        sink,
        records,
        returns,
        permits: permits.clone(),
        batch: buffer.min(MAX_BATCH),
        abort: pipeline.abort_token(),
        counters: counters.clone(),
        in_hand: 0,
        written: counters
            .labels()
            .counter(telemetry::DLQ_RECORDS, &[("result", "written")]),
        refused: counters
            .labels()
            .counter(telemetry::DLQ_RECORDS, &[("result", "refused")]),
    };
    let name: Arc<str> = format!("{}.sink", counters.name()).into();
    pipeline.spawn(name, writer.run());
    Link {
        queue,
        returned,
        permits,
    }
}

/// What the writer task sends back to the stage.
pub(super) enum Returned<R> {
    /// A record the sink did not take, with its item's acknowledgement.
    /// (Boxed: a record is large, and rarely given back.)
    Unwritten(Box<Unwritten<R>>, Ack),
    /// The sink panicked while holding this many records.
    Lost(u64, PanicError),
}

/// The writer task: takes records from the stage's buffer in batches and
/// hands them to the sink.
struct Writer<T, S> {
    sink: S,
    records: mpsc::UnboundedReceiver<(DeadLetter<T>, Ack)>,
    returns: mpsc::UnboundedSender<Returned<T>>,
    /// Given back once the sink has returned from a write.
    permits: Arc<Semaphore>,
    /// Records per write at most.
    batch: usize,
    abort: CancellationToken,
    counters: Counters,
    /// Records of the batch being written, unconfirmed.
    in_hand: u64,
    /// Exported: records the sink wrote and refused (feature `metrics`).
    written: Counter,
    refused: Counter,
}

impl<T, S> Drop for Writer<T, S> {
    /// If the writer stops early (an abort, or a panic in sink code outside
    /// its guards), what it held and what waits in the buffer is counted.
    fn drop(&mut self) {
        // A router waiting for room learns that the sink is gone.
        self.permits.close();
        self.records.close();
        let mut left = std::mem::take(&mut self.in_hand);
        while self.records.try_recv().is_ok() {
            left += 1;
        }
        self.counters.add_aborted(left);
    }
}

impl<T: Send + 'static, S: DeadLetterSink<T>> Writer<T, S> {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.batch);
        // One timer for the sink's flush deadlines, re-armed each round.
        let mut flush_timer = crate::base::time::Timer::new();
        loop {
            let flush_at = match catch_unwind(AssertUnwindSafe(|| self.sink.flush_at())) {
                Ok(at) => at,
                Err(payload) => {
                    let panic = PanicError::from_payload(payload);
                    tracing::error!(%panic, "dead-letter sink panicked in flush_at");
                    None
                }
            };
            flush_timer.set(flush_at);
            let flush_due = poll_fn(|cx| flush_timer.poll_due(cx).map(drop));
            // A due flush goes before more records, so a busy buffer cannot
            // postpone it.
            let n = tokio::select! {
                biased;
                () = self.abort.cancelled() => break,
                () = flush_due => {
                    if !self.guarded(Op::Flush).await {
                        break;
                    }
                    continue;
                }
                n = self.records.recv_many(&mut batch, self.batch) => n,
            };
            if n == 0 {
                break; // the stage is done and the buffer is empty
            }
            let taken = std::mem::replace(&mut batch, Vec::with_capacity(self.batch));
            let n = taken.len() as u64;
            // The items' acknowledgements stay here, met once the sink has
            // written their records (by sequence: a refused record's goes
            // back with it).
            let (records, acks): (Vec<_>, Vec<_>) = taken
                .into_iter()
                .map(|(record, ack)| {
                    let sequence = record.sequence;
                    (record, (sequence, ack))
                })
                .unzip();
            self.in_hand = n;
            let sink = &mut self.sink;
            // Inside the guard: the call itself, not only its future, is
            // sink code.
            let write = AssertUnwindSafe(async move { sink.write(records).await }).catch_unwind();
            let result = tokio::select! {
                biased;
                // The batch is dropped unconfirmed (counted by `drop`).
                () = self.abort.cancelled() => break,
                result = write => result,
            };
            self.in_hand = 0;
            // The sink has answered for the batch: its room is free again.
            self.permits.add_permits(n as usize);
            match result {
                Ok(Ok(())) => {
                    self.counters.add_dead_lettered(n);
                    self.written.increment(n);
                    acks.into_iter().for_each(|(_, ack)| ack.ack());
                }
                Ok(Err(unwritten)) => {
                    let refused = unwritten.len() as u64;
                    self.counters.add_dead_lettered(n.saturating_sub(refused));
                    self.written.increment(n.saturating_sub(refused));
                    self.refused.increment(refused);
                    let mut acks: Vec<(u64, Option<Ack>)> =
                        acks.into_iter().map(|(s, a)| (s, Some(a))).collect();
                    for u in unwritten {
                        tracing::warn!(sequence = u.record().sequence, reason = %u.reason(), "dead-letter sink refused a record; it goes downstream as an error item");
                        let sequence = u.record().sequence;
                        let ack = acks
                            .iter_mut()
                            .find(|(s, a)| *s == sequence && a.is_some())
                            .and_then(|(_, a)| a.take())
                            .unwrap_or_default();
                        self.give_back(Returned::Unwritten(Box::new(u), ack), 1);
                    }
                    // The rest were written.
                    acks.into_iter().filter_map(|(_, a)| a).for_each(Ack::ack);
                }
                Err(payload) => {
                    let panic = PanicError::from_payload(payload);
                    tracing::error!(records = n, %panic, "dead-letter sink panicked while writing");
                    self.give_back(Returned::Lost(n, panic), n);
                }
            }
        }
        if self.abort.is_cancelled() {
            // Still close (sync what was written), but not forever.
            let close = self.guarded(Op::Close);
            if crate::base::time::timeout(CLOSE_AFTER_ABORT, close)
                .await
                .is_err()
            {
                tracing::error!(
                    "the dead-letter sink did not close within {CLOSE_AFTER_ABORT:?} of the abort"
                );
            }
        } else {
            self.guarded(Op::Close).await;
        }
    }

    /// Runs a flush or the close with panics caught and errors logged;
    /// false if an abort cut a flush short.
    async fn guarded(&mut self, op: Op) -> bool {
        let what = match op {
            Op::Flush => "flush",
            Op::Close => "close",
        };
        let sink = &mut self.sink;
        let call = AssertUnwindSafe(async move {
            match op {
                Op::Flush => sink.flush().await,
                Op::Close => sink.close().await,
            }
        })
        .catch_unwind();
        let result = match op {
            Op::Close => call.await,
            Op::Flush => tokio::select! {
                biased;
                () = self.abort.cancelled() => return false,
                result = call => result,
            },
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "dead-letter sink failed to {what}"),
            Err(payload) => {
                let panic = PanicError::from_payload(payload);
                tracing::error!(%panic, "dead-letter sink panicked in {what}");
            }
        }
        true
    }

    /// Sends records back to the stage; if the stage is gone (its output
    /// was dropped or it was aborted), they are counted as aborted.
    fn give_back(&self, returned: Returned<T>, n: u64) {
        if self.returns.send(returned).is_err() {
            tracing::error!(
                records = n,
                "dead-letter records could not be written and the stage has stopped"
            );
            self.counters.add_aborted(n);
        }
    }
}

/// A sink operation besides `write`.
#[derive(Clone, Copy)]
enum Op {
    Flush,
    Close,
}
