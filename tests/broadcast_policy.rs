//! Broadcast outputs that fall behind: `BranchPolicy::DropNewest` sheds
//! and counts, `BranchPolicy::Detach` cuts the branch off and ends its
//! flow; the waiting outputs get every item and the stage's conservation
//! law holds.

mod support;

use std::time::Duration;

use futures::StreamExt;

use streamz::{
    Ack, BranchPolicy, Broadcast, EdgeConfig, ErrorKind, Pipeline, Receipt, StreamError,
};
use support::{settle, split, stage};

const LIMIT: Duration = Duration::from_secs(60);

/// `n` values with an error after every 100th.
fn input(n: u32) -> streamz::Flow<u32> {
    let items: Vec<streamz::Result<u32>> = (0..n)
        .flat_map(|i| {
            let mut v = vec![Ok(i)];
            if i % 100 == 99 {
                v.push(Err(StreamError::new(ErrorKind::Failed, "source")));
            }
            v
        })
        .collect();
    streamz::Pipeline::new().try_stream(futures::stream::iter(items))
}

#[tokio::test(start_paused = true)]
async fn drop_newest_on_a_branch_that_never_reads_keeps_the_main_path_whole() {
    let tee = Broadcast::new(2)
        .named("tee")
        .with_policy(1, BranchPolicy::DropNewest)
        .with_edge(EdgeConfig::new(16, 4));
    let stats = tee.branch_stats();
    let flow = input(1_000);
    let pipeline = flow.pipeline().clone();
    let mut outputs = flow.broadcast_with(tee);
    let never_read = outputs.pop().unwrap();
    let main = outputs.pop().unwrap();
    let out = tokio::time::timeout(LIMIT, main.collect())
        .await
        .expect("not stalled");
    let (values, errors) = split(out);
    assert_eq!(
        values,
        (0..1_000).collect::<Vec<_>>(),
        "every value, in order"
    );
    assert_eq!(errors.len(), 10, "every error, once, on the waiting output");
    // The branch holds what fit in its edge; the rest was dropped and counted.
    assert_eq!(stats.dropped(1), 1_000 - 16);
    assert_eq!(stats.dropped(0), 0);
    assert!(!stats.detached(1));
    settle().await;
    let m = stage(&pipeline, "tee");
    support::assert_conserved(&m);
    assert_eq!((m.received, m.emitted, m.errors_passed), (1_010, 1_000, 10));
    assert_eq!((m.dropped, m.undelivered), (0, 0));
    // What it held is still there, in order, then the end.
    let held = support::values(never_read.collect().await);
    assert_eq!(held, (0..16).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_slow_branch_that_drops_gets_what_fits_and_the_count_adds_up() {
    // The branch reads one item per millisecond; the input is instant.
    let tee = Broadcast::new(2)
        .with_policy(1, BranchPolicy::DropNewest)
        .with_edge(EdgeConfig::new(32, 8));
    let stats = tee.branch_stats();
    let [main, slow]: [_; 2] = streamz::iter(0..5_000u32)
        .broadcast_with(tee)
        .try_into()
        .unwrap();
    let slow = tokio::spawn(async move {
        let mut got = 0u64;
        let mut slow = slow;
        while slow.next().await.is_some() {
            got += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        got
    });
    let main = tokio::time::timeout(LIMIT, main.collect())
        .await
        .expect("not stalled");
    assert_eq!(main.len(), 5_000);
    let got = tokio::time::timeout(LIMIT, slow)
        .await
        .expect("ends")
        .unwrap();
    assert!(got >= 32, "the branch got at least its edge's worth: {got}");
    assert_eq!(
        got + stats.dropped(1),
        5_000,
        "got {got}, dropped {}",
        stats.dropped(1)
    );
}

#[tokio::test(start_paused = true)]
async fn detach_cuts_a_branch_that_never_reads_and_ends_its_flow() {
    let tee = Broadcast::new(3)
        .named("tee")
        .with_policy(2, BranchPolicy::Detach)
        .with_edge(EdgeConfig::new(16, 4));
    let stats = tee.branch_stats();
    let flow = input(1_000);
    let pipeline = flow.pipeline().clone();
    let [a, b, stuck]: [_; 3] = flow.broadcast_with(tee).try_into().unwrap();
    let (a, b) = tokio::time::timeout(LIMIT, async { tokio::join!(a.collect(), b.collect()) })
        .await
        .expect("not stalled");
    let (a_values, a_errors) = split(a);
    let (b_values, b_errors) = split(b);
    assert_eq!(a_values.len(), 1_000);
    assert_eq!(b_values.len(), 1_000);
    assert_eq!(a_errors.len() + b_errors.len(), 10, "each error once");
    assert!(stats.detached(2));
    assert!(!stats.detached(0) && !stats.detached(1));
    assert_eq!(stats.dropped(2), 1_000 - 16, "what it missed is counted");
    // The detached branch reads what its channel held, then its end,
    // although the broadcast has ended only for it.
    let held = tokio::time::timeout(LIMIT, stuck.collect())
        .await
        .expect("the detached flow ends");
    assert_eq!(support::values(held), (0..16).collect::<Vec<_>>());
    settle().await;
    let m = stage(&pipeline, "tee");
    support::assert_conserved(&m);
    assert_eq!((m.received, m.emitted, m.errors_passed), (1_010, 1_000, 10));
}

#[tokio::test(start_paused = true)]
async fn a_detached_branch_ends_while_the_broadcast_runs_on() {
    // The input never ends: the detached branch must still see its end.
    let tee = Broadcast::new(2)
        .with_policy(1, BranchPolicy::Detach)
        .with_edge(EdgeConfig::new(4, 4));
    let stats = tee.branch_stats();
    let flow = streamz::iter(0u64..);
    let pipeline = flow.pipeline().clone();
    let [main, side]: [_; 2] = flow.broadcast_with(tee).try_into().unwrap();
    // Read 1,000 from the main path (the side branch never reads, so it
    // is detached once its 4 are queued).
    let mut main = main;
    for i in 0..1_000u64 {
        let v = tokio::time::timeout(LIMIT, main.next())
            .await
            .expect("flows");
        assert_eq!(v.unwrap().unwrap(), i);
    }
    assert!(stats.detached(1));
    let side = tokio::time::timeout(LIMIT, side.collect())
        .await
        .expect("the side ends");
    assert_eq!(side.len(), 4);
    pipeline.abort();
}

#[tokio::test(start_paused = true)]
async fn a_waiting_branch_still_paces_the_broadcast() {
    // Output 1 sheds, output 0 waits: with output 0 never read, the
    // broadcast stalls (backpressure), and the shedding branch gets only
    // what came before.
    let tee = Broadcast::new(2)
        .with_policy(1, BranchPolicy::DropNewest)
        .with_edge(EdgeConfig::new(8, 8));
    let stats = tee.branch_stats();
    let [waiting, shedding]: [_; 2] = streamz::iter(0..1_000u32)
        .broadcast_with(tee)
        .try_into()
        .unwrap();
    let shedding = tokio::spawn(shedding.collect());
    settle().await;
    assert!(!shedding.is_finished(), "paced by the waiting output");
    let all = waiting.collect().await;
    assert_eq!(all.len(), 1_000);
    let side = shedding.await.unwrap();
    assert_eq!(side.len() as u64 + stats.dropped(1), 1_000);
}

#[tokio::test(start_paused = true)]
async fn acknowledgements_of_shed_copies_are_met() {
    // Each item's acknowledgement is met once every output's copy is: a
    // copy shed by a policy counts as decided, so the source is not held
    // at its unacknowledged limit by a branch that fell behind.
    for policy in [BranchPolicy::DropNewest, BranchPolicy::Detach] {
        let pipeline = streamz::Pipeline::new();
        let (acks, receipts): (Vec<Ack>, Vec<Receipt>) = (0..500).map(|_| Ack::new()).unzip();
        let items = (0..500u32).zip(acks).map(|(i, ack)| (Ok(i), ack));
        let flow = pipeline.acked_stream(futures::stream::iter(items));
        let tee = Broadcast::new(2)
            .with_policy(1, policy)
            .with_edge(EdgeConfig::new(8, 8));
        let [main, never_read]: [_; 2] = flow.broadcast_with(tee).try_into().unwrap();
        let main = tokio::time::timeout(LIMIT, main.collect())
            .await
            .expect("not stalled");
        let mut met = 0;
        for item in main {
            drop(item); // a value's ack is met when the value is dropped
            met += 1;
        }
        assert_eq!(met, 500);
        // Only the copies the branch still holds are undecided.
        let unmet = receipts.iter().filter(|r| !r.is_acked()).count();
        assert_eq!(unmet, 8, "{policy:?}");
        drop(never_read);
        settle().await;
        let unmet = receipts.iter().filter(|r| !r.is_acked()).count();
        assert_eq!(
            unmet, 8,
            "{policy:?}: copies a reader never took stay undecided"
        );
    }
}

/// The configuration error a broadcast was refused with.
async fn refused(broadcast: Broadcast) -> streamz::ConfigError {
    let flow = streamz::iter(0..3u32);
    let pipeline = flow.pipeline().clone();
    for out in flow.broadcast_with(broadcast) {
        let _ = out.collect().await;
    }
    match pipeline.join().await {
        Err(streamz::PipelineError::Config(e)) => e,
        other => panic!("not refused: {other:?}"),
    }
}

#[tokio::test]
async fn bad_policies_are_refused() {
    let e = refused(Broadcast::new(2).with_policy(2, BranchPolicy::DropNewest)).await;
    assert_eq!(e.field(), "policy");
    assert_eq!(
        e.to_string(),
        "Broadcast `broadcast`: `policy` names output 2, but the broadcast has 2 (counted from 0)"
    );
    let e = refused(
        Broadcast::new(2)
            .with_policy(0, BranchPolicy::Detach)
            .with_policy(1, BranchPolicy::DropNewest),
    )
    .await;
    assert_eq!(e.field(), "policy");
    // Setting an output again replaces its policy.
    let ok = Broadcast::new(2)
        .with_policy(0, BranchPolicy::Detach)
        .with_policy(0, BranchPolicy::Wait)
        .with_policy(1, BranchPolicy::DropNewest);
    let outputs = streamz::iter(0..3u32).broadcast_with(ok);
    for o in outputs {
        let _ = o.collect().await;
    }
}

/// The waiting output goes away with pieces queued: the broadcast becomes
/// a plain one, and what no reader got is counted undelivered.
#[tokio::test(start_paused = true)]
async fn when_the_waiting_output_goes_away_the_rest_wait_and_the_counts_hold() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(1024, 64));
    let tee = Broadcast::new(2)
        .named("tee")
        .with_policy(1, BranchPolicy::DropNewest)
        .with_edge(EdgeConfig::new(4, 4));
    let stats = tee.branch_stats();
    let [mut main, side]: [_; 2] = pipeline
        .iter(0..128u32)
        .broadcast_with(tee)
        .try_into()
        .unwrap();
    let mut got_main = vec![];
    for _ in 0..4 {
        got_main.push(main.next().await.unwrap().unwrap());
    }
    settle().await;
    drop(main);
    settle().await;
    let side = support::values(tokio::time::timeout(LIMIT, side.collect()).await.unwrap());
    settle().await;
    let m = stage(&pipeline, "tee");
    let mut taken: std::collections::BTreeSet<u32> = got_main.iter().copied().collect();
    taken.extend(side.iter().copied());
    let missing: Vec<u32> = (0..128).filter(|v| !taken.contains(v)).collect();
    // Main was read up to 4 and then paced the broadcast (it waits, and
    // waiting outputs are delivered to first); once it went away, the
    // shedding output waited too and got every value.
    assert_eq!(got_main, [0, 1, 2, 3]);
    assert_eq!(side, (0..128).collect::<Vec<_>>());
    assert!(missing.is_empty());
    assert_eq!(stats.dropped(1), 0);
    support::assert_conserved(&m);
    assert_eq!((m.emitted, m.undelivered), (128, 0));
}

/// A shedding output before the waiting one (in index order) got every
/// value: when the waiting one goes away, nothing is counted undelivered.
#[tokio::test(start_paused = true)]
async fn an_earlier_shedding_output_that_got_everything_counts_nothing_undelivered() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(1024, 64));
    let (tx, rx) = futures::channel::mpsc::unbounded::<u32>();
    let tee = Broadcast::new(2)
        .named("tee")
        .with_policy(0, BranchPolicy::DropNewest)
        .with_edge(EdgeConfig::new(64, 4));
    let stats = tee.branch_stats();
    let [side, main]: [_; 2] = pipeline.stream(rx).broadcast_with(tee).try_into().unwrap();
    let side = tokio::spawn(side.collect());
    (0..64).for_each(|i| tx.unbounded_send(i).unwrap());
    settle().await; // lane 1 (waiting) now full, not read
    (64..128).for_each(|i| tx.unbounded_send(i).unwrap());
    settle().await; // lane 0 got copies 64..127; lane 1 blocks
    drop(main);
    settle().await;
    drop(tx);
    let side = support::values(tokio::time::timeout(LIMIT, side).await.unwrap().unwrap());
    settle().await;
    let m = stage(&pipeline, "tee");
    assert_eq!(side, (0..128).collect::<Vec<_>>(), "lane 0 got every value");
    // main's channel held 0..63 when dropped (discarded, counted by the
    // pipeline); 64..127 reached lane 0. Nothing emitted went unread by all.
    assert_eq!(
        m.undelivered, 0,
        "values lane 0 received counted undelivered"
    );
    assert_eq!(stats.dropped(0), 0, "it was read: it never fell behind");
}

/// The waiting output goes away while a detached output's reader is alive
/// but never reads: the stage stops early, as when every output is gone.
#[tokio::test(start_paused = true)]
async fn a_detached_output_never_read_does_not_keep_the_stage_running() {
    let n = 200_000u64;
    let tee = Broadcast::new(2)
        .named("tee")
        .with_policy(1, BranchPolicy::Detach)
        .with_edge(EdgeConfig::new(4, 4));
    let stats = tee.branch_stats();
    let flow = streamz::iter(0..n);
    let pipeline = flow.pipeline().clone();
    let [mut main, side]: [_; 2] = flow.broadcast_with(tee).try_into().unwrap();
    for _ in 0..1_000 {
        main.next().await.unwrap().unwrap();
    }
    assert!(stats.detached(1));
    drop(main);
    settle().await;
    let m = stage(&pipeline, "tee");
    drop(side);
    assert!(
        m.received < n,
        "stage consumed the whole input into undelivered instead of stopping: {m:?}"
    );
}

/// A panic in the broadcast (a `Clone` that panics) sends its `panicked`
/// error to an output that still reads, not behind a detached one's end.
#[derive(Debug, PartialEq)]
struct Bomb(u32);
impl Clone for Bomb {
    fn clone(&self) -> Self {
        assert!(self.0 != 5_000, "clone bomb");
        Bomb(self.0)
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_reaches_an_output_that_reads_not_a_detached_one() {
    let tee = Broadcast::new(3)
        .with_policy(0, BranchPolicy::Detach)
        .with_edge(EdgeConfig::new(4, 4));
    let stats = tee.branch_stats();
    let flow = streamz::iter((0..10_000u32).map(Bomb));
    let pipeline = flow.pipeline().clone();
    let [detached, a, b]: [_; 3] = flow.broadcast_with(tee).try_into().unwrap();
    let (a, b) = tokio::time::timeout(LIMIT, async { tokio::join!(a.collect(), b.collect()) })
        .await
        .unwrap();
    assert!(stats.detached(0));
    let panicked = |v: &Vec<streamz::Result<Bomb>>| {
        v.iter()
            .any(|r| matches!(r, Err(e) if e.kind() == ErrorKind::Panicked))
    };
    let d = detached.collect().await;
    assert!(
        panicked(&a) || panicked(&b),
        "no reader saw the panicked error"
    );
    assert!(!panicked(&d));
    assert!(pipeline.join().await.is_err(), "join reports the panic");
}

/// A clone of a `Broadcast` has counts of its own.
#[tokio::test(start_paused = true)]
async fn a_cloned_broadcast_has_stats_of_its_own() {
    let tee = Broadcast::new(2)
        .with_policy(1, BranchPolicy::Detach)
        .with_edge(EdgeConfig::new(256, 4));
    let stats = tee.branch_stats();
    let other = tee.clone();
    let other_stats = other.branch_stats();
    // The clone's output 1 is never read: detached.
    let [a0, _a1]: [_; 2] = streamz::iter(0..1_000u32)
        .broadcast_with(other)
        .try_into()
        .unwrap();
    assert_eq!(a0.collect().await.len(), 1_000);
    assert!(other_stats.detached(1));
    // The original's output 1 is read in full.
    let [b0, b1]: [_; 2] = streamz::iter(0..100u32)
        .broadcast_with(tee)
        .try_into()
        .unwrap();
    let (b0, b1) = tokio::join!(b0.collect(), b1.collect());
    assert_eq!((b0.len(), b1.len()), (100, 100));
    assert!(!stats.detached(1));
    assert_eq!(stats.dropped(1), 0);
}

/// The topology shows what a detached output's channel still holds for
/// its branch: detaching ends the channel, it does not empty it.
#[tokio::test(start_paused = true)]
async fn a_detached_edge_shows_what_it_still_holds() {
    let tee = Broadcast::new(2)
        .named("tee")
        .with_policy(1, BranchPolicy::Detach)
        .with_edge(EdgeConfig::new(16, 4));
    let stats = tee.branch_stats();
    let flow = streamz::iter(0..1_000u32);
    let pipeline = flow.pipeline().clone();
    let [main, side]: [_; 2] = flow.broadcast_with(tee).try_into().unwrap();
    // The side branch's stage reads until its own output (never read) is
    // full, then stops reading: its input fills and the tee detaches it,
    // leaving in the channel what the branch has not read.
    let _side = side.pipe(
        streamz::Stage::new("side", streamz::Map::new(|n: &u32| *n))
            .with_edge(EdgeConfig::new(4, 4)),
    );
    let main = tokio::time::timeout(LIMIT, main.collect())
        .await
        .expect("not stalled");
    assert_eq!(main.len(), 1_000);
    assert!(stats.detached(1));
    let topology = pipeline.topology();
    let at = |name: &str| topology.stages.iter().position(|s| s.name == name).unwrap();
    let edge = topology
        .edges
        .iter()
        .find(|e| e.from == at("tee") && e.to == at("side"))
        .expect("an edge from the tee to the side branch");
    let queue = edge.queue.expect("a channel: the tee has a task");
    // What the tee sent the side branch, less what the branch read.
    let sent = 1_000 - stats.dropped(1);
    let read = topology.stages[at("side")].metrics.received;
    assert_eq!(queue.held as u64, sent - read, "{topology:?}");
    assert!(
        queue.held > 0,
        "the branch stopped reading before the end: {topology:?}"
    );
}
