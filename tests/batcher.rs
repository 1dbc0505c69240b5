//! Batcher: size, latency from the first value, weight, flushing, errors,
//! abort, bad configuration. All on a paused clock.

mod support;

use std::time::Duration;

use futures::StreamExt;
use streamz::{Batcher, ConfigError, ErrorKind, Pipeline, StreamError};
use support::{assert_conserved, split, stage};
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn emits_full_batches_and_flushes_the_rest_at_the_end() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .iter(0..1001u32)
        .pipe(Batcher::new(100, Duration::from_secs(1)))
        .collect()
        .await;
    let (batches, errs) = split(out);
    assert!(errs.is_empty());
    assert_eq!(batches.len(), 11);
    assert!(batches[..10].iter().all(|b| b.len() == 100));
    assert_eq!(batches[10], [1000]);
    assert_eq!(batches.concat(), (0..1001).collect::<Vec<_>>());
    let m = stage(&pipeline, "batcher");
    assert_eq!((m.received, m.emitted), (1001, 1001));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn latency_counts_from_the_first_value_of_the_batch() {
    let (tx, flow) = streamz::channel::<u32>();
    let mut out = flow.pipe(Batcher::new(10, 10 * MS));
    let start = Instant::now();
    tx.send(1).await.unwrap();
    // A second value later does not restart the clock.
    assert!(
        tokio::time::timeout(6 * MS, out.next()).await.is_err(),
        "nothing before the deadline"
    );
    tx.send(2).await.unwrap();
    let batch = out.next().await.unwrap().unwrap();
    assert_eq!(batch, [1, 2]);
    assert_eq!(
        Instant::now() - start,
        10 * MS,
        "emitted exactly at the deadline, never early"
    );

    // The next batch gets its own deadline from its own first value.
    tokio::time::advance(25 * MS).await;
    let second = Instant::now();
    tx.send(3).await.unwrap();
    assert_eq!(out.next().await.unwrap().unwrap(), [3]);
    assert_eq!(Instant::now() - second, 10 * MS);
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_does_not_wait_for_the_deadline() {
    let (tx, flow) = streamz::channel::<u32>();
    let mut out = flow.pipe(Batcher::new(2, Duration::from_secs(60)));
    let start = Instant::now();
    tx.send(1).await.unwrap();
    tx.send(2).await.unwrap();
    assert_eq!(out.next().await.unwrap().unwrap(), [1, 2]);
    assert_eq!(Instant::now(), start);
}

#[tokio::test(start_paused = true)]
async fn errors_overtake_the_partial_batch() {
    let (tx, flow) = streamz::channel::<u32>();
    let mut out = flow.pipe(Batcher::new(10, 10 * MS));
    let start = Instant::now();
    tx.send(1).await.unwrap();
    tx.send_result(Err(StreamError::failed("src", "bad").with_item(9u32)))
        .await
        .unwrap();
    let mut err = out.next().await.unwrap().unwrap_err();
    assert_eq!(Instant::now(), start, "the error is not held back");
    assert_eq!(err.take_item::<u32>(), Some(9));
    assert_eq!(out.next().await.unwrap().unwrap(), [1]);
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_flushes_the_partial_batch() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let mut out = flow.pipe(Batcher::new(10, Duration::from_secs(3600)));
    tx.send(1).await.unwrap();
    tx.send(2).await.unwrap();
    let start = Instant::now();
    pipeline.shutdown();
    assert_eq!(out.next().await.unwrap().unwrap(), [1, 2]);
    assert!(out.next().await.is_none());
    assert_eq!(
        Instant::now(),
        start,
        "flushed at once, not at the deadline"
    );
    assert_eq!(tx.send(3).await.unwrap_err().0, 3);
}

#[tokio::test(start_paused = true)]
async fn abort_counts_the_partial_batch() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let mut out = flow.pipe(Batcher::new(10, Duration::from_secs(3600)));
    for i in 0..3 {
        tx.send(i).await.unwrap();
    }
    tokio::task::yield_now().await;
    pipeline.abort();
    assert!(out.next().await.is_none());
    pipeline.join().await.unwrap();
    let m = stage(&pipeline, "batcher");
    assert_eq!((m.received, m.emitted, m.aborted), (3, 0, 3));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn weight_closes_batches_and_a_panicking_weight_fails_its_value() {
    let batcher = Batcher::new(100, Duration::from_secs(1))
        .with_weight(10, |x: &u64| {
            assert!(*x != 99, "cannot weigh 99");
            *x
        })
        .named("by-weight");
    let pipeline = Pipeline::new();
    let out = pipeline
        .iter([3u64, 3, 4, 99, 12, 1])
        .pipe(batcher)
        .collect()
        .await;
    let mut rendered = Vec::new();
    for item in out {
        match item {
            Ok(batch) => rendered.push(format!("{batch:?}")),
            Err(mut e) => {
                assert_eq!(e.kind(), ErrorKind::Panicked);
                rendered.push(format!("panicked:{:?}", e.take_item::<u64>()));
            }
        }
    }
    assert_eq!(rendered, ["[3, 3, 4]", "panicked:Some(99)", "[12]", "[1]"]);
    let m = stage(&pipeline, "by-weight");
    assert_eq!((m.received, m.emitted, m.failed), (6, 5, 1));
    assert_conserved(&m);
}

#[tokio::test]
async fn zero_sizes_and_durations_are_refused_when_piped() {
    let field = |b: Batcher<u8>| -> &'static str {
        let e: ConfigError = support::refused(b);
        assert_eq!(
            (e.operator(), e.stage()),
            (Some("Batcher"), Some("batcher"))
        );
        e.field()
    };
    assert_eq!(field(Batcher::new(0, MS)), "max_size");
    assert_eq!(field(Batcher::new(1, Duration::ZERO)), "max_latency");
    assert_eq!(
        field(Batcher::new(1, MS).with_weight(0, |_| 1)),
        "max_weight"
    );
}

#[tokio::test(start_paused = true)]
async fn the_output_edge_holds_about_as_many_values_as_the_pipelines_edges() {
    // Edges of 100 items; batches of 10: the output edge holds 10 batches.
    let pipeline = streamz::Pipeline::with_edge(streamz::EdgeConfig::new(100, 100));
    let (tx, flow) = pipeline.channel::<u32>();
    let batcher = Batcher::new(10, Duration::from_secs(3600));
    let out = flow.pipe(batcher);
    // Nobody reads `out`: fill everything until the producer must wait.
    let mut accepted = 0u32;
    loop {
        match tx.try_send(accepted) {
            Ok(()) => accepted += 1,
            Err(streamz::TrySendError::Full(_)) => {
                support::settle().await;
                if tx.try_send(accepted).is_err() {
                    break;
                }
                accepted += 1;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    // The source's 100, what the batcher holds (a chunk of up to 100 and a
    // batch of 10), and 10 batches of 10 in its output edge: never the
    // 100 batches (1,000 values) an edge counting batches as items held.
    assert!(accepted <= 320, "{accepted} values buffered");
    assert!(accepted >= 200, "{accepted} values buffered");
    drop(out);
}

#[tokio::test(start_paused = true)]
async fn a_value_that_would_exceed_the_weight_closes_the_batch_first() {
    let out = streamz::iter([1u64, 2, 3, 9, 1])
        .pipe(Batcher::new(100, Duration::from_secs(1)).with_weight(5, |w: &u64| *w))
        .collect()
        .await;
    let (batches, _) = split(out);
    // 1+2 = 3; 3 more would make 6 > 5: [1, 2] closes first. 9 is heavier
    // than the limit on its own: a batch alone.
    assert_eq!(batches, [vec![1, 2], vec![3], vec![9], vec![1]]);
}

#[tokio::test(start_paused = true)]
async fn no_size_and_no_time_limit_batch_everything_until_the_end() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let out = tokio::spawn(flow.pipe(Batcher::new(usize::MAX, Duration::MAX)).collect());
    for i in 0..1000 {
        tx.send(i).await.unwrap();
    }
    // A century passes: Duration::MAX never fires, nothing panics.
    tokio::time::sleep(Duration::from_secs(86_400 * 365 * 100)).await;
    assert!(!out.is_finished());
    drop(tx);
    let (batches, _) = split(out.await.unwrap());
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].len(), 1000);
    assert!(batches[0].capacity() < 1 << 20, "no usize::MAX reservation");
}
