//! `ParMap`: a CPU-bound function on several threads, keeping every
//! guarantee of a stage: order (or not, on request), panics as error items
//! carrying their input, upstream errors in place, backpressure, shutdown,
//! abort, and the conservation law.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use streamz::{ErrorKind, ParMap, Pipeline};

/// About 20 µs of work on this machine: heavy enough that pieces go to
/// other threads.
fn digest(n: &u64) -> u64 {
    (0..20_000u64).fold(*n, |h, i| h.rotate_left(5) ^ i.wrapping_mul(0x9e37_79b9))
}

/// Runs `fut`, failing the test if it takes more than 60 s.
async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("the pipeline finishes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_work_keeps_its_order_and_uses_other_threads() {
    let threads = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let seen = threads.clone();
    let flow = streamz::iter(0..2_000u64).pipe(
        ParMap::new(move |n: &u64| {
            seen.lock().unwrap().insert(std::thread::current().id());
            digest(n)
        })
        .with_workers(4),
    );
    let pipeline = flow.pipeline().clone();
    let out = within(flow.collect()).await;
    let expected: Vec<u64> = (0..2_000u64).map(|n| digest(&n)).collect();
    assert_eq!(support::values(out), expected);
    assert!(threads.lock().unwrap().len() >= 2, "ran on one thread only");
    let m = support::stage(&pipeline, "par_map");
    assert_eq!((m.received, m.emitted), (2_000, 2_000));
    support::assert_conserved(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_gives_every_value_once() {
    let out = within(
        streamz::iter(0..3_000u64)
            .pipe(ParMap::new(digest).with_workers(3).unordered())
            .collect(),
    )
    .await;
    let mut got = support::values(out);
    let mut expected: Vec<u64> = (0..3_000u64).map(|n| digest(&n)).collect();
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_and_upstream_errors_keep_their_place_and_their_items() {
    let flow = streamz::iter(0..600u64)
        .try_map(|n: &u64| {
            if n % 100 == 50 {
                Err("upstream")
            } else {
                Ok(*n)
            }
        })
        .pipe(
            ParMap::new(|n: &u64| {
                assert!(n % 100 != 7, "boom on {n}");
                digest(n)
            })
            .with_workers(2),
        );
    let pipeline = flow.pipeline().clone();
    let out = within(flow.collect()).await;
    assert_eq!(out.len(), 600);
    for (n, item) in out.into_iter().enumerate() {
        let n = n as u64;
        match item {
            Ok(v) => assert_eq!(v, digest(&n)),
            Err(mut e) if n % 100 == 7 => {
                assert_eq!(e.kind(), ErrorKind::Panicked, "{e}");
                assert_eq!(e.take_item::<u64>(), Some(n), "the panic carries its item");
            }
            Err(e) => {
                assert_eq!(n % 100, 50, "{e}");
                assert_eq!(e.stage(), "try_map", "passed in place, unchanged");
            }
        }
    }
    let m = support::stage(&pipeline, "par_map");
    assert_eq!((m.failed, m.errors_passed, m.emitted), (6, 6, 588));
    support::assert_conserved(&m);
}

#[tokio::test]
async fn a_current_thread_runtime_works_too() {
    let out = within(
        streamz::iter(0..500u64)
            .pipe(ParMap::new(digest).with_workers(2))
            .collect(),
    )
    .await;
    let expected: Vec<u64> = (0..500u64).map(|n| digest(&n)).collect();
    assert_eq!(support::values(out), expected);
}

#[test]
fn zero_workers_are_refused() {
    let err = support::refused::<u64, u64, _>(ParMap::new(|n: &u64| *n).with_workers(0));
    assert_eq!(err.field(), "workers");
    assert_eq!(err.operator(), Some("ParMap"));
}

/// Backpressure: with nobody reading, the stage holds at most `workers`
/// pieces and the function runs on a bounded number of items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_work_back_and_an_abort_counts_what_was_held() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let pipeline = Pipeline::with_edge(streamz::EdgeConfig::new(64, 16));
    let flow = pipeline.iter(0..100_000u64).pipe(
        ParMap::new(move |n: &u64| {
            counted.fetch_add(1, Ordering::Relaxed);
            digest(n)
        })
        .with_workers(2),
    );
    // Read a little, then stop reading: the work must stop too.
    let mut flow = flow;
    let first = within(flow.next_chunk()).await.expect("a chunk");
    assert!(!first.is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let settled = loop {
        let before = calls.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = calls.load(Ordering::Relaxed);
        if before == after {
            break after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the work never stopped"
        );
    };
    // The output edge (64), the pieces in hand (2 of at most 16), the
    // chunk read: far from the 100,000 of the input.
    assert!(settled < 1_000, "{settled} calls with nobody reading");
    pipeline.abort();
    drop(flow);
    within(pipeline.join()).await.unwrap();
    let m = support::stage(&pipeline, "par_map");
    assert!(m.aborted + m.undelivered > 0, "{m:?}");
    support::assert_conserved(&m);
}

/// A shutdown lets the pieces in hand finish: nothing taken is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_finishes_the_pieces_in_hand() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u64>();
    let reader = tokio::spawn(flow.pipe(ParMap::new(digest).with_workers(2)).collect());
    for n in 0..300 {
        tx.send(n).await.unwrap();
    }
    pipeline.shutdown();
    let out = within(reader).await.unwrap();
    within(pipeline.join()).await.unwrap();
    let m = support::stage(&pipeline, "par_map");
    assert_eq!(m.aborted, 0, "{m:?}");
    assert_eq!(out.len() as u64, m.emitted);
    assert_eq!(m.received, m.emitted);
    let expected: Vec<u64> = (0..m.emitted).map(|n| digest(&n)).collect();
    assert_eq!(support::values(out), expected);
}

/// A worker count far above the cores is only a limit: pieces queue on
/// the pool. Above 1,024 it is refused: each worker may hold a piece, so
/// the bound keeps what is in hand bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_workers_are_only_a_limit_and_too_many_are_refused() {
    let out = within(
        streamz::iter(0..300u64)
            .pipe(ParMap::new(digest).with_workers(1024))
            .collect(),
    )
    .await;
    let expected: Vec<u64> = (0..300u64).map(|n| digest(&n)).collect();
    assert_eq!(support::values(out), expected);
    let err = support::refused::<u64, u64, _>(ParMap::new(digest).with_workers(usize::MAX));
    assert_eq!(err.field(), "workers");
}

/// The first chunk is measured one call at a time: slow calls go to the
/// workers from the second call on, and run side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_leave_the_stage_task_after_the_first() {
    let threads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = threads.clone();
    let out = within(
        streamz::iter(0..6u64)
            .pipe(
                ParMap::new(move |n: &u64| {
                    seen.lock()
                        .unwrap()
                        .push(std::thread::current().name().map(str::to_owned));
                    std::thread::sleep(Duration::from_millis(100));
                    *n
                })
                .with_workers(2),
            )
            .collect(),
    )
    .await;
    assert_eq!(support::values(out), (0..6).collect::<Vec<u64>>());
    let threads = threads.lock().unwrap();
    let in_task = threads
        .iter()
        .filter(|name| name.as_deref().is_some_and(|n| n.starts_with("tokio")))
        .count();
    assert_eq!(
        in_task, 1,
        "only the measuring call runs in the stage's task: {threads:?}"
    );
}
