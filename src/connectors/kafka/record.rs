//! Records read from Kafka, and the acknowledgement that travels with
//! them through a chain.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// How far a record's outcome is: shared by the record, its [`Ack`]s and
/// the source's offset tracker (which keeps only this and the offset, not
/// the payload). The obligation itself is the core acknowledgement that
/// travels beside the record ([`crate::Ack`]); this adds whether the
/// record's partition was taken away.
#[derive(Debug)]
pub(crate) struct Progress {
    /// The record's obligations (its core `Ack` and the forks of it).
    pub(crate) core: Arc<crate::base::ack::Progress>,
    /// The record's partition was taken away from this member.
    released: AtomicBool,
}

impl Progress {
    /// The progress of one record, read at `origin` (carried by its core
    /// ack to dead-letter records).
    pub(crate) fn new(origin: Option<crate::base::ack::SourcePosition>) -> Self {
        Progress {
            core: crate::base::ack::Progress::at(1, origin),
            released: AtomicBool::new(false),
        }
    }

    /// Every obligation is met.
    pub(crate) fn done(&self) -> bool {
        self.core.done()
    }

    pub(crate) fn release(&self) {
        self.released.store(true, Ordering::Release);
    }
}

/// What the source read.
pub(crate) struct Entry {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Option<Vec<u8>>)>,
    pub(crate) timestamp: Option<i64>,
    pub(crate) progress: Arc<Progress>,
}

/// A record read by a [`KafkaSource`](super::KafkaSource): its topic,
/// partition and offset, key, value, headers and timestamp.
///
/// The source commits a partition's offset only past records whose outcome
/// is decided, all of them, in offset order. That is tracked by the
/// record's acknowledgement ([`crate::Ack`]), which travels beside it
/// through every stage and is met where its outcome is decided: when
/// [`KafkaSink`] (its delivery, read downstream) or [`KafkaDlq`] has it
/// written, when a stage drops it on purpose (a filter, a `Sample`, a
/// `Dedupe` duplicate), when the flow's reader is handed it. Nothing to do
/// in the chain: a `map` to another type keeps it. A record dropped
/// without a decision (an abort, a crash, what a `Take` did not take)
/// holds its partition's offset back, so it is read again: at least once.
///
/// [`acker`](KafkaRecord::acker) gives a handle on the original record
/// ([`Ack::record`]) to carry in an item of another type, for a
/// [`KafkaDlq`] that writes the original key and value. It is not `Clone`:
/// one record is one outcome.
///
/// [`KafkaSink`]: super::KafkaSink
/// [`KafkaDlq`]: super::KafkaDlq
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

    #[cfg(test)]
    pub(crate) fn progress(&self) -> &Arc<Progress> {
        &self.ack.entry.progress
    }

    fn entry(&self) -> &Entry {
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

    /// Does nothing: a record is acknowledged where its outcome is decided,
    /// by the core acknowledgement that travels beside it ([`crate::Ack`]).
    /// Reading a flow hands its records over, which decides them: a reader
    /// that writes records somewhere itself and used to call `ack` after
    /// its write must read with
    /// [`Flow::for_each_acked`](crate::Flow::for_each_acked) instead.
    #[deprecated(
        note = "acknowledgement is automatic (see `streamz::Ack`); a reader that writes records itself must use `Flow::for_each_acked`"
    )]
    pub fn ack(&self) {}

    /// Whether the record's outcome is decided (every obligation met).
    pub fn is_acked(&self) -> bool {
        self.ack.is_acked()
    }

    /// A handle on the record, to carry in an item of another type: it
    /// gives the original record back ([`Ack::record`]), for a dead letter
    /// that keeps the original key and value.
    pub fn acker(&self) -> Ack {
        self.ack.share()
    }

    /// The same as [`acker`](KafkaRecord::acker): a record written to
    /// several places is acknowledged once every copy's outcome is decided,
    /// by the core acknowledgement's forks (a broadcast makes them).
    #[deprecated(note = "acknowledgement is automatic: see `streamz::Ack`")]
    pub fn fork(&self) -> Ack {
        self.ack.share()
    }

    /// Whether the record's partition was taken away from this member: its
    /// next owner reads the record again, so writing it here only makes a
    /// duplicate.
    pub fn is_released(&self) -> bool {
        self.ack.is_released()
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

/// A handle on a [`KafkaRecord`], carried by an item derived from it: it
/// gives the original record back ([`record`](Ack::record)), for a
/// [`KafkaDlq`](super::KafkaDlq) that keeps the original key and value, and
/// tells whether the record's partition was taken away.
///
/// The record's acknowledgement itself is the core [`crate::Ack`], which
/// travels beside the item and is met where its outcome is decided;
/// [`ack`](Ack::ack) is kept only for code written before, and does
/// nothing.
///
/// ```
/// use streamz::kafka::{Ack, KafkaRecord};
///
/// struct Order { id: u64, source: Ack }
///
/// fn parse(record: &KafkaRecord) -> Result<Order, std::num::ParseIntError> {
///     let text = std::str::from_utf8(record.value().unwrap_or_default()).unwrap_or("");
///     Ok(Order { id: text.parse()?, source: record.acker() })
/// }
/// # let _ = parse;
/// ```
pub struct Ack {
    entry: Arc<Entry>,
}

impl Ack {
    /// Does nothing (see the type's documentation and
    /// [`KafkaRecord::ack`]).
    #[deprecated(
        note = "acknowledgement is automatic (see `streamz::Ack`); a reader that writes records itself must use `Flow::for_each_acked`"
    )]
    pub fn ack(&self) {}

    /// Whether the record's outcome is decided (every obligation met).
    pub fn is_acked(&self) -> bool {
        self.entry.progress.done()
    }

    /// Another handle on the same record.
    #[deprecated(note = "acknowledgement is automatic: see `streamz::Ack`")]
    pub fn fork(&self) -> Ack {
        self.share()
    }

    /// Another handle on the same record.
    pub(crate) fn share(&self) -> Ack {
        Ack {
            entry: self.entry.clone(),
        }
    }

    /// Whether the record's partition was taken away from this member.
    pub fn is_released(&self) -> bool {
        self.entry.progress.released.load(Ordering::Acquire)
    }

    /// The record this is a handle on.
    pub fn record(&self) -> KafkaRecord {
        KafkaRecord { ack: self.share() }
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

/// A value with a handle on the record it came from ([`Ack`]), for a
/// [`KafkaDlq`](super::KafkaDlq) that writes the original record when the
/// value fails.
///
/// ```
/// use streamz::kafka::{Acked, KafkaRecord};
///
/// fn length(record: KafkaRecord) -> Acked<usize> {
///     Acked::of(&record, record.value().map_or(0, <[u8]>::len))
/// }
/// let _ = length;
/// ```
#[derive(Debug)]
pub struct Acked<T> {
    /// The value.
    pub value: T,
    /// A handle on its record.
    pub ack: Ack,
}

impl<T> Acked<T> {
    /// `value`, with a handle on `record`.
    pub fn of(record: &KafkaRecord, value: T) -> Self {
        Acked {
            value,
            ack: record.acker(),
        }
    }

    /// The same record around a new value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Acked<U> {
        Acked {
            value: f(self.value),
            ack: self.ack,
        }
    }
}

/// An item that carries a handle on the Kafka record it came from:
/// [`KafkaDlq`](super::KafkaDlq) uses it to write the original record's
/// key and value.
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
