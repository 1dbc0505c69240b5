//! The [`DeadLetterSink`] trait and the channel and closure sinks.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

use crate::base::config::{ConfigError, nonzero};
use crate::base::error::{BoxError, PanicError};
use crate::resilience::dlq::DeadLetter;

/// Where a [`DeadLetterQueue`](crate::DeadLetterQueue) puts its records.
///
/// The stage hands records to a writer task of its own, which calls
/// [`write`](DeadLetterSink::write) with batches in sequence order, calls
/// [`flush`](DeadLetterSink::flush) when [`flush_at`](DeadLetterSink::flush_at)
/// says, and [`close`](DeadLetterSink::close) once at the end. A sink never
/// loses a record silently: one it cannot take comes back as an
/// [`Unwritten`], and the stage sends it downstream as an error item that
/// carries it.
///
/// The built-in sinks are [`channel`], [`sink_fn`] and
/// [`FileSink`](crate::resilience::dlq::FileSink).
///
/// # Examples
///
/// A sink that keeps records in memory, up to a limit:
///
/// ```
/// use streamz::dlq::{DeadLetterSink, Unwritten};
/// use streamz::DeadLetter;
///
/// struct Bounded(Vec<DeadLetter<u32>>);
///
/// impl DeadLetterSink<u32> for Bounded {
///     async fn write(&mut self, records: Vec<DeadLetter<u32>>) -> Result<(), Vec<Unwritten<u32>>> {
///         let mut full = Vec::new();
///         for record in records {
///             if self.0.len() < 100 {
///                 self.0.push(record);
///             } else {
///                 full.push(Unwritten::new(record, "the store is full"));
///             }
///         }
///         if full.is_empty() { Ok(()) } else { Err(full) }
///     }
/// }
/// ```
pub trait DeadLetterSink<T>: Send + 'static {
    /// Writes `records`, oldest first. `Ok` means every record was taken;
    /// `Err` lists the records that were not, each with its reason (the
    /// others were taken).
    fn write(
        &mut self,
        records: Vec<DeadLetter<T>>,
    ) -> impl Future<Output = Result<(), Vec<Unwritten<T>>>> + Send;

    /// When the writer task should call [`flush`](DeadLetterSink::flush)
    /// even if no record arrives (a sink that syncs on an interval); `None`
    /// (the default) for never.
    fn flush_at(&self) -> Option<tokio::time::Instant> {
        None
    }

    /// Checks the sink's settings (a channel's capacity, a file's sync
    /// policy). The [`DeadLetterQueue`](crate::DeadLetterQueue) calls it
    /// when it is piped and refuses to start on an error, which it names
    /// as its own. The default accepts everything.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field under `sink.` (`sink.capacity`).
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Makes written records durable. The default does nothing.
    ///
    /// An error here does not un-write records; the writer task logs it.
    fn flush(&mut self) -> impl Future<Output = Result<(), BoxError>> + Send {
        async { Ok(()) }
    }

    /// Called once after the last write, also after an abort (then with
    /// five seconds to finish, so a stuck sink cannot hold up
    /// [`Pipeline::join`](crate::Pipeline::join)). The default calls
    /// [`flush`](DeadLetterSink::flush).
    fn close(&mut self) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.flush()
    }
}

/// A record a sink could not take, with the reason.
///
/// The dead-letter queue stage sends it downstream as a `failed` error
/// item of its own stage, whose source is the reason and whose item is the
/// [`DeadLetter`] record, so nothing is lost.
pub struct Unwritten<T> {
    record: DeadLetter<T>,
    reason: BoxError,
}

impl<T> Unwritten<T> {
    /// `record` was not written because of `reason`.
    pub fn new(record: DeadLetter<T>, reason: impl Into<BoxError>) -> Self {
        Unwritten {
            record,
            reason: reason.into(),
        }
    }

    /// The record.
    pub fn record(&self) -> &DeadLetter<T> {
        &self.record
    }

    /// Why it was not written.
    pub fn reason(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.reason
    }

    /// The record and the reason.
    pub fn into_parts(self) -> (DeadLetter<T>, BoxError) {
        (self.record, self.reason)
    }
}

impl<T> fmt::Debug for Unwritten<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unwritten")
            .field("sequence", &self.record.sequence)
            .field("reason", &self.reason)
            .finish()
    }
}

/// A sink that sends records on a bounded channel; see [`channel`].
#[derive(Debug)]
pub struct ChannelSink<T> {
    tx: async_channel::Sender<DeadLetter<T>>,
    /// The capacity asked for (the channel holds at least one record).
    capacity: usize,
}

/// The reading end of a dead-letter [`channel`]: an
/// [`async_channel::Receiver`]. Clone it to share the records among
/// several readers (each record goes to one of them); read it with
/// `recv().await`, as a `Stream`, or with `recv_blocking()` from a plain
/// thread (a synchronous database writer, say). The channel closes when the
/// dead-letter queue is gone and its records are read.
pub type DeadLetterReceiver<T> = async_channel::Receiver<DeadLetter<T>>;

/// A sink that sends each record on a bounded channel whose receiver
/// ([`DeadLetterReceiver`]) you read. When the channel is full the sink waits, and the dead-letter
/// queue's [`Overflow`](crate::resilience::dlq::Overflow) policy applies once its own
/// buffer is full too. If the receiver is dropped, records come back as
/// error items downstream.
///
/// Read the receiver while the pipeline runs, not after: the stream ends
/// only once the sink has taken every record, so a full channel that
/// nobody reads holds the end back (by design, under the default
/// [`Overflow::Block`](crate::resilience::dlq::Overflow::Block)). The example reads
/// afterwards only because its channel holds every record.
///
/// The channel allocates its `capacity` up front, so it is at most
/// [`MAX_CHANNEL_CAPACITY`] (a million records). Zero, or more than that,
/// is refused when the dead-letter queue writing to the sink is piped
/// ([`ConfigError`], field `sink.capacity`); until then the channel holds
/// one record, or that maximum.
///
/// # Examples
///
/// ```
/// use streamz::{DeadLetterQueue, StreamError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (sink, letters) = streamz::dlq::channel::<i32>(16);
/// let out = streamz::iter([1, -2, 3])
///     .try_map(|x: &i32| if *x < 0 { Err("negative") } else { Ok(*x) })
///     .pipe(DeadLetterQueue::new(sink))
///     .collect()
///     .await;
/// assert_eq!(out.len(), 2); // the values
/// let letter = letters.recv().await.unwrap();
/// assert_eq!((letter.item, letter.message.as_str()), (Some(-2), "negative"));
///
/// let (sink, _letters) = streamz::dlq::channel::<i32>(0);
/// let err = streamz::iter([1]).try_pipe(DeadLetterQueue::new(sink)).unwrap_err();
/// assert_eq!((err.operator(), err.stage(), err.field()), (Some("DeadLetterQueue"), Some("dead_letter_queue"), "sink.capacity"));
/// # Ok(()) }
/// ```
pub fn channel<T: Send + 'static>(capacity: usize) -> (ChannelSink<T>, DeadLetterReceiver<T>) {
    // A channel cannot be empty, and allocates its slots up front: both
    // ends of the range are refused when the queue is piped.
    let (tx, rx) = async_channel::bounded(capacity.clamp(1, MAX_CHANNEL_CAPACITY));
    (ChannelSink { tx, capacity }, rx)
}

/// The largest capacity of a [`channel`] sink: 2^20 records.
pub const MAX_CHANNEL_CAPACITY: usize = 1 << 20;

impl<T: Send + 'static> DeadLetterSink<T> for ChannelSink<T> {
    fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.capacity, "sink.capacity")?;
        if self.capacity > MAX_CHANNEL_CAPACITY {
            return Err(ConfigError::new(
                "sink.capacity",
                "must be at most 1,048,576 (the channel allocates its capacity up front)",
            ));
        }
        Ok(())
    }

    async fn write(&mut self, records: Vec<DeadLetter<T>>) -> Result<(), Vec<Unwritten<T>>> {
        let mut records = records.into_iter();
        while let Some(record) = records.next() {
            if let Err(async_channel::SendError(record)) = self.tx.send(record).await {
                let gone = "the dead-letter receiver was dropped";
                return Err(std::iter::once(record)
                    .chain(records)
                    .map(|r| Unwritten::new(r, gone))
                    .collect());
            }
        }
        Ok(())
    }
}

/// A sink that calls an async closure per record; see [`sink_fn`].
pub struct FnSink<F> {
    f: F,
}

impl<F> fmt::Debug for FnSink<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnSink").finish_non_exhaustive()
    }
}

/// A sink that calls `f` for each record, one at a time, in order. The
/// closure owns the record; when it cannot take it, it hands it back in an
/// [`Unwritten`] and the record goes downstream as an error item. If the
/// closure panics, a `panicked` error item with the record's context (but
/// not its item, which the panic took) goes downstream instead.
///
/// # Examples
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use streamz::dlq::{sink_fn, Unwritten};
/// use streamz::{DeadLetter, DeadLetterQueue};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = seen.clone();
/// let sink = sink_fn(move |letter: DeadLetter<i32>| {
///     let log = log.clone();
///     async move {
///         if letter.item == Some(-4) {
///             return Err(Unwritten::new(letter, "the store refused it"));
///         }
///         log.lock().unwrap().push(letter.item);
///         Ok(())
///     }
/// });
/// let out = streamz::iter([1, -2, -4])
///     .try_map(|x: &i32| if *x < 0 { Err("negative") } else { Ok(*x) })
///     .pipe(DeadLetterQueue::new(sink))
///     .collect()
///     .await;
/// assert_eq!(*seen.lock().unwrap(), [Some(-2)]);
/// // The refused record comes downstream as an error that carries it.
/// let mut refused = out.into_iter().find_map(Result::err).unwrap();
/// assert_eq!(refused.take_item::<DeadLetter<i32>>().unwrap().item, Some(-4));
/// # }
/// ```
pub fn sink_fn<T, F, Fut>(f: F) -> FnSink<F>
where
    F: FnMut(DeadLetter<T>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), Unwritten<T>>> + Send,
{
    FnSink { f }
}

impl<T, F, Fut> DeadLetterSink<T> for FnSink<F>
where
    T: Send + 'static,
    F: FnMut(DeadLetter<T>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), Unwritten<T>>> + Send,
{
    async fn write(&mut self, records: Vec<DeadLetter<T>>) -> Result<(), Vec<Unwritten<T>>> {
        let mut failed = Vec::new();
        for record in records {
            // If the closure panics, the record goes with the panic; what
            // comes downstream is its context, without the item.
            let husk = record.without_item(
                "the dead-letter sink panicked while writing this record; its item was lost",
            );
            let call = AssertUnwindSafe(async { (self.f)(record).await }).catch_unwind();
            match call.await {
                Ok(Ok(())) => {}
                Ok(Err(unwritten)) => failed.push(unwritten),
                Err(payload) => {
                    failed.push(Unwritten::new(husk, PanicError::from_payload(payload)))
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed)
        }
    }
}
