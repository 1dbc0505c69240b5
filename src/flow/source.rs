//! Where items come from: the upstream end of a [`Flow`](crate::Flow).
//!
//! Internally every flow reads from a [`ChunkSource`]: a channel receiver, an
//! iterator, a `futures::Stream`, a push channel, or a fused step wrapped
//! around another source. Sources hand out whatever is ready, up to the
//! edge's `max_chunk`, and never wait to fill a chunk.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::base::ack::Ack;
use crate::base::channel::ChunkRx;
use crate::base::chunk::Chunk;
use crate::base::counters::Counters;
use crate::base::error::Result;
use crate::flow::step::{ChunkCtx, Step, run_end};

/// A pull-based source of chunks.
pub(crate) trait ChunkSource<T>: Send {
    /// The next chunk, or `None` at the end. A returned chunk is never empty.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>>;

    /// Stops the source early and discards what is queued in it, returning
    /// how many items were discarded (items already accepted from a producer
    /// that will now never be delivered).
    fn abandon(&mut self) -> u64;
}

pub(crate) type BoxSource<T> = Box<dyn ChunkSource<T>>;

impl<T: Send> ChunkSource<T> for ChunkRx<T> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        self.poll_recv(cx)
    }

    fn abandon(&mut self) -> u64 {
        self.close_and_drain()
    }
}

/// Stops at graceful shutdown: a source checks it before producing a chunk.
pub(crate) struct Shutdown {
    fut: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
}

impl Shutdown {
    pub(crate) fn new(token: tokio_util::sync::CancellationToken) -> Self {
        Shutdown {
            fut: Box::pin(token.cancelled_owned()),
            done: false,
        }
    }

    /// Whether shutdown was requested; registers `cx` to be woken when it is.
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.done && self.fut.as_mut().poll(cx).is_ready() {
            self.done = true;
        }
        self.done
    }
}

/// Items pulled from an iterator, `max_chunk` at a time.
pub(crate) struct IterSource<I> {
    pub(crate) iter: Option<I>,
    pub(crate) max_chunk: usize,
    // Never pending, so a flag check is enough: no waker to register. A
    // `Watch` (no lock) rather than the token: this runs once per chunk.
    pub(crate) shutdown: crate::base::signal::Watch,
    pub(crate) counters: Counters,
    /// Entered while the iterator runs; see [`source_span`].
    pub(crate) span: Option<tracing::Span>,
}

impl<I> ChunkSource<I::Item> for IterSource<I>
where
    I: Iterator + Send,
    I::Item: Send,
{
    fn poll_chunk(&mut self, _cx: &mut Context<'_>) -> Poll<Option<Chunk<I::Item>>> {
        if self.shutdown.is_raised() {
            self.iter = None;
        }
        let Some(iter) = &mut self.iter else {
            return Poll::Ready(None);
        };
        let values: Vec<_> = {
            let _span = source_span(&mut self.span, &self.counters).enter();
            iter.by_ref().take(self.max_chunk).collect()
        };
        if values.is_empty() {
            self.iter = None;
            return Poll::Ready(None);
        }
        self.counters.add_emitted(values.len() as u64);
        Poll::Ready(Some(Chunk::from_values(values)))
    }

    fn abandon(&mut self) -> u64 {
        self.iter = None;
        0
    }
}

/// Items polled from a `futures::Stream` until it is pending or the chunk is full.
pub(crate) struct StreamSource<S> {
    pub(crate) stream: Option<Pin<Box<S>>>,
    pub(crate) max_chunk: usize,
    pub(crate) shutdown: Shutdown,
    pub(crate) counters: Counters,
    /// Entered while the stream is polled; see [`source_span`].
    pub(crate) span: Option<tracing::Span>,
}

/// A source's span, made at its first chunk (its name is final by then):
/// the user's iterator or stream runs in whichever task pulls, so its
/// events carry the source's name as well as that task's.
fn source_span<'a>(slot: &'a mut Option<tracing::Span>, counters: &Counters) -> &'a tracing::Span {
    slot.get_or_insert_with(|| {
        let labels = counters.labels();
        tracing::debug_span!("source", pipeline = %labels.pipeline(), name = %labels.stage())
    })
}

/// What a stream source's items can be: items, or items with their
/// acknowledgements.
pub(crate) trait SourceItem<T> {
    fn push_into(self, chunk: &mut Chunk<T>);
}

impl<T> SourceItem<T> for Result<T> {
    #[inline]
    fn push_into(self, chunk: &mut Chunk<T>) {
        chunk.push(self);
    }
}

impl<T> SourceItem<T> for (Result<T>, Ack) {
    #[inline]
    fn push_into(self, chunk: &mut Chunk<T>) {
        match self {
            (Ok(v), ack) => chunk.push_acked(v, ack),
            (Err(e), ack) => chunk.push_error(e.with_ack(ack)),
        }
    }
}

impl<S, T> ChunkSource<T> for StreamSource<S>
where
    S: Stream + Send,
    S::Item: SourceItem<T>,
    T: Send,
{
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        if self.shutdown.poll(cx) {
            self.stream = None;
        }
        let Some(stream) = &mut self.stream else {
            return Poll::Ready(None);
        };
        let mut chunk = Chunk::default();
        let mut ended = false;
        let _span = source_span(&mut self.span, &self.counters).enter();
        while chunk.len() < self.max_chunk {
            match stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => item.push_into(&mut chunk),
                Poll::Ready(None) => {
                    ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if ended {
            self.stream = None;
        }
        if chunk.is_empty() {
            return if ended {
                Poll::Ready(None)
            } else {
                Poll::Pending
            };
        }
        self.counters.add_produced(&chunk);
        Poll::Ready(Some(chunk))
    }

    fn abandon(&mut self) -> u64 {
        self.stream = None;
        0
    }
}

/// The receiving end of [`channel`](crate::channel): items an application
/// pushed one at a time, taken out up to `max_chunk` at once.
pub(crate) struct PushSource<I> {
    pub(crate) rx: mpsc::Receiver<I>,
    pub(crate) max_chunk: usize,
    pub(crate) shutdown: Shutdown,
    pub(crate) closing: bool,
    pub(crate) counters: Counters,
}

impl<T: Send, I: SourceItem<T> + Send> ChunkSource<T> for PushSource<I> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        if !self.closing && self.shutdown.poll(cx) {
            // Refuse new pushes; what was already accepted still drains.
            self.closing = true;
            self.rx.close();
        }
        let mut items = Vec::new();
        match self.rx.poll_recv_many(cx, &mut items, self.max_chunk) {
            Poll::Ready(0) => Poll::Ready(None),
            Poll::Ready(_) => {
                let mut chunk = Chunk::with_capacity(items.len());
                items
                    .into_iter()
                    .for_each(|item| item.push_into(&mut chunk));
                self.counters.add_produced(&chunk);
                Poll::Ready(Some(chunk))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn abandon(&mut self) -> u64 {
        self.rx.close();
        let mut left = Chunk::default();
        while let Ok(item) = self.rx.try_recv() {
            item.push_into(&mut left);
        }
        // Accepted from the producer, so produced by this source: the
        // stage that abandons them counts them as received and aborted.
        self.counters.add_produced(&left);
        left.len() as u64
    }
}

/// A step fused onto another source: runs in whichever task pulls.
pub(crate) struct FusedSource<In, S> {
    pub(crate) inner: BoxSource<In>,
    pub(crate) step: S,
    pub(crate) counters: Counters,
    pub(crate) ended: bool,
    /// An abort ends the input too; then `on_end` is not called.
    pub(crate) abort: tokio_util::sync::CancellationToken,
    /// The step's span, made at its first chunk (its name is final by
    /// then), inside the span of the task it runs in.
    pub(crate) span: Option<tracing::Span>,
}

impl<In, S> FusedSource<In, S> {
    /// Counts what the step holds as aborted (once: the step is done).
    fn abort_held<Out>(&mut self)
    where
        S: Step<In, Out>,
    {
        let held = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step.held()));
        self.counters.add_aborted(held.unwrap_or(0));
    }
}

/// How many fully filtered-out chunks a fused source consumes in one poll
/// before it yields, so a filter that rejects everything cannot starve the
/// runtime.
const MAX_EMPTY_CHUNKS_PER_POLL: usize = 32;

impl<In, Out, S> ChunkSource<Out> for FusedSource<In, S>
where
    In: Send + 'static,
    Out: Send,
    S: Step<In, Out>,
{
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<Out>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        for _ in 0..MAX_EMPTY_CHUNKS_PER_POLL {
            match self.inner.poll_chunk(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(chunk)) => {
                    let ctx = ChunkCtx {
                        counters: &self.counters,
                    };
                    let counters = &self.counters;
                    let _span = self
                        .span
                        .get_or_insert_with(|| {
                            let labels = counters.labels();
                            tracing::debug_span!(
                                "step",
                                pipeline = %labels.pipeline(),
                                name = %labels.stage()
                            )
                        })
                        .enter();
                    let out = self.step.on_chunk(chunk, ctx);
                    if !out.is_empty() {
                        return Poll::Ready(Some(out));
                    }
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    if self.abort.is_cancelled() {
                        self.abort_held();
                        return Poll::Ready(None);
                    }
                    let mut out = Chunk::default();
                    run_end(&mut self.step, &mut out, &self.counters);
                    return Poll::Ready((!out.is_empty()).then_some(out));
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn abandon(&mut self) -> u64 {
        if !self.ended {
            self.ended = true;
            self.abort_held();
        }
        self.inner.abandon()
    }
}

/// Pushes items into a flow made by [`channel`](crate::channel).
///
/// Cloneable; the flow ends when every `Pusher` is dropped. `send` waits
/// while the channel is full, so a producer feels the pipeline's
/// backpressure.
///
/// Once its pipeline shuts down ([`Pipeline::shutdown`](crate::Pipeline::shutdown)
/// or [`abort`](crate::Pipeline::abort)) a `Pusher` refuses at once, whether
/// or not anything still reads the flow: `send` and `try_send` hand the item
/// back, [`is_closed`](Pusher::is_closed) is true and
/// [`closed`](Pusher::closed) resolves. Items accepted before the shutdown
/// still drain through the chain.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (tx, flow) = streamz::channel::<u32>();
/// let producer = tokio::spawn(async move {
///     for i in 0..3 {
///         tx.send(i).await.unwrap();
///     }
/// });
/// let out: Vec<u32> = flow.collect().await.into_iter().map(Result::unwrap).collect();
/// producer.await.unwrap();
/// assert_eq!(out, [0, 1, 2]);
/// # }
/// ```
///
/// After a shutdown:
///
/// ```
/// use streamz::{Pipeline, TrySendError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let pipeline = Pipeline::new();
/// let (tx, flow) = pipeline.channel::<u32>();
/// tx.send(1).await.unwrap();
/// pipeline.shutdown();
/// assert_eq!(tx.send(2).await.unwrap_err().0, 2);
/// assert!(matches!(tx.try_send(3), Err(TrySendError::Closed(3))));
/// assert!(tx.is_closed());
/// // What was accepted before still arrives.
/// assert_eq!(flow.collect().await.into_iter().map(Result::unwrap).collect::<Vec<_>>(), [1]);
/// # }
/// ```
pub struct Pusher<T> {
    tx: mpsc::Sender<Result<T>>,
    /// The pipeline's shutdown token. The source closes its receiver only
    /// when it is next polled, which may be never (its stage is blocked on a
    /// full output or a closed gate), so the pusher watches the token itself.
    shutdown: tokio_util::sync::CancellationToken,
    /// The [`Sink`](futures::Sink) side, made on first use.
    sink: Option<SinkState<T>>,
}

/// What a `Pusher` used as a `Sink` keeps between polls: the reserved slot,
/// and the shutdown it waits on while the channel is full.
struct SinkState<T> {
    tx: tokio_util::sync::PollSender<Result<T>>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<T> Pusher<T> {
    pub(crate) fn new(
        tx: mpsc::Sender<Result<T>>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        Pusher {
            tx,
            shutdown,
            sink: None,
        }
    }
}

impl<T> Clone for Pusher<T> {
    fn clone(&self) -> Self {
        Pusher::new(self.tx.clone(), self.shutdown.clone())
    }
}

/// A `Pusher` is a [`Sink`](futures::Sink) of values, so a producer can use
/// `SinkExt::send_all` or `StreamExt::forward`. Like [`Pusher::send`], it
/// waits while the flow is full, and refuses with [`PusherClosed`] once the
/// flow is dropped or the pipeline shuts down, even while the channel is
/// full. Items go straight into the flow's channel: flushing has nothing
/// to wait for.
///
/// ```
/// use futures::{SinkExt, StreamExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (mut tx, flow) = streamz::channel::<u32>();
/// let producer = tokio::spawn(async move {
///     let mut values = futures::stream::iter(0..5).map(Ok);
///     tx.send_all(&mut values).await
/// });
/// let out: Vec<u32> = flow.collect().await.into_iter().map(Result::unwrap).collect();
/// producer.await.unwrap().unwrap();
/// assert_eq!(out, [0, 1, 2, 3, 4]);
/// # }
/// ```
impl<T: Send + 'static> futures::Sink<T> for Pusher<T> {
    type Error = PusherClosed;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), PusherClosed>> {
        let this = self.get_mut();
        if this.shutdown.is_cancelled() {
            return Poll::Ready(Err(PusherClosed));
        }
        let (tx, shutdown) = (&this.tx, &this.shutdown);
        let state = this.sink.get_or_insert_with(|| SinkState {
            tx: tokio_util::sync::PollSender::new(tx.clone()),
            shutdown: Box::pin(shutdown.clone().cancelled_owned()),
        });
        if let Poll::Ready(reserved) = state.tx.poll_reserve(cx) {
            return Poll::Ready(reserved.map_err(|_| PusherClosed));
        }
        // Full: a shutdown must still refuse at once (nothing may read).
        match state.shutdown.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(PusherClosed)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn start_send(self: Pin<&mut Self>, item: T) -> Result<(), PusherClosed> {
        let this = self.get_mut();
        if this.shutdown.is_cancelled() {
            return Err(PusherClosed);
        }
        match &mut this.sink {
            Some(state) => state.tx.send_item(Ok(item)).map_err(|_| PusherClosed),
            // `poll_ready` was not called first: the Sink contract's misuse.
            None => Err(PusherClosed),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), PusherClosed>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), PusherClosed>> {
        // Only this pusher's sink side lets go; the flow ends when every
        // `Pusher` is dropped.
        if let Some(state) = &mut self.get_mut().sink {
            state.tx.close();
        }
        Poll::Ready(Ok(()))
    }
}

/// A [`Pusher`] used as a [`Sink`](futures::Sink) found its flow closed: the
/// flow was dropped, or the pipeline shut down or aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the flow no longer accepts items: it was dropped, or its pipeline is shutting down")]
pub struct PusherClosed;

impl<T> fmt::Debug for Pusher<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pusher")
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// The flow no longer accepts items (it was dropped, or the pipeline is
/// shutting down); the item is handed back.
#[derive(PartialEq, Eq, Clone, Copy, thiserror::Error)]
#[error("the flow no longer accepts items: it was dropped, or its pipeline is shutting down")]
pub struct SendError<T>(pub T);

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SendError(..)")
    }
}

/// Why [`Pusher::try_send`] did not take the item; the item is handed back.
#[derive(PartialEq, Eq, Clone, Copy, thiserror::Error)]
pub enum TrySendError<T> {
    /// The channel is full: the pipeline is applying backpressure.
    #[error("the flow is full: the pipeline is applying backpressure")]
    Full(T),
    /// The flow no longer accepts items.
    #[error("the flow no longer accepts items: it was dropped, or its pipeline is shutting down")]
    Closed(T),
}

impl<T> fmt::Debug for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("Full(..)"),
            TrySendError::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

impl<T> TrySendError<T> {
    /// The item that was not sent.
    pub fn into_inner(self) -> T {
        match self {
            TrySendError::Full(t) | TrySendError::Closed(t) => t,
        }
    }
}

impl<T> Pusher<T> {
    /// Sends a value, waiting while the flow is full.
    ///
    /// # Errors
    ///
    /// [`SendError`] with the item if the flow no longer accepts items: it
    /// was dropped, or the pipeline shut down or aborted (also while this
    /// call waits for room).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, the item
    /// was not sent (and is dropped with the future).
    pub async fn send(&self, item: T) -> std::result::Result<(), SendError<T>> {
        match self.reserve().await {
            Some(permit) => {
                permit.send(Ok(item));
                Ok(())
            }
            None => Err(SendError(item)),
        }
    }

    /// Sends an item that may already be an error (from an upstream system).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (tx, flow) = streamz::channel::<u32>();
    /// tx.send_result(Err(streamz::StreamError::failed("upstream", "bad record"))).await.unwrap();
    /// drop(tx);
    /// assert!(flow.collect().await[0].is_err());
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`SendError`] with the item if the flow no longer accepts items.
    ///
    /// # Cancel safety
    ///
    /// As [`send`](Pusher::send).
    pub async fn send_result(
        &self,
        item: Result<T>,
    ) -> std::result::Result<(), SendError<Result<T>>> {
        match self.reserve().await {
            Some(permit) => {
                permit.send(item);
                Ok(())
            }
            None => Err(SendError(item)),
        }
    }

    /// Room for one item, or `None` once the flow no longer accepts items.
    /// Shutdown wins over room, so nothing is accepted after it.
    async fn reserve(&self) -> Option<mpsc::Permit<'_, Result<T>>> {
        if self.shutdown.is_cancelled() {
            return None;
        }
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => None,
            permit = self.tx.reserve() => permit.ok(),
        }
    }

    /// Sends a value if there is room now.
    ///
    /// # Errors
    ///
    /// [`TrySendError::Full`] when the flow is applying backpressure,
    /// [`TrySendError::Closed`] when it no longer accepts items (also at
    /// once after a shutdown, full or not).
    pub fn try_send(&self, item: T) -> std::result::Result<(), TrySendError<T>> {
        use mpsc::error::TrySendError as E;
        if self.shutdown.is_cancelled() {
            return Err(TrySendError::Closed(item));
        }
        self.tx.try_send(Ok(item)).map_err(|e| match e {
            E::Full(Ok(t)) => TrySendError::Full(t),
            E::Closed(Ok(t)) => TrySendError::Closed(t),
            E::Full(Err(_)) | E::Closed(Err(_)) => unreachable!("sent an Ok"),
        })
    }

    /// Whether the flow no longer accepts items: it was dropped, or the
    /// pipeline shut down or aborted.
    ///
    /// ```
    /// let pipeline = streamz::Pipeline::new();
    /// let (pusher, _flow) = pipeline.channel::<u32>();
    /// assert!(!pusher.is_closed());
    /// pipeline.shutdown();
    /// assert!(pusher.is_closed());
    /// ```
    pub fn is_closed(&self) -> bool {
        self.shutdown.is_cancelled() || self.tx.is_closed()
    }

    /// Waits until the flow no longer accepts items (it was dropped, the
    /// pipeline shut down or aborted): for a producer that waits on
    /// something else and should stop when nobody reads.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let pipeline = streamz::Pipeline::new();
    /// let (pusher, flow) = pipeline.channel::<u32>();
    /// drop(flow);
    /// pusher.closed().await;
    /// assert!(pusher.is_closed());
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn closed(&self) {
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            () = self.tx.closed() => {}
        }
    }
}

/// The pushing end of a source whose items carry acknowledgements (a
/// connector's): like [`Pusher`], with an [`Ack`] beside each item.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub(crate) struct AckedPusher<T> {
    tx: mpsc::Sender<(Result<T>, Ack)>,
    shutdown: tokio_util::sync::CancellationToken,
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
impl<T> AckedPusher<T> {
    pub(crate) fn new(
        tx: mpsc::Sender<(Result<T>, Ack)>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        AckedPusher { tx, shutdown }
    }

    /// Sends an item with its acknowledgement, waiting for room; hands
    /// them back once the flow no longer accepts items (shutdown wins over
    /// room, as for [`Pusher`]).
    pub(crate) async fn send(
        &self,
        item: Result<T>,
        ack: Ack,
    ) -> std::result::Result<(), (Result<T>, Ack)> {
        if self.shutdown.is_cancelled() {
            return Err((item, ack));
        }
        let permit = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => None,
            permit = self.tx.reserve() => permit.ok(),
        };
        match permit {
            Some(permit) => {
                permit.send((item, ack));
                Ok(())
            }
            None => Err((item, ack)),
        }
    }

    /// Resolves once the flow no longer accepts items.
    pub(crate) async fn closed(&self) {
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            () = self.tx.closed() => {}
        }
    }
}
