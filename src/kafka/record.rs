//! Records read from Kafka, and the acknowledgement that travels with
//! them through a chain.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the source read, shared by the record, every [`Ack`] taken from
/// it and the source's offset tracker.
pub(crate) struct Entry {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
    pub(crate) timestamp: Option<i64>,
    pub(crate) done: AtomicBool,
}

/// A record read by a [`KafkaSource`](super::KafkaSource): its topic,
/// partition and offset, key, value, headers and timestamp, and its
/// acknowledgement.
///
/// The source commits a partition's offset only past records that were
/// acknowledged ([`ack`](KafkaRecord::ack)), all of them, in offset order:
/// acknowledge a record once its outcome is durable. [`KafkaSink`] and
/// [`KafkaDlq`] do it when the broker confirms their write; a stage that
/// drops a record on purpose (a filter) acknowledges it itself. A record
/// dropped without an acknowledgement (an abort, a crash) holds its
/// partition's offset back, so it is read again: at least once.
///
/// Cloning is cheap (a reference count); clones share the acknowledgement.
/// Carry it through stages that change the item's type with
/// [`acker`](KafkaRecord::acker) (an [`Ack`]) or [`Acked`].
///
/// [`KafkaSink`]: super::KafkaSink
/// [`KafkaDlq`]: super::KafkaDlq
#[derive(Clone)]
pub struct KafkaRecord {
    ack: Ack,
}

impl KafkaRecord {
    pub(crate) fn new(entry: Entry) -> Self {
        KafkaRecord {
            ack: Ack {
                entry: Arc::new(entry),
            },
        }
    }

    pub(crate) fn entry(&self) -> &Arc<Entry> {
        &self.ack.entry
    }

    /// The topic it was read from.
    pub fn topic(&self) -> &str {
        &self.entry().topic
    }

    /// Its partition.
    pub fn partition(&self) -> i32 {
        self.entry().partition
    }

    /// Its offset in the partition.
    pub fn offset(&self) -> i64 {
        self.entry().offset
    }

    /// Its key, if it has one.
    pub fn key(&self) -> Option<&[u8]> {
        self.entry().key.as_deref()
    }

    /// Its value (payload), unless it is a tombstone.
    pub fn value(&self) -> Option<&[u8]> {
        self.entry().value.as_deref()
    }

    /// Its headers, in order (a header may have no value).
    pub fn headers(&self) -> &[(String, Option<Vec<u8>>)] {
        &self.entry().headers
    }

    /// Its timestamp in milliseconds since the epoch, if the broker gave one.
    pub fn timestamp(&self) -> Option<i64> {
        self.entry().timestamp
    }

    /// Acknowledges the record: its outcome is durable, its offset may be
    /// committed (once every earlier record of its partition is
    /// acknowledged too). Idempotent.
    pub fn ack(&self) {
        self.ack.ack();
    }

    /// Whether it has been acknowledged.
    pub fn is_acked(&self) -> bool {
        self.ack.is_acked()
    }

    /// A handle that acknowledges this record, to carry in an item of
    /// another type.
    pub fn acker(&self) -> Ack {
        self.ack.clone()
    }
}

impl fmt::Debug for KafkaRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaRecord")
            .field("topic", &self.topic())
            .field("partition", &self.partition())
            .field("offset", &self.offset())
            .field("key_len", &self.key().map(<[u8]>::len))
            .field("value_len", &self.value().map(<[u8]>::len))
            .field("acked", &self.is_acked())
            .finish()
    }
}

/// The acknowledgement of one [`KafkaRecord`], carried by an item derived
/// from it. It also gives the original record back (for a dead letter
/// that keeps the original key and value).
///
/// Dropping it acknowledges nothing.
///
/// ```
/// use streamz::kafka::{Ack, KafkaRecord};
///
/// struct Order { id: u64, ack: Ack }
///
/// fn parse(record: &KafkaRecord) -> Result<Order, std::num::ParseIntError> {
///     let text = std::str::from_utf8(record.value().unwrap_or_default()).unwrap_or("");
///     Ok(Order { id: text.parse()?, ack: record.acker() })
/// }
/// # let _ = parse;
/// ```
#[derive(Clone)]
pub struct Ack {
    entry: Arc<Entry>,
}

impl Ack {
    /// Acknowledges the record. Idempotent.
    pub fn ack(&self) {
        self.entry.done.store(true, Ordering::Release);
    }

    /// Whether the record has been acknowledged.
    pub fn is_acked(&self) -> bool {
        self.entry.done.load(Ordering::Acquire)
    }

    /// The record this acknowledges.
    pub fn record(&self) -> KafkaRecord {
        KafkaRecord { ack: self.clone() }
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ack")
            .field("topic", &self.entry.topic)
            .field("partition", &self.entry.partition)
            .field("offset", &self.entry.offset)
            .field("acked", &self.is_acked())
            .finish()
    }
}

/// A value with the acknowledgement of the record it came from: the
/// simplest way to carry an [`Ack`] through stages that change the value.
///
/// ```
/// use streamz::kafka::{Acked, KafkaRecord};
///
/// fn length(record: KafkaRecord) -> Acked<usize> {
///     Acked::of(&record, record.value().map_or(0, <[u8]>::len))
/// }
/// let _ = length;
/// ```
#[derive(Debug, Clone)]
pub struct Acked<T> {
    /// The value.
    pub value: T,
    /// The acknowledgement of its record.
    pub ack: Ack,
}

impl<T> Acked<T> {
    /// `value`, acknowledging `record` when acknowledged.
    pub fn of(record: &KafkaRecord, value: T) -> Self {
        Acked {
            value,
            ack: record.acker(),
        }
    }

    /// The same acknowledgement around a new value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Acked<U> {
        Acked {
            value: f(self.value),
            ack: self.ack,
        }
    }
}

/// An item that carries the acknowledgement of the Kafka record it came
/// from. [`KafkaSink`](super::KafkaSink) and
/// [`KafkaDlq`](super::KafkaDlq) use it to acknowledge a record once its
/// outcome is written, and the DLQ to find the original record.
pub trait Acknowledge {
    /// The acknowledgement, if the item has one.
    fn acknowledgement(&self) -> Option<&Ack>;
}

impl Acknowledge for Ack {
    fn acknowledgement(&self) -> Option<&Ack> {
        Some(self)
    }
}

impl<T> Acknowledge for Acked<T> {
    fn acknowledgement(&self) -> Option<&Ack> {
        Some(&self.ack)
    }
}

impl Acknowledge for KafkaRecord {
    fn acknowledgement(&self) -> Option<&Ack> {
        Some(&self.ack)
    }
}
