//! The chunked edge channel: a queue of `Vec` chunks bounded by items.
//!
//! A tokio unbounded queue carries the chunks; a semaphore with `capacity`
//! permits bounds the items in it. A sender takes one permit per item,
//! capped at `capacity`, so a chunk larger than the whole capacity can still
//! pass an empty queue instead of deadlocking. The receiver hands the permits
//! back when it takes a chunk out. Dropping the receiver closes the
//! semaphore, which wakes a waiting sender with its chunk handed back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::sync::{Semaphore, mpsc};

use crate::base::chunk::Chunk;
use crate::base::config::EdgeConfig;

pub(crate) fn chunk_channel<T>(edge: EdgeConfig) -> (ChunkTx<T>, ChunkRx<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    // tokio's semaphore holds at most `MAX_PERMITS` (`usize::MAX >> 3`):
    // a larger capacity is unbounded in practice and is held to that.
    let cap = edge.capacity().min(Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(cap));
    (
        ChunkTx {
            tx,
            permits: permits.clone(),
            cap,
        },
        ChunkRx {
            rx,
            permits,
            cap,
            discarded: Arc::default(),
        },
    )
}

pub(crate) struct ChunkTx<T> {
    tx: mpsc::UnboundedSender<Chunk<T>>,
    permits: Arc<Semaphore>,
    cap: usize,
}

impl<T> Clone for ChunkTx<T> {
    fn clone(&self) -> Self {
        ChunkTx {
            tx: self.tx.clone(),
            permits: self.permits.clone(),
            cap: self.cap,
        }
    }
}

impl<T> ChunkTx<T> {
    fn cost(&self, len: usize) -> u32 {
        // `cap` came from a usize; tokio's semaphore allows at most
        // `usize::MAX >> 3` permits, far above any sane capacity.
        len.min(self.cap).try_into().unwrap_or(u32::MAX)
    }

    /// Sends a chunk, waiting while the queue is full.
    ///
    /// # Errors
    ///
    /// Hands the chunk back if the receiver is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancelling drops the chunk; callers that must count it poll the send
    /// inside a loop that knows its length (see `driver::deliver` and
    /// `stage::send_or_stop`).
    pub(crate) async fn send(&self, chunk: Chunk<T>) -> Result<(), Chunk<T>> {
        if chunk.is_empty() {
            return Ok(());
        }
        match self.permits.acquire_many(self.cost(chunk.len())).await {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(chunk),
        }
        self.tx.send(chunk).map_err(|e| e.0)
    }

    /// Sends a chunk if the queue has room for it now, without the waiter
    /// node and lock that [`send`](Self::send) sets up: the delivery fast
    /// path. A chunk that must wait, or whose receiver is gone, comes back.
    pub(crate) fn try_send(&self, chunk: Chunk<T>) -> Result<(), TrySend<T>> {
        if chunk.is_empty() {
            return Ok(());
        }
        match self.permits.try_acquire_many(self.cost(chunk.len())) {
            Ok(permit) => permit.forget(),
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(TrySend::Full(chunk)),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(TrySend::Closed(chunk)),
        }
        self.tx.send(chunk).map_err(|e| TrySend::Closed(e.0))
    }

    /// Sends a chunk without waiting for room. Used only on the panic path
    /// to deliver the final error item. It takes permits when there are
    /// some; when the queue is full it sends anyway, and the edge's capacity
    /// then stays larger by that chunk's length (at most once per panicked
    /// task, which is a bug, not a workload).
    pub(crate) fn send_now(&self, chunk: Chunk<T>) -> Result<(), Chunk<T>> {
        if let Ok(permit) = self.permits.try_acquire_many(self.cost(chunk.len())) {
            permit.forget();
        }
        self.tx.send(chunk).map_err(|e| e.0)
    }

    /// Ends the stream for the receiver before this sender is dropped: it
    /// reads what the channel holds, then the end. Nothing can be sent
    /// after (a send finds the channel closed). An empty chunk is the
    /// marker: no other send queues one.
    pub(crate) fn end(&self) {
        self.permits.close();
        let _ = self.tx.send(Chunk::default());
    }

    /// Resolves when the receiver is gone.
    pub(crate) async fn closed(&self) {
        self.tx.closed().await
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A chunk [`ChunkTx::try_send`] could not send, and why.
pub(crate) enum TrySend<T> {
    /// The queue has no room for it now.
    Full(Chunk<T>),
    /// The receiver is gone.
    Closed(Chunk<T>),
}

/// A view of an edge channel's fill, for the pipeline's topology.
#[derive(Debug, Clone)]
pub(crate) struct EdgeFill {
    permits: Arc<Semaphore>,
    cap: usize,
    discarded: Arc<AtomicBool>,
}

impl EdgeFill {
    /// Items in the channel now (and its capacity): none once its
    /// receiver is gone or drained it (the permits of what was discarded
    /// are not handed back). A channel its sender ended ([`ChunkTx::end`])
    /// still holds what its receiver has not read.
    pub(crate) fn held(&self) -> (usize, usize) {
        if self.discarded.load(Ordering::Acquire) {
            return (0, self.cap);
        }
        (
            self.cap.saturating_sub(self.permits.available_permits()),
            self.cap,
        )
    }
}

pub(crate) struct ChunkRx<T> {
    rx: mpsc::UnboundedReceiver<Chunk<T>>,
    permits: Arc<Semaphore>,
    cap: usize,
    /// Set once the receiver stopped reading: what the channel held was
    /// discarded, and its permits never come back.
    discarded: Arc<AtomicBool>,
}

impl<T> ChunkRx<T> {
    /// A view of how full the channel is.
    pub(crate) fn fill(&self) -> EdgeFill {
        EdgeFill {
            permits: self.permits.clone(),
            cap: self.cap,
            discarded: self.discarded.clone(),
        }
    }

    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        let chunk = std::task::ready!(self.rx.poll_recv(cx));
        match &chunk {
            // The sender ended the stream ([`ChunkTx::end`]).
            Some(chunk) if chunk.is_empty() => {
                self.rx.close();
                return Poll::Ready(None);
            }
            Some(chunk) => self.permits.add_permits(chunk.len().min(self.cap)),
            None => {}
        }
        Poll::Ready(chunk)
    }

    /// Refuses further chunks and discards the queued ones, returning how
    /// many items they held.
    pub(crate) fn close_and_drain(&mut self) -> u64 {
        self.discarded.store(true, Ordering::Release);
        self.permits.close();
        self.rx.close();
        let mut n = 0;
        while let Ok(chunk) = self.rx.try_recv() {
            n += chunk.len() as u64;
        }
        n
    }
}

impl<T> Drop for ChunkRx<T> {
    fn drop(&mut self) {
        // Wake a sender that waits for room: the chunk comes back to it.
        self.discarded.store(true, Ordering::Release);
        self.permits.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn an_ended_channel_shows_what_it_holds_until_read_or_dropped() {
        let (tx, mut rx) = chunk_channel::<u32>(EdgeConfig::new(8, 16));
        let fill = rx.fill();
        tx.send(Chunk::from_values(vec![1, 2, 3])).await.unwrap();
        tx.end();
        assert_eq!(fill.held(), (3, 8), "ended, not read");
        let got = std::future::poll_fn(|cx| rx.poll_recv(cx)).await.unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(fill.held(), (0, 8), "read");

        let (tx, rx) = chunk_channel::<u32>(EdgeConfig::new(8, 16));
        let fill = rx.fill();
        tx.send(Chunk::from_values(vec![1, 2, 3])).await.unwrap();
        drop(rx);
        assert_eq!(fill.held(), (0, 8), "discarded with its receiver");
    }

    #[tokio::test]
    async fn bounded_by_items_and_oversized_chunk_passes_empty_queue() {
        let (tx, mut rx) = chunk_channel::<u32>(EdgeConfig::new(4, 16));
        // Oversized chunk: takes all 4 permits, passes the empty queue.
        tx.send(Chunk::from_values(vec![0; 10])).await.unwrap();
        // Queue is full now: the next send waits.
        assert!(
            tx.send(Chunk::from_values(vec![1]))
                .now_or_never()
                .is_none()
        );
        let got = std::future::poll_fn(|cx| rx.poll_recv(cx)).await.unwrap();
        assert_eq!(got.len(), 10);
        tx.send(Chunk::from_values(vec![1, 2, 3])).await.unwrap();
        assert!(
            tx.send(Chunk::from_values(vec![4, 5]))
                .now_or_never()
                .is_none()
        );
        tx.send(Chunk::from_values(vec![4])).await.unwrap();
    }

    #[tokio::test]
    async fn dropping_receiver_hands_chunk_back_to_waiting_sender() {
        let (tx, rx) = chunk_channel::<u32>(EdgeConfig::new(1, 1));
        tx.send(Chunk::from_values(vec![1])).await.unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(Chunk::from_values(vec![2])).await }
        });
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(waiting.await.unwrap().unwrap_err().values(), [2]);
        assert!(tx.is_closed());
    }

    #[tokio::test]
    async fn an_ended_channel_gives_what_it_holds_then_the_end() {
        let (tx, mut rx) = chunk_channel::<u32>(EdgeConfig::new(4, 4));
        tx.send(Chunk::from_values(vec![1, 2])).await.unwrap();
        tx.end();
        assert!(tx.send(Chunk::from_values(vec![3])).await.is_err());
        assert!(matches!(
            tx.try_send(Chunk::from_values(vec![3])),
            Err(TrySend::Closed(_))
        ));
        let recv =
            |rx: &mut ChunkRx<u32>| std::future::poll_fn(|cx| rx.poll_recv(cx)).now_or_never();
        assert_eq!(recv(&mut rx).unwrap().unwrap().values(), [1, 2]);
        assert!(recv(&mut rx).unwrap().is_none());
        assert!(recv(&mut rx).unwrap().is_none(), "and stays ended");
        assert!(tx.is_closed());
    }

    #[tokio::test]
    async fn close_and_drain_counts_queued_items() {
        let (tx, mut rx) = chunk_channel::<u32>(EdgeConfig::default());
        tx.send(Chunk::from_values(vec![1, 2, 3])).await.unwrap();
        tx.send(Chunk::from_values(vec![4])).await.unwrap();
        assert_eq!(rx.close_and_drain(), 4);
        assert_eq!(
            tx.send(Chunk::from_values(vec![5]))
                .await
                .unwrap_err()
                .values(),
            [5]
        );
    }
}
