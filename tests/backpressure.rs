//! A consumer that stops reading makes the producer wait, and the chain
//! holds no more items than its edges allow.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use streamz::{EdgeConfig, Map, Pipeline, Stage};
use support::settle;

#[tokio::test(start_paused = true)]
async fn stalled_consumer_blocks_producer_within_bound() {
    let edge = EdgeConfig::new(32, 8);
    let pipeline = Pipeline::with_edge(edge);
    let (tx, flow) = pipeline.channel::<u64>();
    let mut out = flow
        .pipe(Stage::new("a", Map::new(|x: &u64| x + 1)))
        .filter(|_: &u64| true)
        .pipe(Stage::new("b", Map::new(|x: &u64| x * 2)));

    let sent = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn({
        let sent = sent.clone();
        async move {
            let mut next = 0u64;
            while tx.send(next).await.is_ok() {
                next += 1;
                sent.store(next, Ordering::SeqCst);
            }
        }
    });

    // Read a few items, then stop reading until everything is idle.
    let mut read = 0u64;
    for _ in 0..5 {
        assert_eq!(out.next().await.unwrap().unwrap(), (read + 1) * 2);
        read += 1;
    }
    settle().await;
    let stalled_at = sent.load(Ordering::SeqCst);
    assert!(
        !producer.is_finished(),
        "the producer must be waiting in send"
    );

    // What the chain holds: the push channel, per stage task one chunk in
    // hand plus its output queue, and the consumer's buffered chunk.
    let bound = edge.capacity() as u64 + 2 * edge.max_items_held() as u64 + edge.max_chunk() as u64;
    let held = stalled_at - read;
    assert!(
        held <= bound,
        "{held} items held in the chain, bound {bound}"
    );
    assert!(
        held >= edge.capacity() as u64,
        "the chain should have filled up: {held}"
    );

    // Still stalled: no time or scheduling lets the producer go on.
    settle().await;
    assert_eq!(sent.load(Ordering::SeqCst), stalled_at);

    // Reading again lets it continue, in order.
    for _ in 0..200 {
        assert_eq!(out.next().await.unwrap().unwrap(), (read + 1) * 2);
        read += 1;
    }
    assert!(sent.load(Ordering::SeqCst) > stalled_at);
    drop(out);
    producer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn try_send_reports_full_when_pipeline_is_stalled() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(4, 2));
    let (tx, flow) = pipeline.channel::<u32>();
    let _out = flow.pipe(Stage::new("slow", Map::new(|x: &u32| *x)));
    let mut accepted = 0;
    loop {
        match tx.try_send(accepted) {
            Ok(()) => accepted += 1,
            Err(streamz::TrySendError::Full(v)) => {
                assert_eq!(v, accepted, "the refused item comes back");
                settle().await;
                if tx.try_send(v).is_err() {
                    break;
                }
                accepted += 1;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    // push channel 4 + stage in-hand 2 + queue 4 + ... bounded, not endless.
    assert!(accepted <= 4 + EdgeConfig::new(4, 2).max_items_held() as u32 + 2);
}

#[tokio::test(start_paused = true)]
async fn send_waits_while_full() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(2, 1));
    let (tx, flow) = pipeline.channel::<u32>();
    let mut out = flow;
    tx.send(1).await.unwrap();
    tx.send(2).await.unwrap();
    // The channel holds 2: a third send waits, and completes once the
    // consumer makes room.
    let mut third = tokio_test::task::spawn(tx.send(3));
    tokio_test::assert_pending!(third.poll());
    assert_eq!(out.next().await.unwrap().unwrap(), 1);
    assert!(third.is_woken(), "making room wakes the waiting producer");
    tokio_test::assert_ready_ok!(third.poll());
}

#[tokio::test]
async fn an_edge_of_any_capacity_works() {
    // The largest capacity the channel's semaphore can count, and any
    // chunk length; one more is refused when piped.
    let edge = streamz::EdgeConfig::default()
        .with_capacity(usize::MAX >> 3)
        .with_max_chunk(usize::MAX);
    assert_eq!(edge.max_items_held(), usize::MAX);
    let too_big = edge.with_capacity((usize::MAX >> 3) + 1).validate();
    assert_eq!(too_big.unwrap_err().field(), "edge.capacity");
    let out = streamz::Pipeline::with_edge(edge)
        .iter(0..10u32)
        .map(|x| x + 1)
        .async_boundary("b")
        .collect()
        .await;
    assert_eq!(out.len(), 10);
}
