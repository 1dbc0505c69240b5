//! The Go catalogue's small operators: Skip, Take, Sample, Unbatch,
//! Dedupe, Buffer. Each: what it keeps, that errors are never lost, that
//! every drop is counted, and that bad configuration is refused by name.

mod support;

use std::time::Duration;

use streamz::{
    Batcher, Buffer, ConfigError, Dedupe, ErrorKind, Pipeline, Sample, Skip, Stage, StreamError,
    Take, Unbatch,
};
use support::{assert_conserved, split, stage, values};

/// `0..n` with an error in place of every multiple of `every`.
fn with_errors(n: u32, every: u32) -> Vec<streamz::Result<u32>> {
    (0..n)
        .map(|i| {
            if i % every == every - 1 {
                Err(StreamError::new(ErrorKind::Failed, "upstream"))
            } else {
                Ok(i)
            }
        })
        .collect()
}

#[tokio::test]
async fn skip_drops_the_first_values_and_passes_every_error_in_place() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .try_stream(futures::stream::iter(with_errors(10, 3)))
        .pipe(Stage::new("skip", Skip::new(4).unwrap()))
        .collect()
        .await;
    // 0 1 E 3 4 E 6 7 E 9: values 0 1 3 4 skipped, errors kept in order.
    let shape: Vec<Option<u32>> = out.iter().map(|r| r.as_ref().ok().copied()).collect();
    assert_eq!(shape, [None, None, Some(6), Some(7), None, Some(9)]);
    let m = stage(&pipeline, "skip");
    assert_eq!(
        (m.received, m.emitted, m.dropped, m.errors_passed),
        (10, 3, 4, 3)
    );
    assert_conserved(&m);
    assert_eq!(Skip::new(0).unwrap_err(), ConfigError::Zero { field: "n" });
}

#[tokio::test]
async fn take_ends_an_endless_stream_and_stops_its_input_counting_the_rest() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .stream(futures::stream::iter(0u64..))
        .map(|x: &u64| x * 2)
        .pipe(Take::new(1000).unwrap())
        .collect()
        .await;
    assert_eq!(values(out), (0..1000).map(|x| x * 2).collect::<Vec<_>>());
    pipeline.join().await.unwrap();
    let m = stage(&pipeline, "take");
    assert_eq!(m.emitted, 1000);
    assert_conserved(&m);
    // The stages before it stopped: what they had produced and could not
    // deliver is counted, not lost.
    let before: u64 = pipeline
        .metrics()
        .iter()
        .filter(|m| m.name != "take")
        .map(|m| m.undelivered)
        .sum();
    assert_eq!(m.received, m.emitted + m.dropped + m.aborted);
    assert!(
        m.dropped + m.aborted + before > 0,
        "{:?}",
        pipeline.metrics()
    );
    assert_eq!(Take::new(0).unwrap_err(), ConfigError::Zero { field: "n" });
}

#[tokio::test]
async fn take_passes_the_errors_before_its_last_value_and_a_short_input_just_ends() {
    let out = streamz::Pipeline::new()
        .try_stream(futures::stream::iter(with_errors(10, 3)))
        .pipe(Take::new(3).unwrap())
        .collect()
        .await;
    let shape: Vec<Option<u32>> = out.iter().map(|r| r.as_ref().ok().copied()).collect();
    assert_eq!(shape, [Some(0), Some(1), None, Some(3)]);

    let pipeline = Pipeline::new();
    let out = pipeline
        .iter(0..5)
        .pipe(Take::new(10).unwrap())
        .collect()
        .await;
    assert_eq!(values(out), [0, 1, 2, 3, 4]);
    let m = stage(&pipeline, "take");
    assert_eq!((m.received, m.emitted, m.dropped, m.aborted), (5, 5, 0, 0));
}

#[tokio::test]
async fn sample_is_repeatable_with_a_seed_counts_its_drops_and_passes_errors() {
    let run = |p: f64, seed: u64| async move {
        let pipeline = Pipeline::new();
        let out = pipeline
            .try_stream(futures::stream::iter(with_errors(10_000, 100)))
            .pipe(Stage::new(
                "sample",
                Sample::new(p).unwrap().with_seed(seed),
            ))
            .collect()
            .await;
        (split(out), stage(&pipeline, "sample"))
    };
    let ((kept, errors), m) = run(0.25, 1).await;
    assert_eq!(errors.len(), 100, "every error passes");
    assert!((2200..2750).contains(&kept.len()), "{}", kept.len());
    assert_eq!(m.dropped, 9_900 - kept.len() as u64);
    assert_conserved(&m);
    let ((again, _), _) = run(0.25, 1).await;
    assert_eq!(kept, again, "the same seed keeps the same values");
    let ((other, _), _) = run(0.25, 2).await;
    assert_ne!(kept, other);

    let ((none, errors), _) = run(0.0, 3).await;
    assert!(none.is_empty());
    assert_eq!(errors.len(), 100);
    let ((all, _), _) = run(1.0, 3).await;
    assert_eq!(all.len(), 9_900);

    for p in [-0.1, 1.1, f64::NAN, f64::INFINITY] {
        let err = Sample::new(p).unwrap_err();
        assert_eq!(err.to_string(), "`p` must be a probability from 0 to 1");
    }
}

#[tokio::test]
async fn unbatch_undoes_a_batcher_keeping_order_and_errors_in_place() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .try_stream(futures::stream::iter(with_errors(1000, 7)))
        .pipe(Batcher::try_new(10, Duration::from_secs(1)).unwrap())
        .pipe(Stage::new("unbatch", Unbatch::new()))
        .collect()
        .await;
    let shape: Vec<Option<u32>> = out.iter().map(|r| r.as_ref().ok().copied()).collect();
    let (vals, errs) = split(out);
    let expected: Vec<u32> = (0..1000).filter(|i| i % 7 != 6).collect();
    assert_eq!(vals, expected);
    assert_eq!(errs.len(), 142);
    // Each error comes after the values that were before it upstream (the
    // batcher sends an error ahead of its partial batch; no value moves
    // past an error that came after it).
    let first_error = shape.iter().position(Option::is_none).unwrap();
    assert!(shape[..first_error].iter().all(|v| v.unwrap() < 6));
    let m = stage(&pipeline, "unbatch");
    assert_eq!(m.received, m.emitted + m.errors_passed);

    let out = streamz::iter([vec![], vec![1], vec![], vec![2, 3]])
        .step("unbatch", Unbatch::new())
        .collect()
        .await;
    assert_eq!(values(out), [1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn dedupe_forgets_keys_after_their_ttl_and_beyond_its_capacity() {
    let dedupe = Dedupe::new(|s: &String| s.clone(), 3, Duration::from_secs(10)).unwrap();
    let pipeline = Pipeline::new();
    let (pusher, flow) = pipeline.channel::<String>();
    let collected = tokio::spawn(flow.step("dedupe", dedupe).collect());
    let send = |s: &str| {
        let pusher = &pusher;
        let s = s.to_owned();
        async move { pusher.send(s).await.unwrap() }
    };
    send("a").await;
    send("a").await; // a duplicate within the ttl
    tokio::time::advance(Duration::from_secs(5)).await;
    send("b").await;
    send("c").await;
    send("d").await; // capacity 3: "a" is pushed out
    send("a").await; // forgotten, so it passes
    send("d").await; // a duplicate
    tokio::time::advance(Duration::from_secs(11)).await;
    send("b").await; // its ttl passed
    drop(pusher);
    let out = values(collected.await.unwrap());
    assert_eq!(out, ["a", "b", "c", "d", "a", "b"]);
    let m = stage(&pipeline, "dedupe");
    assert_eq!((m.received, m.emitted, m.dropped), (8, 6, 2));
    assert_conserved(&m);
}

#[tokio::test]
async fn dedupe_turns_a_panicking_key_into_an_error_item_and_refuses_zeros() {
    let pipeline = Pipeline::new();
    let dedupe = Dedupe::new(
        |x: &u32| {
            assert!(*x != 3, "no key for 3");
            *x % 5
        },
        100,
        Duration::from_secs(60),
    )
    .unwrap();
    let out = pipeline
        .iter(0..10u32)
        .pipe(Stage::new("dedupe", dedupe))
        .collect()
        .await;
    let (vals, mut errs) = split(out);
    // Keys 0 1 2 (3 panics: no key remembered) 4, then 0 1 2 again
    // dropped, 8 has key 3, which was never remembered, 9 has key 4.
    assert_eq!(vals, [0, 1, 2, 4, 8]);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].kind(), ErrorKind::Panicked);
    assert_eq!(errs[0].take_item::<u32>(), Some(3));
    let m = stage(&pipeline, "dedupe");
    assert_eq!(m.dropped, 4);
    assert_conserved(&m);

    let key = |x: &u32| *x;
    assert_eq!(
        Dedupe::new(key, 0, Duration::from_secs(1)).unwrap_err(),
        ConfigError::Zero { field: "capacity" }
    );
    assert_eq!(
        Dedupe::new(key, 1, Duration::ZERO).unwrap_err(),
        ConfigError::Zero { field: "ttl" }
    );
}

#[tokio::test(start_paused = true)]
async fn a_buffer_takes_a_burst_the_pipeline_edges_alone_would_not() {
    // Nobody reads: the producer fills what the edges hold, no more.
    let room = |buffer: Option<usize>| async move {
        let pipeline = Pipeline::new();
        let (pusher, flow) = pipeline.channel::<u32>();
        let flow = match buffer {
            Some(n) => flow.pipe(Buffer::new(n).unwrap()),
            None => flow.async_boundary("relay"),
        };
        let mut accepted = 0;
        loop {
            let before = accepted;
            while pusher.try_send(accepted).is_ok() {
                accepted += 1;
            }
            // Let the stage tasks move what they can.
            support::settle().await;
            if accepted == before {
                break;
            }
        }
        drop(flow);
        accepted
    };
    let plain = room(None).await;
    let buffered = room(Some(20_000)).await;
    // The buffer's edge replaces the relay's (1,024): the rest of its
    // 20,000 is extra room, less at most one chunk of rounding.
    assert!(
        buffered - plain >= 20_000 - 1024 - 256,
        "{plain} vs {buffered}"
    );
    assert!(buffered - plain <= 20_000, "{plain} vs {buffered}");
    assert_eq!(
        Buffer::new(0).unwrap_err(),
        ConfigError::Zero { field: "capacity" }
    );
}
