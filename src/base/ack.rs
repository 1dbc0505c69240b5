//! Acknowledgements: how a source learns that an item's outcome is
//! durable, so it may move its commit point past it.
//!
//! A source that can replay (Kafka, the durable file source) attaches an
//! [`Ack`] to each item. The ack travels beside the item through every
//! stage (in [`Chunk`](crate::Chunk), parallel to the values; inside a
//! [`StreamError`](crate::StreamError) for an error item) and is met where
//! the item's outcome is decided:
//!
//! - a sink that made it durable acknowledges it (the dead-letter queue
//!   after its sink wrote the record, a reader of the flow when the item is
//!   handed over to it);
//! - an operator that drops the item on purpose, and counts the drop,
//!   acknowledges it (a filter's reject, a Sample, a Dedupe duplicate);
//! - an abort, a panic or a crash acknowledges nothing: an ack that is
//!   dropped without [`Ack::ack`] leaves its item unacknowledged, so the
//!   source reads it again after a restart. Nothing is lost, at the price
//!   of duplicates.
//!
//! One item may become several (an `Unbatch`, a fan-out copy): each part
//! gets a [`fork`](Ack::fork), and the item counts as acknowledged when
//! every part is. Several items may become one (a batch, a window): the
//! one carries all their acks ([`Ack::merge`]).
//!
//! A source tracks its items with [`Watermarks`]: per lane (a Kafka
//! partition, a file) the positions read, in order, and how far the
//! contiguous acknowledged prefix reaches.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How far a group of items' outcomes are: the obligations not yet met.
/// Shared by their [`Ack`]s and the source's [`Watermarks`], which keeps
/// only this and a position, not the items.
///
/// A batch's acknowledgement is a node of its own: its `pending` counts the
/// acks that refer to it (one, and one more per fork or split part), and
/// when the last is met it meets one obligation of each of its `members`
/// (item progresses, or other batches' nodes).
#[derive(Debug)]
pub(crate) struct Progress {
    pending: AtomicUsize,
    /// For a batch's node: the obligations it stands for; empty for an
    /// item's progress.
    members: Vec<Arc<Progress>>,
    /// For one item's node within a group (a line of a chunk): the group's
    /// progress, one of whose obligations this node stands for.
    parent: Option<Arc<Progress>>,
    /// Where the item was read, if its source says (one item's progress).
    origin: Option<SourcePosition>,
}

impl Progress {
    /// A group of `n` obligations; hand out exactly `n` acks with
    /// [`Ack::of`].
    pub(crate) fn new(n: usize) -> Arc<Progress> {
        Self::at(n, None)
    }

    /// [`new`](Self::new), for one item read at `origin`.
    pub(crate) fn at(n: usize, origin: Option<SourcePosition>) -> Arc<Progress> {
        Arc::new(Progress {
            pending: AtomicUsize::new(n),
            members: Vec::new(),
            parent: None,
            origin,
        })
    }

    /// Every obligation is met.
    pub(crate) fn done(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    fn meet(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last reference to a batch's node: its members are met.
            self.members.iter().for_each(|m| m.meet());
            if let Some(parent) = &self.parent {
                parent.meet();
            }
        }
    }

    fn add(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }
}

/// The acknowledgement of one item (or of several, for a batch): met once
/// with [`ack`](Ack::ack), or never.
///
/// Dropping an `Ack` without calling `ack` meets nothing: that is what
/// makes an abort, a panic or a crash acknowledge nothing. Items of a
/// source without acknowledgements carry [`Ack::none`], which costs
/// nothing and does nothing.
///
/// Most code never sees an `Ack`: the operators carry them, and meet them
/// where an item's outcome is decided:
///
/// - handed to the flow's reader (`next`, `collect`, `for_each`,
///   [`next_chunk`](crate::Flow::next_chunk)), an error item included: the
///   reader owns it from then on;
/// - [`Flow::forward`](crate::Flow::forward): once the sink flushed it;
///   [`Flow::for_each_acked`](crate::Flow::for_each_acked): once the
///   reader's future returned `Ok`;
/// - written by a [`DeadLetterQueue`](crate::DeadLetterQueue)'s sink;
/// - dropped on purpose and counted: a filter's reject, a `Sample`, a
///   `Dedupe` duplicate, `Skip`, `Debounce`, `Throttle::dropping`, an
///   unrouted `Switch` value, the DLQ's `Overflow::DropAndCount`.
///
/// Never met: what an abort or a crash leaves in the pipeline, what a
/// `Take` did not take, what a reader dropped with its flow, an item a
/// [`Step`](crate::Step) `take`s without emitting anything (see
/// [`Item::take_acked`](crate::Item::take_acked)). A hand-written sink
/// reading chunks takes them with
/// [`Flow::next_acked_chunk`](crate::Flow::next_acked_chunk) and
/// [`Chunk::take_acks`](crate::Chunk::take_acks) and meets them once its
/// write is durable. docs/recovery.md has the whole picture.
///
/// # Examples
///
/// ```
/// use streamz::Ack;
///
/// let none = Ack::none();
/// assert!(none.is_none());
/// none.ack(); // does nothing
/// ```
#[must_use = "an Ack that is dropped without ack() leaves its item unacknowledged"]
pub struct Ack(Option<Arc<Progress>>);

impl Ack {
    /// The acknowledgement of an item that needs none.
    #[inline]
    pub const fn none() -> Ack {
        Ack(None)
    }

    /// A new acknowledgement and the [`Receipt`] that tells when it (and
    /// every fork of it) was met: for a source of the application's own
    /// (see [`Pipeline::acked_stream`](crate::Pipeline::acked_stream)).
    ///
    /// ```
    /// let (ack, receipt) = streamz::Ack::new();
    /// let fork = ack.fork();
    /// ack.ack();
    /// assert!(!receipt.is_acked());
    /// fork.ack();
    /// assert!(receipt.is_acked());
    /// ```
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> (Ack, Receipt) {
        let progress = Progress::new(1);
        (Ack::of(&progress), Receipt(progress))
    }

    /// One of the obligations `progress` was created with.
    #[inline]
    pub(crate) fn of(progress: &Arc<Progress>) -> Ack {
        Ack(Some(progress.clone()))
    }

    /// One of the obligations of `group` (a chunk's), for an item read at
    /// `origin`: a node of its own that carries the position and meets
    /// its obligation of the group when met.
    pub(crate) fn of_at(group: &Arc<Progress>, origin: SourcePosition) -> Ack {
        Ack(Some(Arc::new(Progress {
            pending: AtomicUsize::new(1),
            members: Vec::new(),
            parent: Some(group.clone()),
            origin: Some(origin),
        })))
    }

    /// A new acknowledgement, as [`new`](Ack::new), for an item read at
    /// `position`: the position travels with the ack (and its forks), so a
    /// dead-letter record of the item, or of what it became, says where
    /// it came from ([`StreamError::source_position`](crate::StreamError::source_position)).
    ///
    /// ```
    /// use streamz::{Ack, SourcePosition};
    ///
    /// let (ack, _receipt) = Ack::at(SourcePosition::Sequence { sequence: 41 });
    /// assert_eq!(ack.position(), Some(&SourcePosition::Sequence { sequence: 41 }));
    /// assert_eq!(ack.fork().position(), ack.position());
    /// # ack.ack();
    /// ```
    pub fn at(position: SourcePosition) -> (Ack, Receipt) {
        let progress = Progress::at(1, Some(position));
        (Ack::of(&progress), Receipt(progress))
    }

    /// Where the item was read, if its source said: a Kafka record's
    /// topic, partition and offset, a file line, an application source's
    /// sequence ([`Ack::at`]). `None` for a batch's acknowledgement when
    /// the batch holds more than one item (a batch of one keeps its
    /// item's), and for sources that give no position.
    pub fn position(&self) -> Option<&SourcePosition> {
        self.0.as_ref().and_then(|p| p.origin.as_ref())
    }

    /// Whether this acknowledges nothing (an item of a source without
    /// acknowledgements).
    #[inline]
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }

    /// Meets the obligation: the item's outcome is durable, or it was
    /// dropped on purpose.
    #[inline]
    pub fn ack(self) {
        if let Some(p) = self.0 {
            p.meet();
        }
    }

    /// A new obligation for the same item(s): they count as acknowledged
    /// once this and every other fork are met.
    pub fn fork(&self) -> Ack {
        match &self.0 {
            None => Ack::none(),
            Some(p) => {
                p.add();
                Ack(Some(p.clone()))
            }
        }
    }

    /// One acknowledgement standing for all of `acks` (a batch's). It
    /// keeps a [`position`](Ack::position) only if every ack is (a fork of)
    /// the same item's.
    pub fn merge(acks: impl IntoIterator<Item = Ack>) -> Ack {
        Self::merged(acks.into_iter().filter_map(|a| a.0).collect(), None)
    }

    /// [`merge`](Ack::merge) for a batch or window of `items` items, some
    /// of which may have no acknowledgement: a batch holding more items
    /// than acks is not one item's, whatever its one ack says, so it has
    /// no position.
    pub(crate) fn merge_batch(acks: impl IntoIterator<Item = Ack>, items: usize) -> Ack {
        Self::merged(acks.into_iter().filter_map(|a| a.0).collect(), Some(items))
    }

    fn merged(members: Vec<Arc<Progress>>, items: Option<usize>) -> Ack {
        let one_item = members.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1]))
            && items.is_none_or(|n| n <= members.len());
        match members.len() {
            0 => Ack::none(),
            1 if one_item => Ack(members.into_iter().next()),
            _ => {
                let origin = if one_item {
                    members[0].origin.clone()
                } else {
                    None
                };
                Ack(Some(Arc::new(Progress {
                    pending: AtomicUsize::new(1),
                    members,
                    parent: None,
                    origin,
                })))
            }
        }
    }

    /// Splits the acknowledgement of a batch into one per value of the
    /// `n` values it was unbatched into: each a part of the whole, whose
    /// members are met once every part is (the values may have been
    /// reordered, filtered or replaced since the batch was made, so which
    /// value stands for which member is not known). A batch emptied on
    /// purpose (`n` zero) is a drop: met at once.
    pub(crate) fn split(self, n: usize) -> Vec<Ack> {
        if n == 0 {
            self.ack();
            return Vec::new();
        }
        let mut parts: Vec<Ack> = (1..n).map(|_| self.fork()).collect();
        parts.push(self);
        parts
    }
}

/// Where an item was read, as its source tells it: carried by the item's
/// [`Ack`] through every stage, and written into its dead-letter record
/// ([`DeadLetter::source`](crate::DeadLetter::source)), as Kafka Connect's
/// DLQ headers name the original record.
///
/// In JSON: `{"kind":"kafka","topic":"orders","partition":3,"offset":1207}`,
/// `{"kind":"line","file":"orders-01.jsonl","line":88,"offset":4410}`,
/// `{"kind":"sequence","sequence":41}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum SourcePosition {
    /// A record of a Kafka topic.
    Kafka {
        /// The topic.
        topic: Arc<str>,
        /// The partition.
        partition: i32,
        /// The record's offset in the partition.
        offset: i64,
    },
    /// A line of a file read by the durable line source
    /// ([`LineSource`](crate::file::LineSource)).
    Line {
        /// The file's name (within the source's directory).
        file: Arc<str>,
        /// The line's number, from 1, over every file since the source
        /// first started ([`Line::number`](crate::file::Line::number)).
        line: u64,
        /// The byte offset of the line's start in its file.
        offset: u64,
    },
    /// The item's number in an application's own source ([`Ack::at`]).
    Sequence {
        /// The number the source gave it.
        sequence: u64,
    },
    /// A kind this version does not know (written by a later one): read
    /// so that the rest of the record still is.
    #[serde(other)]
    Unknown,
}

/// Tells whether an [`Ack`] made with [`Ack::new`], and every fork of it,
/// was met.
#[derive(Debug, Clone)]
pub struct Receipt(Arc<Progress>);

impl Receipt {
    /// Whether the item's outcome is decided: every obligation met.
    pub fn is_acked(&self) -> bool {
        self.0.done()
    }
}

impl Default for Ack {
    fn default() -> Self {
        Ack::none()
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("Ack(none)"),
            Some(p) if p.members.is_empty() => f.write_str("Ack(1)"),
            Some(p) => write!(f, "Ack({})", p.members.len()),
        }
    }
}

/// Per lane (a partition, a file), the positions a source handed out and
/// how far the contiguous acknowledged prefix reaches.
///
/// Each entry is a group of items read together (one per chunk, or one per
/// record) with the position to resume from once the group and every group
/// before it in its lane are acknowledged.
#[derive(Debug)]
pub(crate) struct Watermarks<L, P> {
    lanes: HashMap<L, Lane<P>>,
    /// Items in groups not yet behind their watermark.
    outstanding: usize,
}

#[derive(Debug)]
struct Lane<P> {
    /// Groups not yet behind the watermark, oldest first: the position
    /// after the group, its size and its progress.
    pending: VecDeque<(P, usize, Arc<Progress>)>,
    /// The position after the contiguous acknowledged prefix.
    next: Option<P>,
}

impl<P> Default for Lane<P> {
    fn default() -> Self {
        Lane {
            pending: VecDeque::new(),
            next: None,
        }
    }
}

impl<L: Eq + Hash + Clone, P: Copy + PartialEq> Default for Watermarks<L, P> {
    fn default() -> Self {
        Watermarks {
            lanes: HashMap::new(),
            outstanding: 0,
        }
    }
}

impl<L: Eq + Hash + Clone, P: Copy + PartialEq> Watermarks<L, P> {
    /// A group of `n` items of `lane` was read; once all are acknowledged
    /// (and every group before them), the lane may resume from `next`.
    /// Returns the progress to make their acks from.
    pub(crate) fn track(&mut self, lane: &L, next: P, n: usize) -> Arc<Progress> {
        let progress = Progress::new(n);
        let entry = match self.lanes.get_mut(lane) {
            Some(l) => l,
            None => self.lanes.entry(lane.clone()).or_default(),
        };
        entry.pending.push_back((next, n, progress.clone()));
        self.outstanding += n;
        progress
    }

    /// Items read and not yet behind their lane's watermark.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Moves every watermark past its acknowledged prefix; returns how
    /// many items they passed.
    pub(crate) fn advance(&mut self) -> usize {
        let mut passed = 0;
        for lane in self.lanes.values_mut() {
            while let Some((next, n, progress)) = lane.pending.front() {
                if !progress.done() {
                    break;
                }
                lane.next = Some(*next);
                passed += n;
                lane.pending.pop_front();
            }
        }
        self.outstanding -= passed;
        passed
    }

    /// The lane's watermark as last moved by [`advance`](Self::advance),
    /// if any group of it was acknowledged.
    pub(crate) fn watermark(&self, lane: &L) -> Option<P> {
        self.lanes.get(lane).and_then(|l| l.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(p: &Arc<Progress>, n: usize) -> Vec<Ack> {
        (0..n).map(|_| Ack::of(p)).collect()
    }

    #[test]
    fn a_dropped_ack_meets_nothing() {
        let p = Progress::new(2);
        let mut a = acks(&p, 2);
        a.pop().unwrap().ack();
        drop(a);
        assert!(!p.done());
    }

    #[test]
    fn forks_must_all_be_met() {
        let p = Progress::new(1);
        let a = Ack::of(&p);
        let b = a.fork();
        a.ack();
        assert!(!p.done());
        b.ack();
        assert!(p.done());
    }

    #[test]
    fn a_split_batch_is_met_when_every_part_is() {
        // Three items, batched, unbatched: meeting two parts meets nothing
        // (they may be any two of the three values).
        let items: Vec<_> = (0..3).map(|_| Progress::new(1)).collect();
        let batch = Ack::merge(items.iter().map(Ack::of));
        let mut parts = batch.split(3);
        assert_eq!(parts.len(), 3);
        parts.pop().unwrap().ack();
        parts.pop().unwrap().ack();
        assert!(items.iter().all(|p| !p.done()));
        parts.pop().unwrap().ack();
        assert!(items.iter().all(|p| p.done()));
    }

    #[test]
    fn batches_of_batches_and_their_forks_meet_each_member_once() {
        let items: Vec<_> = (0..4).map(|_| Progress::new(1)).collect();
        let a = Ack::merge(items[..2].iter().map(Ack::of));
        let b = Ack::merge(items[2..].iter().map(Ack::of));
        let both = Ack::merge([a, b]);
        let copy = both.fork();
        both.ack();
        assert!(items.iter().all(|p| !p.done()));
        copy.ack();
        assert!(items.iter().all(|p| p.done()));
        // A single-item batch is the item's own ack.
        let one = Progress::new(1);
        Ack::merge([Ack::of(&one)]).ack();
        assert!(one.done());
    }

    #[test]
    fn a_batch_of_another_size_splits_into_forks_of_the_whole() {
        let p = Progress::new(2);
        let batch = Ack::merge(acks(&p, 2));
        let mut parts = batch.split(3);
        for _ in 0..2 {
            parts.pop().unwrap().ack();
            assert!(!p.done());
        }
        parts.pop().unwrap().ack();
        assert!(p.done());
        // An emptied batch is a drop: acknowledged.
        let q = Progress::new(2);
        assert!(Ack::merge(acks(&q, 2)).split(0).is_empty());
        assert!(q.done());
    }

    #[test]
    fn the_watermark_stops_at_the_first_unacknowledged_group() {
        let mut w: Watermarks<&str, u64> = Watermarks::default();
        let g1 = w.track(&"a", 10, 1);
        let g2 = w.track(&"a", 20, 1);
        let g3 = w.track(&"a", 30, 1);
        Ack::of(&g2).ack();
        assert_eq!(w.advance(), 0);
        assert_eq!(w.watermark(&"a"), None);
        Ack::of(&g1).ack();
        assert_eq!(w.advance(), 2);
        assert_eq!(w.watermark(&"a"), Some(20));
        assert_eq!(w.outstanding(), 1);
        Ack::of(&g3).ack();
        assert_eq!(w.advance(), 1);
        assert_eq!(w.watermark(&"a"), Some(30));
        assert_eq!(w.outstanding(), 0);
    }

    fn at(n: u64) -> (Ack, Receipt) {
        Ack::at(SourcePosition::Sequence { sequence: n })
    }

    #[test]
    fn a_merge_keeps_a_position_only_when_it_is_one_items() {
        // An item's ack and its forks (a step that emitted twice, then
        // panicked): still that item.
        let (ack, receipt) = at(7);
        let fork = ack.fork();
        let merged = Ack::merge([ack, fork]);
        assert_eq!(
            merged.position(),
            Some(&SourcePosition::Sequence { sequence: 7 })
        );
        merged.ack();
        assert!(receipt.is_acked());
        // Two items: no position.
        let ((a, ra), (b, rb)) = (at(1), at(2));
        let merged = Ack::merge([a, b]);
        assert_eq!(merged.position(), None);
        merged.ack();
        assert!(ra.is_acked() && rb.is_acked());
    }

    #[test]
    fn a_batch_with_items_without_acks_is_not_its_one_acked_items() {
        // A batch of three, only one of which has an ack: the batch's ack
        // must not name that item's position (Unbatch would give it to all
        // three), and still meets it.
        let (ack, receipt) = at(4);
        let batch = Ack::merge_batch([ack, Ack::none(), Ack::none()], 3);
        assert_eq!(batch.position(), None);
        let parts = batch.split(3);
        assert!(parts.iter().all(|p| p.position().is_none()));
        parts.into_iter().for_each(Ack::ack);
        assert!(receipt.is_acked());
        // A batch of one keeps it.
        let (ack, _receipt) = at(5);
        let batch = Ack::merge_batch([ack], 1);
        assert_eq!(
            batch.position(),
            Some(&SourcePosition::Sequence { sequence: 5 })
        );
        batch.ack();
    }

    #[test]
    fn a_position_of_an_unknown_kind_reads_as_unknown() {
        let read: SourcePosition =
            serde_json::from_str(r#"{"kind":"shard","shard":3,"cursor":"x"}"#).unwrap();
        assert_eq!(read, SourcePosition::Unknown);
    }
}
