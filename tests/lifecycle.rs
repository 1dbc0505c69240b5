//! Dropping the output, graceful shutdown, abort and join.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use streamz::{
    EdgeConfig, ErrorKind, HealthGate, Map, Pipeline, PipelineError, Stage, TrySendError,
};
use support::{assert_conserved, settle, stage, stopped_early, values};
use tokio::sync::watch;

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test(start_paused = true)]
async fn a_join_dropped_part_way_loses_no_panic() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(4, 2));
    // The first task panics at once; the second waits on a pusher.
    let broken = pipeline.iter(PanicsAt(0, 1)).async_boundary("broken");
    let (tx, waiting) = pipeline.channel::<u32>();
    let waiting = waiting.async_boundary("waiting");
    let (broken_out, ()) = tokio::join!(broken.collect(), async {
        // The first join takes the broken task's panic, then waits on the
        // other task until its time runs out.
        let first = tokio::time::timeout(Duration::from_millis(20), pipeline.join()).await;
        assert!(first.is_err(), "the waiting task keeps the first join busy");
    });
    assert_eq!(broken_out.len(), 1, "only the `panicked` error item");
    drop(tx);
    assert!(waiting.collect().await.is_empty());
    let Err(PipelineError::Panicked(panics)) = pipeline.join().await else {
        panic!("the second join must still report the panic");
    };
    assert_eq!(panics.len(), 1);
    assert_eq!(panics[0].stage(), "broken");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_final_flow_stops_every_task() {
    let pipeline = Pipeline::new();
    // An idle producer keeps its sender: nothing ends by itself.
    let (tx, flow) = pipeline.channel::<u32>();
    let [a, b] = flow
        .pipe(Stage::new("one", Map::new(|x: &u32| x + 1)))
        .pipe(Stage::new("two", Map::new(|x: &u32| x * 2)))
        .broadcast();
    let merged = a.merge_with(b).async_boundary("three");
    tx.send(1).await.unwrap();
    settle().await;
    assert!(pipeline.running_tasks() >= 5);
    assert_eq!(alive_tasks(), pipeline.running_tasks());

    drop(merged);
    settle().await;
    assert_eq!(pipeline.running_tasks(), 0);
    assert_eq!(alive_tasks(), 0, "no task of the chain is left");
    assert!(tx.is_closed(), "the producer learns that the flow is gone");
    assert_eq!(tx.send(2).await.unwrap_err().0, 2);
    pipeline.join().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn dropping_mid_stream_counts_every_item() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(64, 16));
    let mut out = pipeline
        .iter(0..10_000u64)
        .pipe(Stage::new("a", Map::new(|x: &u64| x + 1)))
        .pipe(Stage::new("b", Map::new(|x: &u64| x + 1)));
    let mut read = 0u64;
    while read < 10 {
        out.next().await.unwrap().unwrap();
        read += 1;
    }
    settle().await;
    drop(out);
    settle().await;
    pipeline.join().await.unwrap();

    let produced = stage(&pipeline, "iter").emitted;
    assert!(produced < 10_000, "the source stopped early");
    assert_eq!(
        produced,
        read + pipeline.discarded() + stopped_early(&pipeline)
    );
    assert_conserved(&stage(&pipeline, "a"));
    assert_conserved(&stage(&pipeline, "b"));
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_delivers_everything_accepted() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(16, 4));
    let (tx, flow) = pipeline.channel::<u64>();
    let out = flow
        .pipe(Stage::new("a", Map::new(|x: &u64| x * 10)))
        .pipe(Stage::new("b", Map::new(|x: &u64| x + 1)));
    let accepted = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn({
        let accepted = accepted.clone();
        let pipeline = pipeline.clone();
        async move {
            let mut next = 0;
            loop {
                if next == 500 {
                    // Shut down with work in flight in every stage.
                    pipeline.shutdown();
                }
                match tx.send(next).await {
                    Ok(()) => {
                        next += 1;
                        accepted.store(next, Ordering::SeqCst);
                    }
                    Err(refused) => return refused.0,
                }
            }
        }
    });
    let consumer = tokio::spawn(out.collect());
    let refused = producer.await.unwrap();
    let got = values(consumer.await.unwrap());
    let accepted = accepted.load(Ordering::SeqCst);

    assert_eq!(refused, accepted, "the first refused item is the next one");
    assert_eq!(got.len() as u64, accepted, "every accepted item arrives");
    assert!(got.iter().enumerate().all(|(i, v)| *v == i as u64 * 10 + 1));
    pipeline.join().await.unwrap();
    assert_eq!(alive_tasks(), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_an_iterator_source_and_flushes() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(8, 4));
    let mut out = pipeline
        .iter(0..u64::MAX)
        .pipe(Stage::new("a", Map::new(|x: &u64| *x)));
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(out.next().await.unwrap().unwrap());
    }
    pipeline.shutdown();
    while let Some(item) = out.next().await {
        got.push(item.unwrap());
    }
    let produced = stage(&pipeline, "iter").emitted;
    assert_eq!(got.len() as u64, produced, "all produced items drained");
    assert!(got.iter().enumerate().all(|(i, v)| *v == i as u64));
}

#[tokio::test(start_paused = true)]
async fn abort_stops_at_once_and_counts_what_was_in_flight() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(32, 8));
    let mut out = pipeline
        .iter(0..1_000_000u64)
        .pipe(Stage::new("a", Map::new(|x: &u64| *x)))
        .pipe(Stage::new("b", Map::new(|x: &u64| *x)))
        .pipe(Stage::new("c", Map::new(|x: &u64| *x)));
    out.next().await.unwrap().unwrap();
    settle().await; // the chain is full: the consumer is not reading

    pipeline.abort();
    settle().await;
    assert_eq!(
        pipeline.running_tasks(),
        0,
        "abort does not wait for the consumer"
    );
    pipeline.join().await.unwrap();
    let lost = stopped_early(&pipeline);
    assert!(lost > 0, "items were in flight: {:?}", pipeline.metrics());

    // What is already in the final queue can still be read; the rest was
    // counted as aborted.
    let mut read = 1;
    while let Some(item) = out.next().await {
        item.unwrap();
        read += 1;
    }
    let produced = stage(&pipeline, "iter").emitted;
    assert_eq!(produced, read + lost + pipeline.discarded());
    for name in ["a", "b", "c"] {
        assert_conserved(&stage(&pipeline, name));
    }
}

/// An iterator whose `next` panics: the source runs inside a stage task.
struct PanicsAt(u32, u32);

impl Iterator for PanicsAt {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        self.0 += 1;
        assert!(self.0 != self.1, "source broke at {}", self.1);
        Some(self.0)
    }
}

#[tokio::test]
async fn join_reports_a_stage_that_panicked() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(4, 2));
    let out = pipeline
        .iter(PanicsAt(0, 7))
        .async_boundary("reader")
        .collect()
        .await;
    // The stream does not just end short: its last item says why.
    let last = out.last().unwrap().as_ref().unwrap_err();
    assert_eq!(last.kind(), ErrorKind::Panicked);
    assert_eq!(last.stage(), "reader");
    let before: Vec<u32> = out[..out.len() - 1]
        .iter()
        .map(|r| *r.as_ref().unwrap())
        .collect();
    assert_eq!(before, (1..7).collect::<Vec<_>>());

    let Err(PipelineError::Panicked(panics)) = pipeline.join().await else {
        panic!("join must report the panic");
    };
    assert_eq!(panics.len(), 1);
    assert_eq!(panics[0].stage(), "reader");
    assert!(panics[0].message().contains("source broke at 7"));
}

#[tokio::test(start_paused = true)]
async fn counters_are_readable_while_running() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let mut out = flow.pipe(Stage::new("double", Map::new(|x: &u32| x * 2)));
    for i in 0..10 {
        tx.send(i).await.unwrap();
    }
    settle().await;
    let m = stage(&pipeline, "double");
    assert_eq!((m.received, m.emitted), (10, 10));
    for _ in 0..10 {
        out.next().await.unwrap().unwrap();
    }
    tx.send(10).await.unwrap();
    settle().await;
    assert_eq!(stage(&pipeline, "double").received, 11);
}

#[tokio::test(start_paused = true)]
async fn abort_stops_a_chain_whose_input_keeps_flowing() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(32, 8));
    let mut out = pipeline
        .iter(0u64..)
        .pipe(Stage::new("a", Map::new(|x: &u64| *x)))
        .pipe(Stage::new("b", Map::new(|x: &u64| *x)));
    let mut read = 0u64;
    while read < 100 {
        out.next().await.unwrap().unwrap();
        read += 1;
    }
    pipeline.abort();
    // The consumer keeps reading: the stream must end, not run forever.
    while let Some(item) = out.next().await {
        item.unwrap();
        read += 1;
    }
    pipeline.join().await.unwrap();
    let produced = stage(&pipeline, "iter").emitted;
    assert_eq!(
        produced,
        read + stopped_early(&pipeline) + pipeline.discarded()
    );
    assert_conserved(&stage(&pipeline, "a"));
    assert_conserved(&stage(&pipeline, "b"));
}

/// `fut`'s output, or a failed test if it hangs (on the paused clock the
/// limit passes as soon as every task is idle).
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} hangs"))
}

/// Fills the pipeline behind `tx` until it applies backpressure; returns
/// how many items it took.
async fn fill(tx: &streamz::Pusher<u32>) -> u32 {
    let mut accepted = 0;
    loop {
        match tx.try_send(accepted) {
            Ok(()) => accepted += 1,
            Err(TrySendError::Full(_)) => {
                settle().await; // let the stages move what they can
                match tx.try_send(accepted) {
                    Ok(()) => accepted += 1,
                    Err(TrySendError::Full(_)) => return accepted,
                    Err(e) => panic!("{e:?}"),
                }
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_pusher_refuses_at_once_after_shutdown_while_the_output_is_full() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(4, 2));
    let (tx, flow) = pipeline.channel::<u32>();
    // Nobody reads the output yet: the stage is blocked on a full edge and
    // does not poll the source.
    let out = flow.pipe(Stage::new("a", Map::new(|x: &u32| *x)));
    let accepted = fill(&tx).await;
    assert!(accepted > 0);

    // A producer already waiting for room, and one waiting for the end.
    let waiting = tokio::spawn({
        let tx = tx.clone();
        async move { tx.send(1_000).await }
    });
    let watcher = tokio::spawn({
        let tx = tx.clone();
        async move { tx.closed().await }
    });
    settle().await;
    assert!(!waiting.is_finished() && !watcher.is_finished());
    assert!(!tx.is_closed());

    pipeline.shutdown();
    assert!(tx.is_closed(), "is_closed is true at once");
    assert!(
        matches!(tx.try_send(1_001), Err(TrySendError::Closed(1_001))),
        "try_send says Closed, not Full"
    );
    let refused = within("a send after shutdown", tx.send(1_002)).await;
    assert_eq!(refused.unwrap_err().0, 1_002);
    let refused = within("a send that waited for room", waiting).await;
    assert_eq!(refused.unwrap().unwrap_err().0, 1_000);
    within("closed()", watcher).await.unwrap();
    within("closed() after shutdown", tx.closed()).await;

    // What was accepted before the shutdown still drains, in order.
    let got = values(within("the drain", out.collect()).await);
    assert_eq!(got, (0..accepted).collect::<Vec<_>>());
    within("join", pipeline.join()).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_pusher_refuses_after_shutdown_in_front_of_a_closed_gate() {
    let (healthy, health) = watch::channel(false);
    let pipeline = Pipeline::with_edge(EdgeConfig::new(64, 8));
    let (tx, flow) = pipeline.channel::<u32>();
    let out = tokio::spawn(flow.pipe(HealthGate::new(health)).collect());
    for i in 0..3 {
        tx.send(i).await.unwrap(); // accepted: they wait at the closed gate
    }
    settle().await;

    pipeline.shutdown();
    // The gate does not poll its input, but nothing more gets in.
    for i in 3..100 {
        match tx.try_send(i) {
            Err(TrySendError::Closed(v)) => assert_eq!(v, i),
            other => panic!("item {i} after shutdown: {other:?}"),
        }
    }
    assert_eq!(
        within("a send after shutdown", tx.send(100))
            .await
            .unwrap_err()
            .0,
        100
    );
    assert!(tx.is_closed());
    within("closed()", tx.closed()).await;

    // The gate opens: the items accepted before the shutdown pass, and
    // the stream ends.
    healthy.send(true).unwrap();
    let got = values(within("the drain", out).await.unwrap());
    assert_eq!(got, [0, 1, 2]);
    within("join", pipeline.join()).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_pusher_refuses_after_abort_and_after_its_token_is_cancelled() {
    let pipeline = Pipeline::new();
    let (tx, _flow) = pipeline.channel::<u32>();
    pipeline.abort();
    assert!(tx.is_closed());
    assert!(matches!(tx.try_send(1), Err(TrySendError::Closed(1))));
    within("closed()", tx.closed()).await;

    let token = tokio_util::sync::CancellationToken::new();
    let pipeline = Pipeline::with_shutdown_token(token.clone());
    let (tx, _flow) = pipeline.channel::<u32>();
    token.cancel();
    assert_eq!(within("send", tx.send(2)).await.unwrap_err().0, 2);
}

#[tokio::test(start_paused = true)]
async fn a_push_source_counts_what_it_accepted_when_the_chain_stops_early() {
    let pipeline = Pipeline::with_edge(streamz::EdgeConfig::new(2, 1));
    let (tx, flow) = pipeline.channel::<u32>();
    let out = flow.map(|x| x + 1).async_boundary("a");
    // Nobody reads: the boundary fills its output and blocks, and the
    // push channel fills behind it.
    let producer = tokio::spawn(async move {
        let mut accepted = 0u64;
        for i in 0..100 {
            if tx.send(i).await.is_err() {
                break;
            }
            accepted += 1;
        }
        accepted
    });
    settle().await;
    drop(out);
    let accepted = producer.await.unwrap();
    pipeline.join().await.unwrap();
    let m = pipeline.metrics();
    let source = m.iter().find(|m| m.name == "channel").unwrap();
    let lost: u64 = m
        .iter()
        .map(|m| m.dropped + m.aborted + m.undelivered)
        .sum();
    // Everything the Pusher accepted was produced by the source, and ends
    // as a drop, an abort or an undelivered item: the chain balances.
    assert!(accepted > 3, "the push channel held some: {accepted}");
    assert_eq!(source.emitted, accepted, "{m:?}");
    assert_eq!(source.emitted, lost + pipeline.discarded(), "{m:?}");
}
