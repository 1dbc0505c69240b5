//! Fan-in (merge) and fan-out (broadcast).

mod support;

use futures::StreamExt;
use streamz::{EdgeConfig, Pipeline, StreamError};
use support::{settle, split, stage, values};

#[tokio::test]
async fn merge_keeps_every_item_and_each_input_order() {
    let a = streamz::iter(0..1000u32);
    let b = streamz::iter(1000..2000u32).map(|x| *x);
    let c = streamz::try_stream(futures::stream::iter(vec![
        Ok(5000),
        Err(StreamError::failed("c", "bad")),
    ]));
    let merged = streamz::merge([a, b, c]);
    let pipeline = merged.pipeline().clone();
    let (oks, errs) = split(merged.collect().await);
    assert_eq!(oks.len(), 2001);
    assert_eq!(errs.len(), 1);
    let from_a: Vec<u32> = oks.iter().copied().filter(|x| *x < 1000).collect();
    let from_b: Vec<u32> = oks
        .iter()
        .copied()
        .filter(|x| (1000..2000).contains(x))
        .collect();
    assert_eq!(from_a, (0..1000).collect::<Vec<_>>());
    assert_eq!(from_b, (1000..2000).collect::<Vec<_>>());
    // The other inputs' pipelines are linked: metrics and join cover them.
    assert_eq!(stage(&pipeline, "merge").received, 2002);
    assert!(pipeline.stage_metrics("map").is_some());
    pipeline.join().await.unwrap();
}

#[tokio::test]
async fn merge_of_nothing_is_empty() {
    assert!(
        streamz::merge(Vec::<streamz::Flow<u8>>::new())
            .collect()
            .await
            .is_empty()
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_of_a_merge_reaches_every_input() {
    let (tx_a, a) = streamz::channel::<u32>();
    let (tx_b, b) = streamz::channel::<u32>();
    let merged = a.merge_with(b);
    let pipeline = merged.pipeline().clone();
    let consumer = tokio::spawn(merged.collect());
    tx_a.send(1).await.unwrap();
    tx_b.send(2).await.unwrap();
    settle().await;
    pipeline.shutdown();
    let mut got = values(consumer.await.unwrap());
    got.sort();
    assert_eq!(got, [1, 2]);
    assert!(tx_a.is_closed() && tx_b.is_closed());
}

#[tokio::test]
async fn broadcast_sends_every_value_to_every_output_and_each_error_once() {
    let items = vec![Ok(1), Err(StreamError::failed("src", "e")), Ok(2)];
    let pipeline = Pipeline::new();
    let [a, b, c] = pipeline
        .try_stream(futures::stream::iter(items))
        .broadcast();
    let (a, b, c) = tokio::join!(a.collect(), b.collect(), c.collect());
    let (a_ok, a_err) = split(a);
    let (b_ok, b_err) = split(b);
    let (c_ok, c_err) = split(c);
    assert_eq!((a_ok, b_ok, c_ok), (vec![1, 2], vec![1, 2], vec![1, 2]));
    assert_eq!((a_err.len(), b_err.len(), c_err.len()), (1, 0, 0));
    // Counted per input item: each value once, however many copies.
    let m = stage(&pipeline, "broadcast");
    assert_eq!((m.received, m.emitted, m.errors_passed), (3, 2, 1));
}

#[tokio::test(start_paused = true)]
async fn the_slowest_output_paces_all() {
    let edge = EdgeConfig::new(4, 2);
    let pipeline = Pipeline::with_edge(edge);
    let (tx, flow) = pipeline.channel::<u32>();
    let [mut fast, _slow] = flow.broadcast();
    let producer = tokio::spawn(async move {
        let mut n = 0;
        while tx.send(n).await.is_ok() {
            n += 1;
        }
    });
    // The fast consumer reads what it can; the slow one never reads.
    let mut read = 0;
    loop {
        settle().await;
        match futures::FutureExt::now_or_never(fast.next()) {
            Some(Some(item)) => {
                item.unwrap();
                read += 1;
            }
            _ => break,
        }
    }
    // The fast output got at most what the slow output's edge can hold, plus
    // the chunk in flight and the push channel's share.
    assert!(
        read <= (edge.max_items_held() + edge.max_chunk()) as u32,
        "read {read}"
    );
    assert!(read >= edge.capacity() as u32);
    assert!(!producer.is_finished(), "the producer is held back");
    producer.abort();
}

#[tokio::test(start_paused = true)]
async fn a_dropped_output_does_not_stop_the_others_and_errors_move_on() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let [first, second] = flow.broadcast();
    drop(first);
    let consumer = tokio::spawn(second.collect());
    tx.send(1).await.unwrap();
    tx.send_result(Err(StreamError::failed("src", "e")))
        .await
        .unwrap();
    tx.send(2).await.unwrap();
    drop(tx);
    let (oks, errs) = split(consumer.await.unwrap());
    assert_eq!(oks, [1, 2]);
    assert_eq!(errs.len(), 1, "the error goes to the first open output");
}

#[tokio::test(start_paused = true)]
async fn an_output_that_goes_away_while_its_chunk_waits_hands_its_errors_on() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(1, 1));
    let items = vec![
        Ok(1),
        Err(StreamError::failed("src", "a")),
        Ok(2),
        Err(StreamError::failed("src", "b")),
        Ok(3),
    ];
    let [first, second] = pipeline
        .try_stream(futures::stream::iter(items))
        .broadcast();
    let consumer = tokio::spawn(second.collect());
    // Nobody reads `first`: its edge fills and the broadcast waits on it.
    settle().await;
    drop(first);
    let (oks, errs) = split(consumer.await.unwrap());
    let m = stage(&pipeline, "broadcast");
    assert_eq!(oks, [1, 2, 3], "copies reach the open output");
    assert_eq!(errs.len(), 2, "both errors moved on to the open output");
    assert_eq!((m.emitted, m.errors_passed, m.undelivered), (3, 2, 0));
    assert_eq!(
        m.received,
        m.emitted + m.errors_passed + m.aborted,
        "conservation: {m:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn when_every_output_is_dropped_the_upstream_stops() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let outputs = flow.map(|x| x + 1).broadcast_to(3);
    tx.send(1).await.unwrap();
    drop(outputs);
    settle().await;
    assert_eq!(pipeline.running_tasks(), 0);
    assert!(tx.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_stops_when_every_output_is_dropped_even_with_endless_input() {
    let pipeline = Pipeline::new();
    let [a, b] = pipeline.iter(0u64..).broadcast();
    drop(a);
    drop(b);
    // Guards against a hang only; the join returns as soon as the task ends.
    tokio::time::timeout(std::time::Duration::from_secs(60), pipeline.join())
        .await
        .expect("the broadcast task must stop")
        .unwrap();
}

#[tokio::test]
async fn links_that_form_a_cycle_or_a_diamond_are_walked_once() {
    let pa = Pipeline::new();
    let pb = Pipeline::new();
    let [a1, a2] = pa.iter(0..3u32).broadcast();
    let [b1, b2] = pb.iter(10..13u32).broadcast();
    let m1 = streamz::merge([a1, b1]); // links B to A
    let m2 = streamz::merge([b2, a2]); // links A to B: a cycle
    let (x, y) = tokio::join!(m1.collect(), m2.collect());
    assert_eq!((x.len(), y.len()), (6, 6));
    assert_eq!(pa.discarded(), 0);
    pa.join().await.unwrap();
    let mut names: Vec<String> = pa.metrics().into_iter().map(|m| m.name).collect();
    names.sort();
    // Each pipeline's stages once, under names made unique by the links.
    assert_eq!(
        names,
        [
            "broadcast",
            "broadcast#2",
            "iter",
            "iter#2",
            "merge",
            "merge#2"
        ]
    );
    assert_eq!(pb.metrics().len(), pa.metrics().len());
}

/// Reads a flow chunk by chunk: its items, and the largest chunk seen.
async fn chunks_of<T: Send + 'static>(mut flow: streamz::Flow<T>) -> (usize, usize) {
    let (mut n, mut largest) = (0, 0);
    while let Some(chunk) = flow.next_chunk().await {
        n += chunk.len();
        largest = largest.max(chunk.len());
    }
    (n, largest)
}

#[tokio::test]
async fn every_fan_in_and_fan_out_takes_a_name_and_an_edge() {
    use streamz::{Broadcast, Merge, Partition, Switch};
    let small = EdgeConfig::new(8, 3);
    // Input chunks of 64 (the pipeline's edge), outputs cut to 3.
    let pipeline = Pipeline::with_edge(EdgeConfig::new(256, 64));

    let outputs = pipeline
        .iter(0..100u32)
        .partition(Partition::round_robin(2).named("shards").with_edge(small));
    let parts = futures::future::join_all(outputs.into_iter().map(chunks_of)).await;
    assert_eq!(parts, [(50, 3), (50, 3)]);

    let mut routes = pipeline.iter(0..100u32).switch(
        Switch::new(|x: &u32| x % 2)
            .route(0)
            .otherwise()
            .named("parity")
            .with_edge(small),
    );
    let (even, rest) = (routes.take(&0).unwrap(), routes.take_default().unwrap());
    let (even, rest) = tokio::join!(chunks_of(even), chunks_of(rest));
    assert_eq!((even, rest), ((50, 3), (50, 3)));

    let copies = pipeline
        .iter(0..100u32)
        .broadcast_with(Broadcast::new(2).named("tee").with_edge(small));
    let copies = futures::future::join_all(copies.into_iter().map(chunks_of)).await;
    assert_eq!(copies, [(100, 3), (100, 3)]);

    let merged = Merge::new()
        .named("together")
        .with_edge(small)
        .merge([pipeline.iter(0..50u32), pipeline.iter(50..100u32)]);
    assert_eq!(chunks_of(merged).await, (100, 3));

    pipeline.join().await.unwrap();
    for name in ["shards", "parity", "tee", "together"] {
        let m = stage(&pipeline, name);
        assert_eq!(m.received, 100, "{name}: {m:?}");
        assert_eq!(m.emitted, 100, "{name}: {m:?}");
    }
}

#[tokio::test]
async fn stage_names_stay_unique_across_merged_pipelines() {
    let merged = streamz::merge([streamz::iter(0..3u32), streamz::iter(10..13u32)]);
    let pipeline = merged.pipeline().clone();
    assert_eq!(merged.collect().await.len(), 6);
    let mut names: Vec<String> = pipeline.metrics().into_iter().map(|m| m.name).collect();
    names.sort();
    assert_eq!(names, ["iter", "iter#2", "merge"]);
    assert_eq!(stage(&pipeline, "iter#2").emitted, 3);
}
