//! Which offsets a [`KafkaSource`](super::KafkaSource) may commit: per
//! partition, the records read and not yet behind the watermark, in offset
//! order. The watermark moves past a record once it and every record
//! before it in its partition are acknowledged.

use super::record::Progress;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// One offset to commit: the next offset the partition's owner should
/// read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Commit {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) next: i64,
}

#[derive(Default)]
struct Partition {
    /// Read and not yet behind the watermark, oldest first: the offset and
    /// the record's progress (not its payload).
    pending: VecDeque<(i64, Arc<Progress>)>,
    /// One past the last record acknowledged with every record before it.
    next: Option<i64>,
    /// The watermark last handed out to commit.
    handed_out: Option<i64>,
}

impl Partition {
    /// Moves the watermark past the acknowledged prefix: how many records
    /// it passed.
    fn advance(&mut self) -> usize {
        let mut passed = 0;
        while let Some((offset, progress)) = self.pending.front() {
            if !progress.done() {
                break;
            }
            self.next = Some(offset + 1);
            self.pending.pop_front();
            passed += 1;
        }
        passed
    }
}

/// The tracker. A record enters with [`track`](Offsets::track) when it is
/// read and leaves when the watermark passes it or its partition is
/// released.
#[derive(Default)]
pub(crate) struct Offsets {
    topics: HashMap<Arc<str>, HashMap<i32, Partition>>,
    outstanding: usize,
}

impl Offsets {
    /// A record was read.
    pub(crate) fn track(
        &mut self,
        topic: &Arc<str>,
        partition: i32,
        offset: i64,
        progress: Arc<Progress>,
    ) {
        let partitions = match self.topics.get_mut(&**topic) {
            Some(p) => p,
            None => self.topics.entry(topic.clone()).or_default(),
        };
        partitions
            .entry(partition)
            .or_default()
            .pending
            .push_back((offset, progress));
        self.outstanding += 1;
    }

    /// Records read and not yet behind their partition's watermark.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Moves every watermark past its acknowledged prefix (to see how many
    /// records still wait), without handing anything out; returns how many
    /// records the watermarks passed.
    pub(crate) fn advance_only(&mut self) -> usize {
        let mut passed = 0;
        for partitions in self.topics.values_mut() {
            for p in partitions.values_mut() {
                passed += p.advance();
            }
        }
        self.outstanding -= passed;
        passed
    }

    /// Moves every watermark past its acknowledged prefix and returns the
    /// ones that moved since they were last handed out (or every one, with
    /// `all`: a commit that failed without a report is made again).
    pub(crate) fn advance(&mut self, all: bool) -> Vec<Commit> {
        let mut out = Vec::new();
        for (topic, partitions) in &mut self.topics {
            for (&partition, p) in partitions.iter_mut() {
                self.outstanding -= p.advance();
                if p.next.is_some() && (all || p.next != p.handed_out) {
                    p.handed_out = p.next;
                    out.push(Commit {
                        topic: topic.clone(),
                        partition,
                        next: p.next.unwrap_or_default(),
                    });
                }
            }
        }
        out
    }

    /// Every partition's watermark, moved first (for the last commit).
    pub(crate) fn watermarks(&mut self) -> Vec<Commit> {
        self.advance(true)
    }

    /// A commit of `next` failed: hand the partition's watermark out again
    /// at the next [`advance`](Offsets::advance), even if it has not moved.
    pub(crate) fn retry(&mut self, topic: &str, partition: i32, next: i64) {
        if let Some(p) = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.get_mut(&partition))
        {
            if p.handed_out == Some(next) {
                p.handed_out = None;
            }
        }
    }

    /// Forgets a partition taken from this member: its watermark to commit
    /// (if it has one), and how many of its records were still in flight
    /// (the partition's next owner reads them again; acknowledging them
    /// here later changes nothing).
    pub(crate) fn release(&mut self, topic: &str, partition: i32) -> (Option<Commit>, usize) {
        let Some(partitions) = self.topics.get_mut(topic) else {
            return (None, 0);
        };
        let Some(mut p) = partitions.remove(&partition) else {
            return (None, 0);
        };
        self.outstanding -= p.advance();
        let in_flight = p.pending.len();
        self.outstanding -= in_flight;
        for (_, progress) in &p.pending {
            progress.release();
        }
        let commit = p.next.map(|next| Commit {
            topic: Arc::from(topic),
            partition,
            next,
        });
        (commit, in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::kafka::record::{Entry, KafkaRecord};

    fn record(topic: &str, partition: i32, offset: i64) -> KafkaRecord {
        KafkaRecord::new(Entry {
            topic: Arc::from(topic),
            partition,
            offset,
            key: None,
            value: None,
            headers: Vec::new(),
            timestamp: None,
            progress: Arc::new(Progress::new(None)),
        })
    }

    /// The record's one obligation, met (as its core `Ack` would be).
    fn ack(r: &KafkaRecord) {
        crate::Ack::of(&r.progress().core).ack();
    }

    fn track(o: &mut Offsets, r: &KafkaRecord) {
        o.track(
            &Arc::from(r.topic()),
            r.partition(),
            r.offset(),
            r.progress().clone(),
        );
    }

    fn nexts(commits: &[Commit]) -> Vec<(i32, i64)> {
        let mut v: Vec<(i32, i64)> = commits.iter().map(|c| (c.partition, c.next)).collect();
        v.sort();
        v
    }

    #[test]
    fn the_watermark_moves_only_past_an_acknowledged_prefix() {
        let mut o = Offsets::default();
        let rs: Vec<KafkaRecord> = (10..15).map(|off| record("t", 0, off)).collect();
        rs.iter().for_each(|r| track(&mut o, r));
        assert_eq!(o.outstanding(), 5);
        // 11 and 12 done, 10 not: nothing to commit.
        ack(&rs[1]);
        ack(&rs[2]);
        assert!(o.advance(false).is_empty());
        // 10 done: past 10, 11, 12; the next to read is 13.
        ack(&rs[0]);
        assert_eq!(nexts(&o.advance(false)), [(0, 13)]);
        assert_eq!(o.outstanding(), 2);
        // Handed out once; nothing new until it moves again.
        assert!(o.advance(false).is_empty());
        ack(&rs[4]);
        assert!(o.advance(false).is_empty());
        ack(&rs[3]);
        assert_eq!(nexts(&o.advance(false)), [(0, 15)]);
        assert_eq!(o.outstanding(), 0);
        assert_eq!(nexts(&o.watermarks()), [(0, 15)]);
    }

    #[test]
    fn partitions_move_independently_and_a_released_one_is_forgotten() {
        let mut o = Offsets::default();
        let a: Vec<KafkaRecord> = (0..3).map(|off| record("t", 0, off)).collect();
        let b: Vec<KafkaRecord> = (0..3).map(|off| record("t", 1, off)).collect();
        a.iter().chain(&b).for_each(|r| track(&mut o, r));
        ack(&a[0]);
        b.iter().for_each(ack);
        assert_eq!(nexts(&o.advance(false)), [(0, 1), (1, 3)]);
        // Partition 0 is taken away with two records in flight.
        let (commit, in_flight) = o.release("t", 0);
        assert_eq!(commit.map(|c| c.next), Some(1));
        assert_eq!(in_flight, 2);
        assert_eq!(o.outstanding(), 0);
        // Acknowledging them afterwards commits nothing for partition 0.
        ack(&a[1]);
        ack(&a[2]);
        assert!(o.advance(false).is_empty());
        assert_eq!(nexts(&o.watermarks()), [(1, 3)]);
        // Releasing what is not held is harmless.
        assert_eq!(o.release("t", 7), (None, 0));
        assert_eq!(o.release("other", 0), (None, 0));
    }

    #[test]
    fn a_partition_assigned_again_starts_afresh() {
        let mut o = Offsets::default();
        let first = record("t", 0, 5);
        track(&mut o, &first);
        let _ = o.release("t", 0);
        // Read again from the committed offset by this member later.
        let again = record("t", 0, 5);
        track(&mut o, &again);
        ack(&first); // the old copy: changes nothing
        assert!(o.advance(false).is_empty());
        ack(&again);
        assert_eq!(nexts(&o.advance(false)), [(0, 6)]);
    }

    #[test]
    fn a_forked_record_is_done_when_every_obligation_is_met() {
        let mut o = Offsets::default();
        let r = record("t", 0, 0);
        track(&mut o, &r);
        // Its core ack, forked by a broadcast to two outputs.
        let to_topic = crate::Ack::of(&r.progress().core);
        let to_database = to_topic.fork();
        to_topic.ack();
        assert!(o.advance(false).is_empty());
        assert!(!r.is_acked());
        to_database.ack();
        assert_eq!(nexts(&o.advance(false)), [(0, 1)]);
        assert!(r.is_acked() && r.acker().is_acked());
    }

    #[test]
    fn released_records_say_so_and_a_failed_commit_is_handed_out_again() {
        let mut o = Offsets::default();
        let a = record("t", 0, 0);
        let b = record("t", 0, 1);
        track(&mut o, &a);
        track(&mut o, &b);
        ack(&a);
        assert_eq!(nexts(&o.advance(false)), [(0, 1)]);
        // The commit of 1 failed: nothing moved, but it is handed out again.
        o.retry("t", 0, 1);
        assert_eq!(nexts(&o.advance(false)), [(0, 1)]);
        assert!(o.advance(false).is_empty());
        // A stale failure (an older offset) changes nothing.
        o.retry("t", 0, 0);
        assert!(o.advance(false).is_empty());
        assert!(!b.is_released());
        let _ = o.release("t", 0);
        assert!(b.is_released() && b.acker().is_released());
        assert!(!a.is_released(), "a was committed past, not released");
    }
}
