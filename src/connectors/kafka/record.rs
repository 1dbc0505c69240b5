//! Records read from Kafka, and the acknowledgement that travels with
//! them through a chain.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// How far a record's outcome is: shared by the record, its [`Ack`]s and
/// the source's offset tracker (which keeps only this and the offset, not
/// the payload).
#[derive(Debug)]
pub(crate) struct Progress {
    /// Obligations not yet met: the record's own, plus one per fork.
    pending: AtomicUsize,
    /// The record's partition was taken away from this member.
    released: AtomicBool,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Progress {
            pending: AtomicUsize::new(1),
            released: AtomicBool::new(false),
        }
    }

    /// Every obligation is met.
    pub(crate) fn done(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
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
    /// The record's own obligation is met.
    pub(crate) own: AtomicBool,
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
/// A record is one obligation; carry it through stages that change the
/// item's type with [`acker`](KafkaRecord::acker) (an [`Ack`] for the same
/// obligation) or [`Acked`]. A record whose outcome is written to several
/// places (a fan-out to a topic and a database) needs one obligation per
/// place: [`fork`](KafkaRecord::fork) adds one, and the record counts as
/// acknowledged when all are met. That is also why it is not `Clone`: a
/// copy sharing the obligation would let the first write acknowledge the
/// others.
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
                fork: None,
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

    /// Meets the record's own obligation: its outcome is durable. Its
    /// offset may be committed once its forks are acknowledged too and
    /// every earlier record of its partition is done. Idempotent.
    pub fn ack(&self) {
        self.ack.ack();
    }

    /// Whether its own obligation is met.
    pub fn is_acked(&self) -> bool {
        self.ack.is_acked()
    }

    /// A handle on the record's own obligation (the one
    /// [`ack`](KafkaRecord::ack) meets), to carry in an item of another
    /// type. It also gives the original record back, for a dead letter
    /// that keeps the original key and value.
    pub fn acker(&self) -> Ack {
        self.ack.share()
    }

    /// A new obligation for one more place the record's outcome goes to;
    /// the record counts as acknowledged when every obligation is met.
    /// Fork before acknowledging the record.
    ///
    /// ```
    /// # use streamz::kafka::{Ack, KafkaRecord};
    /// // Two outputs per record: to a topic and to a database.
    /// fn split(record: &KafkaRecord) -> (Ack, Ack) {
    ///     (record.acker(), record.fork())
    /// }
    /// # let _ = split;
    /// ```
    pub fn fork(&self) -> Ack {
        self.ack.fork()
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

/// One obligation of a [`KafkaRecord`] (its own, or a
/// [`fork`](KafkaRecord::fork)), carried by an item derived from it. It
/// also gives the original record back ([`record`](Ack::record)), for a
/// dead letter that keeps the original key and value.
///
/// Dropping it meets nothing: the record is read again. It is not `Clone`
/// for the reason [`KafkaRecord`] is not; [`fork`](Ack::fork) adds an
/// obligation.
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
pub struct Ack {
    entry: Arc<Entry>,
    /// A fork's own flag; `None` for the record's own obligation.
    fork: Option<Arc<AtomicBool>>,
}

impl Ack {
    fn flag(&self) -> &AtomicBool {
        self.fork.as_deref().unwrap_or(&self.entry.own)
    }

    /// Meets this obligation. Idempotent.
    pub fn ack(&self) {
        if !self.flag().swap(true, Ordering::AcqRel) {
            self.entry.progress.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether this obligation is met.
    pub fn is_acked(&self) -> bool {
        self.flag().load(Ordering::Acquire)
    }

    /// A new obligation of the same record (see [`KafkaRecord::fork`]).
    /// Forking a met obligation gives a met one (the record may already
    /// be committed past).
    pub fn fork(&self) -> Ack {
        let met = self.is_acked();
        if !met {
            self.entry.progress.pending.fetch_add(1, Ordering::AcqRel);
        }
        Ack {
            entry: self.entry.clone(),
            fork: Some(Arc::new(AtomicBool::new(met))),
        }
    }

    /// Another handle on this same obligation (for the sink's future and
    /// its slot, which hold one item between them).
    pub(crate) fn share(&self) -> Ack {
        Ack {
            entry: self.entry.clone(),
            fork: self.fork.clone(),
        }
    }

    /// Whether the record's partition was taken away from this member.
    pub fn is_released(&self) -> bool {
        self.entry.progress.released.load(Ordering::Acquire)
    }

    /// The record this acknowledges (a handle on its own obligation).
    pub fn record(&self) -> KafkaRecord {
        KafkaRecord {
            ack: Ack {
                entry: self.entry.clone(),
                fork: None,
            },
        }
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ack")
            .field("topic", &self.entry.topic)
            .field("partition", &self.entry.partition)
            .field("offset", &self.entry.offset)
            .field("fork", &self.fork.is_some())
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
#[derive(Debug)]
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
