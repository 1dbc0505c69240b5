//! [`DeadLetterQueue`]: the builder, and the `Processor` impl that starts
//! the router and the writer.

use std::any::type_name;
use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use super::router::Router;
use super::{
    DeadLetter, DeadLetterSink, JsonItems, Overflow, Redact, TakeItem, not_recorded, writer,
};
use crate::base::config::{ConfigError, EdgeConfig, nonzero};
use crate::base::error::StreamError;
use crate::flow::Flow;
use crate::flow::driver;
use crate::flow::processor::Processor;

/// Sends error items to a dead-letter sink; values continue downstream.
///
/// Every error item that reaches the stage becomes a [`DeadLetter`](super::DeadLetter) record
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
/// [`Overflow::Block`], a buffer of 256 records, named `dead_letter_queue`, output edge
/// from the pipeline's [`EdgeConfig`].
///
/// # Validation
///
/// Checked when the stage is piped: a zero `buffer`, an explicit edge
/// with a zero (`edge.capacity`, `edge.max_chunk`), or a sink whose own
/// settings are invalid ([`DeadLetterSink::validate`]: `sink.capacity`,
/// `sink.fsync.every_n`, ...) is refused with a [`ConfigError`] naming
/// `DeadLetterQueue`, the stage and the field.
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
/// let (sink, letters) = streamz::dlq::channel::<String>(64);
/// // Read the dead letters while the pipeline runs.
/// let reader = tokio::spawn(async move {
///     let mut all = Vec::new();
///     while let Ok(letter) = letters.recv().await {
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
/// let m = pipeline.stage_metrics("dead_letter_queue").unwrap();
/// assert_eq!((m.received, m.emitted, m.dead_lettered), (3, 2, 1));
/// # Ok(()) }
/// ```
pub struct DeadLetterQueue<T, R, S> {
    name: Cow<'static, str>,
    sink: S,
    items: TakeItem<R>,
    redact: Option<Redact<R>>,
    overflow: Overflow,
    buffer: usize,
    edge: Option<EdgeConfig>,
    _values: PhantomData<fn(T) -> T>,
}

impl<T, R, S> fmt::Debug for DeadLetterQueue<T, R, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterQueue")
            .field("name", &self.name)
            .field("overflow", &self.overflow)
            .field("buffer", &self.buffer)
            .field("edge", &self.edge)
            .field("redacts", &self.redact.is_some())
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
    /// let (sink, letters) = streamz::dlq::channel::<String>(16);
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
                    .map(|item| (item, None))
                    .ok_or_else(|| not_recorded(e, &format!("`{}`", type_name::<R>())))
            }),
        )
    }

    /// Names the recorded items' type with `tag` (say `"payment.v2"`) in
    /// each record's [`item_type`](crate::dlq::DeadLetter::item_type),
    /// instead of the Rust type name, which is not stable across compiler
    /// versions. For a queue of several item types, tag each in
    /// [`JsonItems::with_tag`](crate::dlq::JsonItems::with_tag) instead: this
    /// tag would name them all.
    ///
    /// ```
    /// use streamz::DeadLetterQueue;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (sink, letters) = streamz::dlq::channel::<String>(16);
    /// streamz::iter(["x"].map(String::from))
    ///     .try_map(|s: &String| s.parse::<u32>())
    ///     .pipe(DeadLetterQueue::new(sink).with_item_tag("line"))
    ///     .collect()
    ///     .await;
    /// assert_eq!(letters.recv().await?.item_type.as_deref(), Some("line"));
    /// # Ok(()) }
    /// ```
    pub fn with_item_tag(mut self, tag: impl Into<std::sync::Arc<str>>) -> Self {
        let tag = tag.into();
        let take = self.items;
        self.items =
            Box::new(move |e: &mut StreamError| take(e).map(|(item, _)| (item, Some(tag.clone()))));
        self
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
    /// let (sink, letters) = streamz::dlq::channel(16);
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
            name: Cow::Borrowed("dead_letter_queue"),
            sink,
            items,
            redact: None,
            overflow: Overflow::Block,
            buffer: 256,
            edge: None,
            _values: PhantomData,
        }
    }

    /// Applies `redact` to every record before it is written: to hash or
    /// blank an item's personal or secret fields, or to rewrite the
    /// error's text (`message`, `causes`), which comes from the failing
    /// code and may quote the item. Runs in the stage's task, once per
    /// failure, before the record is buffered, so no sink (a file, a
    /// channel, a closure) ever sees what it removed. A `KafkaDlq`
    /// (feature `kafka`) is the exception for its payload: it writes the
    /// *original* Kafka record's value, not the item, so this reaches its
    /// headers but not its value; redact that with
    /// `KafkaDlq::with_redaction`.
    /// The record's `sequence` cannot be changed (the writer pairs records
    /// with their acknowledgements by it).
    ///
    /// To keep a redacted record replayable ([`Replay`](crate::dlq::Replay)),
    /// keep the item's shape: hash or blank a field rather than remove it.
    /// Called again, the redactions add up: each applies, in the order
    /// given. A redaction that panics fails closed: the record is written
    /// without its item and without the error's text, with a note saying
    /// so, and an error is logged.
    ///
    /// ```
    /// use streamz::{DeadLetterQueue, StreamError};
    ///
    /// #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    /// struct Payment { id: u32, card: String }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (sink, letters) = streamz::dlq::channel::<Payment>(16);
    /// let dlq = DeadLetterQueue::new(sink).with_redaction(|letter| {
    ///     if let Some(payment) = &mut letter.item {
    ///         // Keep the last four digits only.
    ///         let last4 = payment.card.chars().rev().take(4).collect::<String>();
    ///         payment.card = format!("****{}", last4.chars().rev().collect::<String>());
    ///     }
    /// });
    /// let failed = StreamError::failed("charge", "declined")
    ///     .with_item(Payment { id: 7, card: "4111111111111111".into() });
    /// streamz::try_stream::<_, Payment>(futures::stream::iter([Err(failed)]))
    ///     .pipe(dlq)
    ///     .collect()
    ///     .await;
    /// let letter = letters.recv().await?;
    /// assert_eq!(letter.item.unwrap().card, "****1111");
    /// # Ok(()) }
    /// ```
    pub fn with_redaction<F>(mut self, redact: F) -> Self
    where
        F: Fn(&mut DeadLetter<R>) + Send + Sync + 'static,
        R: 'static,
    {
        self.redact = Some(match self.redact.take() {
            None => std::sync::Arc::new(redact),
            // Each redaction applies, in the order given.
            Some(first) => std::sync::Arc::new(move |letter: &mut DeadLetter<R>| {
                first(letter);
                redact(letter);
            }),
        });
        self
    }

    /// Sets what happens when the sink is slow and the buffer is full
    /// ([`Overflow::Block`] by default).
    ///
    /// ```
    /// use streamz::dlq::Overflow;
    /// use streamz::DeadLetterQueue;
    ///
    /// let (sink, _letters) = streamz::dlq::channel::<u32>(16);
    /// let dlq = DeadLetterQueue::<u32, _, _>::new(sink).with_overflow(Overflow::Fail);
    /// # drop(dlq);
    /// ```
    pub fn with_overflow(mut self, overflow: Overflow) -> Self {
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
    /// Zero, and more than `usize::MAX / 8` (the count of a tokio
    /// semaphore, which holds the buffer's room; nothing is allocated up
    /// front), are refused when the stage is piped ([`ConfigError`], field
    /// `buffer`).
    ///
    /// ```
    /// use streamz::dlq::Overflow;
    /// use streamz::DeadLetterQueue;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (sink, _letters) = streamz::dlq::channel::<u32>(16);
    /// // At most 1,000 records wait for the sink; then drop and count.
    /// let dlq = DeadLetterQueue::<u32, _, _>::new(sink)
    ///     .with_buffer(1_000)
    ///     .with_overflow(Overflow::DropAndCount);
    /// # drop(dlq);
    ///
    /// let (sink, _letters) = streamz::dlq::channel::<u32>(16);
    /// let dlq = DeadLetterQueue::new(sink).with_buffer(0).named("failed-orders");
    /// let err = streamz::iter([1u32]).try_pipe(dlq).unwrap_err();
    /// assert_eq!(err.to_string(), "DeadLetterQueue `failed-orders`: `buffer` must be greater than zero");
    /// # }
    /// ```
    pub fn with_buffer(mut self, records: usize) -> Self {
        self.buffer = records;
        self
    }

    crate::flow::processor::name_and_edge!("Sets the stage's output edge.");
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

    fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.buffer, "buffer")
            .and_then(|()| {
                // The buffer's room is a tokio semaphore's permits.
                if self.buffer > tokio::sync::Semaphore::MAX_PERMITS {
                    Err(ConfigError::new("buffer", "must be at most usize::MAX / 8"))
                } else {
                    Ok(())
                }
            })
            .and_then(|()| self.edge.map_or(Ok(()), |e| e.validate()))
            .and_then(|()| self.sink.validate())
            .map_err(|e| e.in_stage("DeadLetterQueue", &self.name))
    }

    fn process(self, input: Flow<T>) -> Flow<T> {
        let DeadLetterQueue {
            name,
            sink,
            items,
            redact,
            overflow,
            buffer,
            edge,
            _values,
        } = self;
        driver::spawn_with(input, &name, edge, |pipeline, counters| {
            let link = writer::spawn(pipeline, counters, sink, buffer);
            let name = pipeline.name().map(str::to_owned);
            Router::new(
                link,
                items,
                redact,
                overflow,
                buffer,
                counters.clone(),
                name,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::dlq::channel;

    fn refused(
        dlq: DeadLetterQueue<u32, u32, crate::resilience::dlq::ChannelSink<u32>>,
    ) -> (Option<&'static str>, Option<String>, &'static str) {
        let err = crate::iter([1u32]).try_pipe(dlq).map(drop).unwrap_err();
        (err.operator(), err.stage().map(str::to_owned), err.field())
    }

    #[test]
    fn zero_settings_and_a_bad_sink_are_refused_when_piped() {
        let dlq = |capacity| DeadLetterQueue::new(channel::<u32>(capacity).0).named("failed");
        assert_eq!(Processor::<u32, u32>::validate(&dlq(1)), Ok(()));
        let at = |field| (Some("DeadLetterQueue"), Some("failed".to_owned()), field);
        assert_eq!(refused(dlq(1).with_buffer(0)), at("buffer"));
        assert_eq!(
            refused(dlq(1).with_edge(EdgeConfig::new(0, 0))),
            at("edge.capacity")
        );
        assert_eq!(refused(dlq(0)), at("sink.capacity"));
    }

    #[test]
    fn a_zero_capacity_channel_still_holds_a_record() {
        // The receiver exists before the queue is piped and refused.
        let (sink, letters) = channel::<u32>(0);
        assert_eq!(letters.capacity(), Some(1));
        assert_eq!(
            sink.validate().unwrap_err(),
            ConfigError::zero("sink.capacity")
        );
    }
}
