//! Dead-letter queues: route failed items, with the context of their
//! failure, to a sink, and read a file of them back.
//!
//! A [`DeadLetterQueue`] stage lets values pass and turns every error item
//! into a [`DeadLetter`] record for its sink: a bounded [`channel`], an
//! async closure ([`sink_fn`]), a durable file of JSON lines
//! ([`FileSink`]), or any [`DeadLetterSink`]. [`Replay`] reads such a file
//! back as a stream of records, so fixed items can be fed into a pipeline
//! again.
//!
//! Nothing is lost silently: a record the sink cannot take comes back
//! downstream as an error item carrying it, a record dropped by the
//! [`Overflow::DropAndCount`] policy is counted, and the stage's counters
//! keep the law
//!
//! ```text
//! received = emitted + dead_lettered + failed + dropped + aborted
//! ```
//!
//! `docs/errors-and-dlq.md` explains the error model, the record format and
//! the policies.

mod file;
mod json;
mod record;
mod replay;
mod sink;

pub use file::{FileSink, FileSinkOptions, FileSinkStats, Fsync};
pub use json::JsonItems;
pub use record::DeadLetter;
pub use replay::{DEFAULT_MAX_LINE, Replay, ReplayStats};
pub use sink::{ChannelSink, DeadLetterSink, FnSink, Unwritten, channel, sink_fn};

use std::any::type_name;
use std::borrow::Cow;
use std::fmt;
use std::future::{Future, poll_fn};
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{Semaphore, TryAcquireError, mpsc};
use tokio_util::sync::CancellationToken;

use crate::chunk::Chunk;
use crate::config::{ConfigError, EdgeConfig};
use crate::counters::Counters;
use crate::error::{ErrorKind, PanicError, StreamError};
use crate::flow::Flow;
use crate::processor::Processor;
use crate::stage::{TaskIo, send_or_stop, spawn_operator};

/// The note of a record whose error carried an item it cannot keep.
pub(crate) fn not_recorded(error: &StreamError, records: &str) -> String {
    format!(
        "the failed item is a `{}`, which this dead-letter queue does not record \
         (it records {records}); its value could not be kept",
        error.item_type_name().unwrap_or("?")
    )
}

/// Records the stage hands its sink at most per write (fewer with a
/// smaller buffer: a batch counts against the buffer).
const MAX_BATCH: usize = 256;

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DlqError {
    /// The dead-letter file cannot be opened for appending (at
    /// construction, so a bad path never reaches a running pipeline).
    #[error("cannot open the dead-letter file `{}` for appending: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A dead-letter file cannot be read.
    #[error("cannot read the dead-letter file `{}`: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A complete line of a dead-letter file is not a record of the
    /// expected type.
    #[error("line {line} of `{}` is not a dead-letter record: {source}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The line's number, from 1.
        line: u64,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// The path to read is a directory, not a dead-letter file.
    #[error("`{}` is a directory, not a dead-letter file", path.display())]
    IsADirectory {
        /// The path.
        path: PathBuf,
    },
    /// A rotated set of dead-letter files has a hole: a segment is missing
    /// between the oldest and the newest one present (`<name>.1` and
    /// `<name>.3` exist, `<name>.2` does not), so records would be skipped
    /// without a trace.
    #[error(
        "the rotated dead-letter files of `{}` have a gap: segment {missing} is missing between {first} and {last}",
        path.display()
    )]
    MissingSegment {
        /// The current file's path (segments are `<path>.N`).
        path: PathBuf,
        /// The first missing segment number.
        missing: u64,
        /// The oldest segment present.
        first: u64,
        /// The newest segment present.
        last: u64,
    },
    /// A line of a dead-letter file is longer than the replay's limit
    /// ([`Replay::with_max_line`]); it was skipped without being read
    /// into memory.
    #[error(
        "line {line} of `{}` is longer than the limit of {max} bytes and was skipped",
        path.display()
    )]
    LineTooLong {
        /// The file.
        path: PathBuf,
        /// The line's number, from 1.
        line: u64,
        /// The limit in bytes, newline excluded.
        max: usize,
    },
    /// A setting is invalid (from [`FileSinkOptions::create`]).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The sink was full and the policy is [`Overflow::Fail`]: the stream
    /// ends with this error.
    #[error(
        "the dead-letter sink is full ({buffered} records wait for it) and the overflow policy fails the stream"
    )]
    Overflow {
        /// The stage's buffer: the records between the stage and the sink
        /// ([`DeadLetterQueue::with_buffer`]).
        buffered: usize,
    },
    /// The sink's writer task ended early (it panicked), so records could
    /// not reach it.
    #[error("the dead-letter sink stopped; the record could not reach it")]
    SinkStopped,
}

/// What a [`DeadLetterQueue`] does with a record when its sink is slow and
/// the buffer in front of it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Overflow {
    /// Wait for room (the default): the stage stops taking input, so
    /// upstream feels backpressure. Nothing is dropped.
    #[default]
    Block,
    /// Drop the record and count it in the stage's `dropped` counter; a
    /// warning is logged when dropping starts and when the sink catches up
    /// (with the count). Its sequence number is skipped, so the gap shows
    /// in the sink.
    DropAndCount,
    /// End the stream: the stage sends on the items that came before the
    /// record that did not fit, then an error item of its own whose source
    /// is [`DlqError::Overflow`] and whose item is that record, and stops
    /// taking input (upstream stops as when its output is dropped). No
    /// value that came after the record is emitted: the rest of its chunk
    /// and what upstream held are counted `aborted`. Records already
    /// accepted are still written; one the sink refuses may still come
    /// after the error, as an error item carrying it.
    Fail,
}

/// Sends error items to a dead-letter sink; values continue downstream.
///
/// Every error item that reaches the stage becomes a [`DeadLetter`] record
/// with the original item as a `T`, the error's kind, message and source
/// chain, the stage that failed, attempts, first and last failure time and
/// a sequence number. Records go through a bounded buffer to a writer task
/// that calls the sink, so a slow sink does not stall values until the
/// buffer is full; then the [`Overflow`] policy decides. The buffer bounds
/// every record between the stage and the sink's answer, the batch the
/// sink is writing included ([`with_buffer`](DeadLetterQueue::with_buffer)).
/// Values and errors keep their order.
///
/// A record the sink refuses or fails to write comes downstream as a
/// `failed` error item of this stage carrying the record (take it with
/// `take_item::<DeadLetter<T>>()`); a record a sink panicked on comes as a
/// `panicked` one. (A custom sink's panic costs the whole batch it held:
/// each of its records becomes a `panicked` error item without an item.) The
/// stream ends after the sink has been closed (flushed), so a file is
/// complete when the last item has been read.
///
/// # Default
///
/// [`Overflow::Block`], a buffer of 256 records, named `dlq`, output edge
/// from the pipeline's [`EdgeConfig`].
///
/// # Counters
///
/// `emitted` counts values passed on, `dead_lettered` records the sink
/// confirmed, `failed` records that came back as error items, `dropped`
/// records dropped by policy, and `aborted` what an abort or an early stop
/// discarded:
///
/// ```text
/// received = emitted + dead_lettered + failed + dropped + aborted
/// ```
///
/// # Examples
///
/// ```
/// use streamz::DeadLetterQueue;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (sink, mut letters) = streamz::dlq::channel::<String>(64)?;
/// // Read the dead letters while the pipeline runs.
/// let reader = tokio::spawn(async move {
///     let mut all = Vec::new();
///     while let Some(letter) = letters.recv().await {
///         all.push(letter);
///     }
///     all
/// });
/// let flow = streamz::iter(["1", "x", "3"].map(String::from))
///     .try_map(|s: &String| s.parse::<u32>().map(|_| s.clone()))
///     .pipe(DeadLetterQueue::new(sink));
/// let pipeline = flow.pipeline().clone();
/// let values: Vec<String> = flow.collect().await.into_iter().map(Result::unwrap).collect();
/// assert_eq!(values, ["1", "3"]);
///
/// let letters = reader.await?;
/// assert_eq!(letters.len(), 1);
/// assert_eq!(letters[0].item.as_deref(), Some("x"));
/// assert_eq!(letters[0].stage, "try_map");
/// assert_eq!(letters[0].message, "invalid digit found in string");
///
/// let m = pipeline.stage_metrics("dlq").unwrap();
/// assert_eq!((m.received, m.emitted, m.dead_lettered), (3, 2, 1));
/// # Ok(()) }
/// ```
pub struct DeadLetterQueue<T, R, S> {
    name: Cow<'static, str>,
    sink: S,
    items: TakeItem<R>,
    overflow: Overflow,
    buffer: usize,
    edge: Option<EdgeConfig>,
    _values: PhantomData<fn(T) -> T>,
}

/// Takes the item a record keeps out of an error that carries one, or
/// says why it cannot (the record's note).
type TakeItem<R> = Box<dyn Fn(&mut StreamError) -> Result<R, String> + Send + Sync>;

impl<T, R, S> fmt::Debug for DeadLetterQueue<T, R, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterQueue")
            .field("name", &self.name)
            .field("overflow", &self.overflow)
            .field("buffer", &self.buffer)
            .field("edge", &self.edge)
            .finish_non_exhaustive()
    }
}

impl<T, R: Send + 'static, S: DeadLetterSink<R>> DeadLetterQueue<T, R, S> {
    /// A dead-letter queue writing to `sink`, whose records keep failed
    /// items of the sink's type `R`. That need not be the flow's type `T`:
    /// after a stage that maps payments to receipts, the failed items are
    /// payments.
    ///
    /// ```
    /// use streamz::{DeadLetterQueue, StreamError};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (sink, mut letters) = streamz::dlq::channel::<String>(16)?;
    /// let out = streamz::iter(["7", "x"].map(String::from))
    ///     .try_map(|s: &String| s.parse::<u32>()) // a flow of u32, failing on Strings
    ///     .pipe(DeadLetterQueue::new(sink))
    ///     .collect()
    ///     .await;
    /// assert_eq!(*out[0].as_ref().unwrap(), 7);
    /// assert_eq!(letters.recv().await.unwrap().item.as_deref(), Some("x"));
    /// # Ok(()) }
    /// ```
    pub fn new(sink: S) -> Self {
        Self::with_items(
            sink,
            Box::new(|e: &mut StreamError| {
                e.take_item::<R>()
                    .ok_or_else(|| not_recorded(e, &format!("`{}`", type_name::<R>())))
            }),
        )
    }
}

impl<T, S: DeadLetterSink<serde_json::Value>> DeadLetterQueue<T, serde_json::Value, S> {
    /// A dead-letter queue whose records keep failed items of each type in
    /// `items` as JSON values: one queue at the end of a chain whose stages
    /// fail on items of different types. Each record's `item_type` says
    /// which type to read the value back as.
    ///
    /// ```
    /// use streamz::dlq::JsonItems;
    /// use streamz::DeadLetterQueue;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (sink, mut letters) = streamz::dlq::channel(16)?;
    /// let out = streamz::iter(["4", "x", "-3"].map(String::from))
    ///     .try_map(|s: &String| s.parse::<i64>())          // fails on a String
    ///     .try_map(|n: &i64| u32::try_from(*n))            // fails on an i64
    ///     .pipe(DeadLetterQueue::json(sink, JsonItems::new().of::<String>().of::<i64>()))
    ///     .collect()
    ///     .await;
    /// assert_eq!(out.len(), 1);
    /// assert_eq!(letters.recv().await.unwrap().item, Some(serde_json::json!("x")));
    /// assert_eq!(letters.recv().await.unwrap().item, Some(serde_json::json!(-3)));
    /// # Ok(()) }
    /// ```
    pub fn json(sink: S, items: JsonItems) -> Self {
        Self::with_items(sink, Box::new(move |e: &mut StreamError| items.take(e)))
    }
}

impl<T, R, S: DeadLetterSink<R>> DeadLetterQueue<T, R, S> {
    fn with_items(sink: S, items: TakeItem<R>) -> Self {
        DeadLetterQueue {
            name: Cow::Borrowed("dlq"),
            sink,
            items,
            overflow: Overflow::Block,
            buffer: 256,
            edge: None,
            _values: PhantomData,
        }
    }

    /// Sets what happens when the sink is slow and the buffer is full
    /// ([`Overflow::Block`] by default).
    ///
    /// ```
    /// use streamz::dlq::Overflow;
    /// use streamz::DeadLetterQueue;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (sink, _letters) = streamz::dlq::channel::<u32>(16)?;
    /// let dlq = DeadLetterQueue::<u32, _, _>::new(sink).on_overflow(Overflow::Fail);
    /// # drop(dlq);
    /// # Ok(()) }
    /// ```
    pub fn on_overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// How many records may be between the stage and the sink (256 by
    /// default): waiting in the buffer, or handed to a
    /// [`write`](DeadLetterSink::write) the sink has not returned from.
    /// The writer hands the sink at most `min(records, 256)` per write.
    ///
    /// Under [`Overflow::Block`] the stage holds one more record, the one
    /// waiting for room, besides the rest of the input chunk it is routing
    /// (at most the edge's `max_chunk` items, like any stage). So while the
    /// sink does not answer, the stage takes at most `records + max_chunk`
    /// items from its input edge, and upstream holds what its own edges
    /// allow.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] if `records` is zero.
    ///
    /// ```
    /// use streamz::dlq::Overflow;
    /// use streamz::DeadLetterQueue;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (sink, _letters) = streamz::dlq::channel::<u32>(16)?;
    /// // At most 1,000 records wait for the sink; then drop and count.
    /// let dlq = DeadLetterQueue::<u32, _, _>::new(sink)
    ///     .with_buffer(1_000)?
    ///     .on_overflow(Overflow::DropAndCount);
    /// # drop(dlq);
    /// # Ok(()) }
    /// ```
    pub fn with_buffer(mut self, records: usize) -> Result<Self, ConfigError> {
        if records == 0 {
            return Err(ConfigError::Zero { field: "buffer" });
        }
        self.buffer = records;
        Ok(self)
    }

    /// Names the stage (for counters, spans and errors).
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the stage's output edge.
    pub fn with_edge(mut self, edge: EdgeConfig) -> Self {
        self.edge = Some(edge);
        self
    }
}

impl<T, R, S> Processor<T, T> for DeadLetterQueue<T, R, S>
where
    T: Send + 'static,
    R: Send + 'static,
    S: DeadLetterSink<R>,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn process(self, input: Flow<T>) -> Flow<T> {
        let pipeline = input.pipeline().clone();
        spawn_operator(input, &self.name, self.edge, |io| {
            // One permit per record between the router and the sink's
            // confirmation (queued or in a write), so the buffer bounds both.
            let permits = Arc::new(Semaphore::new(self.buffer));
            let (queue, records) = mpsc::unbounded_channel();
            let (returns, returned) = mpsc::unbounded_channel();
            let writer = Writer {
                sink: self.sink,
                records,
                returns,
                permits: permits.clone(),
                batch: self.buffer.min(MAX_BATCH),
                abort: io.abort.clone(),
                counters: io.counters.clone(),
                in_hand: 0,
            };
            let name: Arc<str> = format!("{}.sink", io.counters.name()).into();
            pipeline.spawn(name, writer.run());
            let router = Router {
                items: self.items,
                returned,
                permits,
                counters: io.counters.clone(),
                writer_done: false,
                overflow: self.overflow,
                buffer: self.buffer,
                sequence: 0,
                dropping: 0,
            };
            router.run(io, queue)
        })
    }
}

/// What the writer task sends back to the stage.
enum Returned<R> {
    /// A record the sink did not take.
    Unwritten(Unwritten<R>),
    /// The sink panicked while holding this many records.
    Lost(u64, PanicError),
}

impl<R: Send + 'static> Returned<R> {
    /// The error items this return becomes downstream.
    fn into_errors<T>(self, stage: &str, out: &mut Chunk<T>) -> u64 {
        match self {
            Returned::Unwritten(u) => {
                let (record, reason) = u.into_parts();
                let kind = if reason.is::<PanicError>() {
                    ErrorKind::Panicked
                } else {
                    ErrorKind::Failed
                };
                out.push_error(
                    StreamError::new(kind, stage.to_owned())
                        .with_source(reason)
                        .with_item(record),
                );
                1
            }
            Returned::Lost(n, panic) => {
                for _ in 0..n {
                    out.push_error(
                        StreamError::new(ErrorKind::Panicked, stage.to_owned())
                            .with_source(panic.clone()),
                    );
                }
                n
            }
        }
    }
}

/// The writer task: takes records from the stage's buffer in batches and
/// hands them to the sink.
struct Writer<T, S> {
    sink: S,
    records: mpsc::UnboundedReceiver<DeadLetter<T>>,
    returns: mpsc::UnboundedSender<Returned<T>>,
    /// Given back once the sink has returned from a write.
    permits: Arc<Semaphore>,
    /// Records per write at most.
    batch: usize,
    abort: CancellationToken,
    counters: Counters,
    /// Records of the batch being written, unconfirmed.
    in_hand: u64,
}

/// How long a sink may take to close after an abort before the writer
/// gives up on it, so a stuck sink cannot keep `Pipeline::join` waiting.
const CLOSE_AFTER_ABORT: Duration = Duration::from_secs(5);

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
        let mut flush_timer = crate::time::Timer::new();
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
            let records = std::mem::replace(&mut batch, Vec::with_capacity(self.batch));
            let n = records.len() as u64;
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
                Ok(Ok(())) => self.counters.add_dead_lettered(n),
                Ok(Err(unwritten)) => {
                    let refused = unwritten.len() as u64;
                    self.counters.add_dead_lettered(n.saturating_sub(refused));
                    for u in unwritten {
                        tracing::warn!(sequence = u.record().sequence, reason = %u.reason(), "dead-letter sink refused a record; it goes downstream as an error item");
                        self.give_back(Returned::Unwritten(u), 1);
                    }
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
            if crate::time::timeout(CLOSE_AFTER_ABORT, close)
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

/// The stage task: passes values on and queues records for the writer.
struct Router<R> {
    items: TakeItem<R>,
    returned: mpsc::UnboundedReceiver<Returned<R>>,
    /// Room between the router and the sink, one permit per record.
    permits: Arc<Semaphore>,
    counters: Counters,
    writer_done: bool,
    overflow: Overflow,
    buffer: usize,
    sequence: u64,
    /// Records dropped since the buffer was last found with room.
    dropping: u64,
}

impl<R> Drop for Router<R> {
    /// A stage that stops early counts what the writer gave back and it
    /// can no longer send on; once closed, the writer counts the rest.
    fn drop(&mut self) {
        self.returned.close();
        while let Ok(r) = self.returned.try_recv() {
            self.counters.add_aborted(match r {
                Returned::Unwritten(_) => 1,
                Returned::Lost(n, _) => n,
            });
        }
    }
}

/// What woke the stage.
enum Event<T, R> {
    Input(Option<Chunk<T>>),
    Returned(Returned<R>),
    Stop,
}

/// A sink operation besides `write`.
#[derive(Clone, Copy)]
enum Op {
    Flush,
    Close,
}

/// How routing one chunk ended.
enum Routed {
    /// Every error was queued, dropped or turned into an error item.
    Done,
    /// The overflow policy failed the stream.
    Failed,
    /// The pipeline was aborted, or the output dropped, while waiting for
    /// room.
    Stopped,
}

impl<R: Send + 'static> Router<R> {
    async fn run<T: Send + 'static>(
        mut self,
        io: TaskIo<T, T>,
        queue: mpsc::UnboundedSender<DeadLetter<R>>,
    ) {
        let TaskIo {
            mut src,
            tx,
            abort,
            counters,
            ..
        } = io;
        let stage = counters.name().clone();
        let mut aborted = pin!(abort.cancelled());
        let mut closed = pin!(tx.closed());
        loop {
            let event =
                poll_fn(|cx| self.poll_event(cx, &mut src, &mut aborted, &mut closed)).await;
            let mut out = match event {
                Event::Stop => {
                    counters.add_drained(src.abandon());
                    return;
                }
                Event::Returned(r) => self.returns_chunk(r, &stage),
                Event::Input(None) => break,
                Event::Input(Some(chunk)) if abort.is_cancelled() => {
                    counters.add_drained(chunk.len() as u64 + src.abandon());
                    return;
                }
                Event::Input(Some(chunk)) => {
                    let received = chunk.len() as u64;
                    let mut out = Chunk::with_capacity(chunk.values.len());
                    let mut values = chunk.values.into_iter();
                    let mut errors = chunk.errors.into_iter();
                    let stop = |cx: &mut Context<'_>| {
                        aborted.as_mut().poll(cx).is_ready() || closed.as_mut().poll(cx).is_ready()
                    };
                    let routed = self
                        .route(&queue, &mut values, &mut errors, &mut out, stop)
                        .await;
                    // What routing did not reach (an early stop, or the
                    // values and errors after an overflow that failed the
                    // stream) is discarded.
                    let left = (values.len() + errors.len()) as u64;
                    counters.add(&crate::counters::Local {
                        received,
                        emitted: out.values.len() as u64,
                        ..Default::default()
                    });
                    match routed {
                        Routed::Done => {}
                        Routed::Stopped => {
                            counters.add_undelivered(out.len() as u64);
                            counters.add_aborted(left);
                            counters.add_drained(src.abandon());
                            return;
                        }
                        Routed::Failed => {
                            counters.add_aborted(left);
                            counters.add_drained(src.abandon());
                            // Send what came before the overflow, ending with
                            // its error, then finish like at the end of
                            // input: the writer drains the buffer.
                            if !deliver(&tx, out, &counters, &mut aborted).await {
                                return;
                            }
                            break;
                        }
                    }
                    out
                }
            };
            if !deliver(&tx, std::mem::take(&mut out), &counters, &mut aborted).await {
                counters.add_drained(src.abandon());
                return;
            }
        }
        // The input is done: let the writer drain the buffer and close the
        // sink, and pass on whatever it gives back.
        drop(queue);
        while !self.writer_done {
            let next = poll_fn(|cx| {
                if let Poll::Ready(r) = self.returned.poll_recv(cx) {
                    return Poll::Ready(Some(r));
                }
                // Aborted, or nobody reads the output: stop; the writer
                // still writes what is buffered.
                if aborted.as_mut().poll(cx).is_ready() || closed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            match next {
                None => return,
                Some(None) => self.writer_done = true,
                Some(Some(r)) => {
                    let out = self.returns_chunk(r, &stage);
                    if !deliver(&tx, out, &counters, &mut aborted).await {
                        return;
                    }
                }
            }
        }
    }

    /// The error items of `first` and of every other return already
    /// waiting, in one chunk (a full disk refuses every record).
    fn returns_chunk<T>(&mut self, first: Returned<R>, stage: &str) -> Chunk<T> {
        let mut out = Chunk::default();
        let mut n = first.into_errors(stage, &mut out);
        while let Ok(r) = self.returned.try_recv() {
            n += r.into_errors(stage, &mut out);
        }
        self.counters.add_failed(n);
        out
    }

    fn poll_event<T>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut crate::source::BoxSource<T>,
        aborted: &mut std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
        closed: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Poll<Event<T, R>> {
        if !self.writer_done {
            match self.returned.poll_recv(cx) {
                Poll::Ready(Some(r)) => return Poll::Ready(Event::Returned(r)),
                Poll::Ready(None) => self.writer_done = true,
                Poll::Pending => {}
            }
        }
        if let Poll::Ready(chunk) = src.poll_chunk(cx) {
            return Poll::Ready(Event::Input(chunk));
        }
        if aborted.as_mut().poll(cx).is_ready() || closed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Event::Stop);
        }
        Poll::Pending
    }

    /// Moves the chunk's values to `out` in order and turns each error
    /// into a record queued by the overflow policy. Errors that cannot be
    /// routed become error items in `out`, in the failed item's place. On
    /// a stop or an overflow failure, what follows stays in `values` and
    /// `errors`.
    async fn route<T>(
        &mut self,
        queue: &mpsc::UnboundedSender<DeadLetter<R>>,
        values: &mut std::vec::IntoIter<T>,
        errors: &mut std::vec::IntoIter<(usize, StreamError)>,
        out: &mut Chunk<T>,
        mut stop: impl FnMut(&mut Context<'_>) -> bool,
    ) -> Routed {
        // Values moved to `out` so far.
        let mut moved = 0;
        for (position, error) in errors.by_ref() {
            out.values.extend(values.by_ref().take(position - moved));
            moved = position;
            self.sequence += 1;
            let record = DeadLetter::from_error_with(self.sequence, error, &self.items);
            let permit = match self.overflow {
                Overflow::Block => {
                    let mut acquire = pin!(self.permits.acquire());
                    let acquired = poll_fn(|cx| {
                        if let Poll::Ready(r) = acquire.as_mut().poll(cx) {
                            return Poll::Ready(Some(r));
                        }
                        if stop(cx) {
                            return Poll::Ready(None);
                        }
                        Poll::Pending
                    })
                    .await;
                    match acquired {
                        Some(r) => r.map_err(|_| TryAcquireError::Closed),
                        None => {
                            // The record in hand is discarded with the rest.
                            self.counters.add_aborted(1);
                            return Routed::Stopped;
                        }
                    }
                }
                Overflow::DropAndCount | Overflow::Fail => self.permits.try_acquire(),
            };
            let sent = match permit {
                Ok(permit) => {
                    // The writer hands the room back once the sink answered.
                    permit.forget();
                    if self.dropping > 0 {
                        tracing::warn!(
                            dropped = self.dropping,
                            "dead-letter sink caught up; records were dropped and counted"
                        );
                        self.dropping = 0;
                    }
                    queue.send(record).map_err(|e| e.0)
                }
                Err(TryAcquireError::Closed) => Err(record),
                Err(TryAcquireError::NoPermits) if self.overflow == Overflow::DropAndCount => {
                    // One warning per episode, not one per record.
                    if self.dropping == 0 {
                        tracing::warn!(
                            sequence = record.sequence,
                            "dead-letter sink is full; dropping and counting records until it catches up"
                        );
                    }
                    self.dropping += 1;
                    self.counters.add_dropped(1);
                    Ok(())
                }
                Err(TryAcquireError::NoPermits) => {
                    tracing::error!(
                        sequence = record.sequence,
                        "dead-letter sink is full; the stream fails"
                    );
                    // The last item of the stream: the values after it stay
                    // behind (counted as aborted by the caller).
                    out.push_error(
                        StreamError::new(ErrorKind::Failed, self.counters.name().to_string())
                            .with_source(DlqError::Overflow {
                                buffered: self.buffer,
                            })
                            .with_item(record),
                    );
                    self.counters.add_failed(1);
                    return Routed::Failed;
                }
            };
            if let Err(record) = sent {
                // The writer task is gone: the record travels on instead.
                out.push_error(
                    StreamError::new(ErrorKind::Failed, self.counters.name().to_string())
                        .with_source(DlqError::SinkStopped)
                        .with_item(record),
                );
                self.counters.add_failed(1);
            }
        }
        out.values.extend(values);
        Routed::Done
    }
}

/// Sends `out` downstream; false (with the items counted undelivered) if
/// the stage must stop.
async fn deliver<T>(
    tx: &crate::channel::ChunkTx<T>,
    out: Chunk<T>,
    counters: &Counters,
    aborted: &mut std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
) -> bool {
    let len = out.len() as u64;
    if len == 0 {
        return true;
    }
    let stop = |cx: &mut Context<'_>| aborted.as_mut().poll(cx).is_ready();
    if matches!(send_or_stop(tx, out, stop).await, Some(Ok(()))) {
        true
    } else {
        counters.add_undelivered(len);
        false
    }
}
