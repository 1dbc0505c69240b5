//! AsyncMapper: ordering, the reorder bound, timeouts measured on execution
//! (and the `buffered` flaw they avoid), retries with backoff and deadline,
//! upstream errors, panics, conservation, shutdown and abort. All on a
//! paused clock.

mod support;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use futures::StreamExt;
use streamz::{
    AsyncMapper, ConfigError, EdgeConfig, ErrorKind, Jitter, PanicError, Pipeline, Retry,
    StreamError, TimeoutError,
};
use support::{assert_conserved, settle, split, stage, values};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep};

const MS: Duration = Duration::from_millis(1);

fn boom(msg: &str) -> io::Error {
    io::Error::other(msg.to_owned())
}

/// Fixed delays, no jitter: retry `n` waits `100ms × 2^(n-1)`.
fn fixed_retry(attempts: u32) -> Retry {
    Retry::attempts(attempts)
        .with_backoff(100 * MS, Duration::from_secs(10))
        .with_jitter(Jitter::None)
}

#[tokio::test(start_paused = true)]
async fn ordered_mode_keeps_input_order_whatever_the_finishing_order() {
    let pipeline = Pipeline::new();
    // Item i takes (10 - i) ms: later items finish first.
    let mapper = AsyncMapper::new(|i: &u64| {
        let i = *i;
        async move {
            sleep(MS * (10 - i) as u32).await;
            Ok::<_, io::Error>(i * 10)
        }
    })
    .with_concurrency(4);
    let out = pipeline.iter(0..10u64).pipe(mapper).collect().await;
    assert_eq!(values(out), (0..10).map(|i| i * 10).collect::<Vec<_>>());
    let m = stage(&pipeline, "async_mapper");
    assert_eq!((m.received, m.emitted, m.failed), (10, 10, 0));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn unordered_mode_emits_in_finishing_order() {
    let mapper = AsyncMapper::new(|i: &u64| {
        let i = *i;
        async move {
            sleep(MS * (4 - i) as u32).await;
            Ok::<_, io::Error>(i)
        }
    })
    .with_concurrency(4)
    .unordered();
    let out = streamz::iter(0..4u64).pipe(mapper).collect().await;
    assert_eq!(values(out), [3, 2, 1, 0]);
}

#[tokio::test(start_paused = true)]
async fn concurrency_bounds_how_many_run_at_once() {
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let mapper = AsyncMapper::new(move |i: &u32| {
        let (r, p, i) = (r.clone(), p.clone(), *i);
        async move {
            let now = r.fetch_add(1, SeqCst) + 1;
            p.fetch_max(now, SeqCst);
            sleep(MS * (1 + i % 3)).await;
            r.fetch_sub(1, SeqCst);
            Ok::<_, io::Error>(i)
        }
    })
    .with_concurrency(3);
    let start = Instant::now();
    let out = streamz::iter(0..30u32).pipe(mapper).collect().await;
    assert_eq!(values(out), (0..30).collect::<Vec<_>>());
    assert_eq!(peak.load(SeqCst), 3);
    // 30 items of 1, 2 and 3 ms take 60 ms in a row; three at a time, in
    // order, each group of three waits for its slowest: 10 × 3 ms.
    assert_eq!(Instant::now() - start, 30 * MS);
}

#[tokio::test(start_paused = true)]
async fn a_slow_head_item_keeps_the_reorder_window_within_the_concurrency() {
    const C: usize = 8;
    let edge = EdgeConfig::new(64, 16);
    let pipeline = Pipeline::with_edge(edge);
    let release = Arc::new(Notify::new());
    let started = Arc::new(AtomicU64::new(0));
    let (gate, count) = (release.clone(), started.clone());
    let mapper = AsyncMapper::new(move |i: &u64| {
        let (gate, i) = (gate.clone(), *i);
        count.fetch_add(1, SeqCst);
        async move {
            if i == 0 {
                gate.notified().await;
            }
            Ok::<_, io::Error>(i)
        }
    })
    .with_concurrency(C);
    let mut out = pipeline.iter(0..100_001u64).pipe(mapper);
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(item) = out.next().await {
            assert_eq!(item.unwrap(), n, "order kept");
            n += 1;
        }
        n
    });

    settle().await;
    // The head is stuck: only the slots hold items, nothing has left.
    assert_eq!(started.load(SeqCst), C as u64, "at most C items started");
    let m = stage(&pipeline, "async_mapper");
    assert_eq!(m.emitted, 0);
    assert!(
        m.received <= (C + edge.max_chunk()) as u64,
        "the mapper took in only its slots and one input chunk: {m:?}"
    );
    let source = stage(&pipeline, "iter");
    assert!(
        source.emitted <= m.received + edge.max_items_held() as u64,
        "the source was held back by the full edge: {source:?}"
    );

    release.notify_one();
    assert_eq!(reader.await.unwrap(), 100_001);
    let m = stage(&pipeline, "async_mapper");
    assert_eq!(m.emitted, 100_001);
    assert_conserved(&m);
}

/// A call with two steps: it must be polled between them to finish in time.
async fn two_steps(i: u32) -> Result<u32, io::Error> {
    sleep(30 * MS).await;
    sleep(30 * MS).await;
    Ok(i)
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_never_makes_an_item_time_out() {
    let edge = EdgeConfig::new(1, 1);
    let pipeline = Pipeline::with_edge(edge);
    let mapper = AsyncMapper::new(|i: &u32| two_steps(*i))
        .with_concurrency(4)
        .with_timeout(100 * MS);
    let mut out = pipeline.iter(0..20u32).pipe(mapper);
    let mut got = Vec::new();
    while let Some(item) = out.next().await {
        got.push(item.expect("no item times out"));
        sleep(Duration::from_secs(1)).await; // the consumer is slow
    }
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    assert_eq!(stage(&pipeline, "async_mapper").timeouts, 0);
}

/// The same work through `futures::StreamExt::buffered`: its futures are
/// polled only while the consumer polls, so a slow consumer makes items
/// time out (rust-lang/futures-rs#2387). This is the flaw the test above
/// proves AsyncMapper does not have.
#[tokio::test(start_paused = true)]
async fn buffered_from_futures_times_out_under_the_same_slow_consumer() {
    let mut out = futures::stream::iter(0..20u32)
        .map(|i| tokio::time::timeout(100 * MS, two_steps(i)))
        .buffered(4);
    let mut timeouts = 0;
    while let Some(item) = out.next().await {
        timeouts += usize::from(item.is_err());
        sleep(Duration::from_secs(1)).await;
    }
    assert!(timeouts > 0, "buffered would not show the flaw");
}

#[tokio::test(start_paused = true)]
async fn the_timeout_cancels_a_slow_attempt_and_fails_the_item_with_it() {
    let pipeline = Pipeline::new();
    let mapper = AsyncMapper::new(|i: &u32| {
        let i = *i;
        async move {
            if i == 1 {
                sleep(Duration::from_secs(60)).await;
            }
            Ok::<_, io::Error>(i)
        }
    })
    .with_timeout(50 * MS);
    let start = Instant::now();
    let (oks, mut errs) = split(pipeline.iter(0..3u32).pipe(mapper).collect().await);
    assert_eq!(Instant::now() - start, 50 * MS, "cut off at the timeout");
    assert_eq!(oks, [0, 2]);
    let mut err = errs.pop().unwrap();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert_eq!(err.attempts(), 1);
    assert!(
        err.cause()
            .and_then(|c| c.downcast_ref::<TimeoutError>())
            .is_some_and(|t| *t == TimeoutError::Attempt { limit: 50 * MS })
    );
    assert_eq!(err.take_item::<u32>(), Some(1));
    let m = stage(&pipeline, "async_mapper");
    assert_eq!((m.failed, m.timeouts, m.retries), (1, 1, 0));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_exponentially_and_then_succeed() {
    let pipeline = Pipeline::new();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let mapper = AsyncMapper::new(move |s: &String| {
        let (n, s) = (seen.fetch_add(1, SeqCst), s.clone());
        async move {
            match n {
                0 | 1 => Err(boom("busy")),
                _ => Ok(s.len()),
            }
        }
    })
    .with_retry(fixed_retry(5));
    let start = Instant::now();
    let out = pipeline
        .iter([String::from("abc")])
        .pipe(mapper)
        .collect()
        .await;
    assert_eq!(values(out), [3]);
    // Two retries: 100 ms, then 200 ms.
    assert_eq!(Instant::now() - start, 300 * MS);
    assert_eq!(calls.load(SeqCst), 3);
    let m = stage(&pipeline, "async_mapper");
    assert_eq!((m.emitted, m.failed, m.retries), (1, 0, 2));
}

#[tokio::test(start_paused = true)]
async fn the_final_error_carries_the_item_the_attempts_and_the_last_error() {
    let pipeline = Pipeline::new();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let mapper = AsyncMapper::new(move |_: &String| {
        let n = seen.fetch_add(1, SeqCst);
        async move { Err::<u8, _>(boom(&format!("attempt {n} failed"))) }
    })
    .with_retry(fixed_retry(3));
    let (oks, mut errs) = split(
        pipeline
            .iter([String::from("order-7")])
            .pipe(mapper)
            .collect()
            .await,
    );
    assert!(oks.is_empty());
    let mut err = errs.pop().unwrap();
    assert_eq!(err.kind(), ErrorKind::Failed);
    assert_eq!(err.stage(), "async_mapper");
    assert_eq!(err.attempts(), 3);
    assert_eq!(err.cause().unwrap().to_string(), "attempt 2 failed");
    assert_eq!(err.take_item::<String>().as_deref(), Some("order-7"));
    let m = stage(&pipeline, "async_mapper");
    assert_eq!((m.failed, m.retries), (1, 2));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn the_predicate_decides_which_errors_are_retried() {
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let mapper = AsyncMapper::new(move |i: &u32| {
        seen.fetch_add(1, SeqCst);
        let i = *i;
        async move {
            let kind = if i == 0 {
                io::ErrorKind::InvalidInput
            } else {
                io::ErrorKind::TimedOut
            };
            Err::<u32, _>(io::Error::from(kind))
        }
    })
    .with_concurrency(1)
    .with_retry(fixed_retry(4))
    .retry_if(|e: &io::Error| e.kind() != io::ErrorKind::InvalidInput);
    let (_, errs) = split(streamz::iter(0..2u32).pipe(mapper).collect().await);
    let attempts: Vec<u32> = errs.iter().map(StreamError::attempts).collect();
    assert_eq!(
        attempts,
        [1, 4],
        "bad input is not retried; the transient error is"
    );
    assert_eq!(calls.load(SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_attempt_is_retried_and_counted() {
    let pipeline = Pipeline::new();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let mapper = AsyncMapper::new(move |i: &u32| {
        let (n, i) = (seen.fetch_add(1, SeqCst), *i);
        async move {
            if n == 0 {
                sleep(Duration::from_secs(10)).await;
            }
            Ok::<_, io::Error>(i)
        }
    })
    .with_timeout(50 * MS)
    .with_retry(fixed_retry(3));
    let start = Instant::now();
    assert_eq!(
        values(pipeline.iter([9u32]).pipe(mapper).collect().await),
        [9]
    );
    assert_eq!(Instant::now() - start, 150 * MS, "timeout, then backoff");
    let m = stage(&pipeline, "async_mapper");
    assert_eq!((m.timeouts, m.retries, m.emitted), (1, 1, 1));

    // With timeouts not retried, the first one is final.
    let mapper = AsyncMapper::new(|_: &u32| async {
        sleep(Duration::from_secs(10)).await;
        Ok::<u32, io::Error>(0)
    })
    .with_timeout(50 * MS)
    .with_retry(fixed_retry(3).with_timeouts_retried(false));
    let (_, errs) = split(streamz::iter([1u32]).pipe(mapper).collect().await);
    assert_eq!(errs[0].kind(), ErrorKind::TimedOut);
    assert_eq!(errs[0].attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_stops_retrying_when_the_next_attempt_could_not_start_in_time() {
    let retry = Retry::attempts(10)
        .with_backoff(Duration::from_secs(1), Duration::from_secs(1))
        .with_jitter(Jitter::None)
        .with_deadline(2500 * MS);
    let mapper =
        AsyncMapper::new(|_: &u32| async { Err::<u32, _>(boom("down")) }).with_retry(retry);
    let start = Instant::now();
    let (_, errs) = split(streamz::iter([1u32]).pipe(mapper).collect().await);
    // Attempts at 0 s, 1 s and 2 s; a fourth at 3 s would be past 2.5 s.
    assert_eq!(errs[0].attempts(), 3);
    assert_eq!(errs[0].kind(), ErrorKind::Failed);
    assert_eq!(Instant::now() - start, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn the_deadline_cuts_off_a_running_attempt() {
    let retry = fixed_retry(5).with_deadline(2 * MS * 1000);
    let mapper = AsyncMapper::new(|_: &u32| async {
        sleep(Duration::from_secs(60)).await;
        Ok::<u32, io::Error>(0)
    })
    .with_timeout(Duration::from_secs(30))
    .with_retry(retry);
    let start = Instant::now();
    let (_, errs) = split(streamz::iter([1u32]).pipe(mapper).collect().await);
    assert_eq!(Instant::now() - start, Duration::from_secs(2));
    let err = &errs[0];
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert_eq!(err.attempts(), 1);
    let cause = err.cause().unwrap().downcast_ref::<TimeoutError>();
    assert_eq!(
        cause,
        Some(&TimeoutError::Deadline {
            limit: Duration::from_secs(2)
        })
    );
}

#[tokio::test(start_paused = true)]
async fn seeded_jitter_repeats_and_stays_below_the_exponential_delay() {
    async fn finish_time(seed: u64) -> Duration {
        let calls = Arc::new(AtomicU32::new(0));
        let retry = Retry::attempts(4)
            .with_backoff(Duration::from_secs(1), Duration::from_secs(60))
            .with_jitter(Jitter::Full)
            .with_seed(seed);
        let mapper = AsyncMapper::new(move |_: &u32| {
            let n = calls.fetch_add(1, SeqCst);
            async move { if n < 3 { Err(boom("again")) } else { Ok(n) } }
        })
        .with_retry(retry);
        let start = Instant::now();
        assert_eq!(
            values(streamz::iter([0u32]).pipe(mapper).collect().await),
            [3]
        );
        Instant::now() - start
    }
    let a = finish_time(42).await;
    assert_eq!(a, finish_time(42).await, "same seed, same delays");
    // Full jitter: each of the three delays is at most 1 s, 2 s, 4 s.
    assert!(a <= Duration::from_secs(7), "{a:?}");
    let others = [
        finish_time(1).await,
        finish_time(2).await,
        finish_time(3).await,
    ];
    assert!(
        others.iter().any(|t| *t != a),
        "different seeds, different delays"
    );
}

#[tokio::test(start_paused = true)]
async fn upstream_errors_keep_their_position_in_ordered_mode() {
    let pipeline = Pipeline::new();
    let input = futures::stream::iter(vec![
        Ok(1u64),
        Err(StreamError::failed("reader", "bad frame")),
        Ok(2),
    ]);
    let mapper = AsyncMapper::new(|i: &u64| {
        let i = *i;
        async move {
            sleep(MS * (3 - i) as u32).await; // the first value is the slowest
            Ok::<_, io::Error>(i)
        }
    })
    .with_concurrency(4);
    let out = pipeline.try_stream(input).pipe(mapper).collect().await;
    let shape: Vec<String> = out
        .iter()
        .map(|r| match r {
            Ok(v) => v.to_string(),
            Err(e) => e.stage().to_owned(),
        })
        .collect();
    assert_eq!(shape, ["1", "reader", "2"]);
    let m = stage(&pipeline, "async_mapper");
    assert_eq!((m.received, m.emitted, m.errors_passed), (3, 2, 1));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn panics_in_the_function_or_its_future_fail_only_their_item() {
    let pipeline = Pipeline::new();
    let mapper = AsyncMapper::new(|s: &String| {
        if s == "sync" {
            panic!("panicked before the future");
        }
        let s = s.clone();
        async move {
            sleep(MS).await;
            if s == "async" {
                panic!("panicked inside the future");
            }
            Ok::<_, io::Error>(s.len())
        }
    })
    .with_retry(fixed_retry(3));
    let input = ["a", "sync", "bb", "async", "ccc"].map(String::from);
    let out = pipeline.iter(input).pipe(mapper).collect().await;
    let mut shape = Vec::new();
    for item in out {
        match item {
            Ok(n) => shape.push(n.to_string()),
            Err(mut e) => {
                assert_eq!(e.kind(), ErrorKind::Panicked);
                assert_eq!(e.attempts(), 1, "a panic is not retried");
                let msg = e.cause().unwrap().downcast_ref::<PanicError>().unwrap();
                assert!(msg.message().starts_with("panicked"));
                shape.push(e.take_item::<String>().unwrap());
            }
        }
    }
    assert_eq!(shape, ["1", "sync", "2", "async", "3"]);
    let m = stage(&pipeline, "async_mapper");
    assert_eq!((m.emitted, m.failed, m.retries), (3, 2, 0));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_finishes_the_items_in_flight() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let mapper = AsyncMapper::new(|i: &u32| {
        let i = *i;
        async move {
            sleep(Duration::from_secs(1)).await;
            Ok::<_, io::Error>(i)
        }
    })
    .with_concurrency(4);
    let reader = tokio::spawn(flow.pipe(mapper).collect());
    for i in 0..3 {
        tx.send(i).await.unwrap();
    }
    settle().await;
    sleep(Duration::from_secs(3600) - 10 * MS).await;
    pipeline.shutdown();
    let out = reader.await.unwrap();
    assert_eq!(values(out), [0, 1, 2]);
    let m = stage(&pipeline, "async_mapper");
    assert_eq!((m.received, m.emitted, m.aborted), (3, 3, 0));
}

#[tokio::test(start_paused = true)]
async fn abort_counts_the_items_in_flight_and_keeps_the_law() {
    let pipeline = Pipeline::new();
    let mapper = AsyncMapper::new(|i: &u32| {
        let i = *i;
        async move {
            if i % 2 == 1 {
                sleep(Duration::from_secs(60)).await;
            }
            Ok::<_, io::Error>(i)
        }
    })
    .with_concurrency(4)
    .unordered();
    let mut out = pipeline.iter(0..1000u32).pipe(mapper);
    let first = out.next().await.unwrap().unwrap();
    assert_eq!(first % 2, 0);
    settle().await;
    pipeline.abort();
    pipeline.join().await.unwrap();
    let rest = out.collect().await;
    let m = stage(&pipeline, "async_mapper");
    assert!(
        m.aborted > 0,
        "the slow items in flight were counted: {m:?}"
    );
    assert_conserved(&m);
    let produced = stage(&pipeline, "iter").emitted;
    let seen = 1 + rest.len() as u64;
    assert_eq!(
        produced,
        seen + support::stopped_early(&pipeline) + pipeline.discarded(),
        "every item produced is delivered or counted"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_output_stops_the_mapper_and_counts_what_it_held() {
    let pipeline = Pipeline::new();
    let mapper = AsyncMapper::new(|i: &u32| {
        let i = *i;
        async move {
            sleep(MS).await;
            Ok::<_, io::Error>(i)
        }
    })
    .with_concurrency(4);
    let mut out = pipeline.iter(0..10_000u32).pipe(mapper);
    assert_eq!(out.next().await.unwrap().unwrap(), 0);
    drop(out);
    pipeline.join().await.unwrap();
    assert_eq!(pipeline.running_tasks(), 0);
    let m = stage(&pipeline, "async_mapper");
    assert_conserved(&m);
    let produced = stage(&pipeline, "iter").emitted;
    assert_eq!(
        produced,
        1 + support::stopped_early(&pipeline) + pipeline.discarded()
    );
}

#[tokio::test(start_paused = true)]
async fn conservation_holds_under_errors_panics_and_a_slow_consumer() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(4, 2));
    let input = (0..500u32).map(|i| {
        if i % 37 == 0 {
            Err(StreamError::failed("reader", "bad"))
        } else {
            Ok(i)
        }
    });
    let mapper = AsyncMapper::new(|i: &u32| {
        let i = *i;
        async move {
            sleep(MS * (i % 5)).await;
            match i % 11 {
                0 => panic!("eleven"),
                1 => Err(boom("one")),
                _ => Ok(i),
            }
        }
    })
    .with_concurrency(3)
    .with_retry(fixed_retry(2));
    let mut out = pipeline
        .try_stream(futures::stream::iter(input))
        .pipe(mapper);
    let mut n = 0;
    while let Some(_item) = out.next().await {
        n += 1;
        sleep(5 * MS).await; // slow consumer
    }
    assert_eq!(n, 500, "one output per input");
    let m = stage(&pipeline, "async_mapper");
    assert_eq!(m.received, 500);
    assert_eq!(m.errors_passed, 14); // multiples of 37 below 500
    assert_conserved(&m);
}

#[tokio::test]
async fn bad_configuration_is_refused_when_piped() {
    let m = || AsyncMapper::new(|x: &u8| std::future::ready(Ok::<u8, io::Error>(*x)));
    let field = |e: ConfigError| {
        assert_eq!(
            (e.operator(), e.stage()),
            (Some("AsyncMapper"), Some("async_mapper"))
        );
        e.field()
    };
    assert_eq!(
        field(support::refused(m().with_concurrency(0))),
        "concurrency"
    );
    assert_eq!(
        field(support::refused(m().with_timeout(Duration::ZERO))),
        "timeout"
    );
    let retry = |r| field(support::refused(m().with_retry(r)));
    assert_eq!(retry(Retry::attempts(0)), "retry.max_attempts");
    assert_eq!(retry(Retry::attempts(2).with_factor(0.9)), "retry.factor");
    // No limit is a valid setting, not an error.
    assert!(
        streamz::iter([1u8])
            .try_pipe(m().with_timeout(Duration::MAX))
            .is_ok()
    );
}

#[tokio::test(start_paused = true)]
async fn concurrency_defaults_to_sixteen_calls_at_once_in_order() {
    // 32 calls of 10 ms: two waves of sixteen, whatever the machine's cores.
    let in_flight = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let m = AsyncMapper::new({
        let (in_flight, most) = (in_flight.clone(), most.clone());
        move |x: &u32| {
            let (x, in_flight, most) = (*x, in_flight.clone(), most.clone());
            async move {
                let now = in_flight.fetch_add(1, SeqCst) + 1;
                most.fetch_max(now, SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                in_flight.fetch_sub(1, SeqCst);
                Ok::<u32, io::Error>(x)
            }
        }
    });
    let start = Instant::now();
    let out = streamz::iter(0..32u32).pipe(m).collect().await;
    assert_eq!(
        values(out),
        (0..32).collect::<Vec<_>>(),
        "ordered by default"
    );
    assert_eq!(most.load(SeqCst), 16);
    assert_eq!(start.elapsed(), Duration::from_millis(20));
}

/// Fails a hang rather than hanging: `limit` on the paused clock.
async fn within<F: std::future::Future>(limit: Duration, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut)
        .await
        .expect("the pipeline ended in time")
}

#[tokio::test(start_paused = true)]
async fn duration_max_means_no_timeout_no_deadline_and_no_delay_cap() {
    let huge = Duration::new(u64::MAX, 0); // not MAX, still past the clock
    for (timeout, deadline) in [(Duration::MAX, Duration::MAX), (huge, huge)] {
        let pipeline = Pipeline::new();
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let retry = Retry::attempts(3)
            .with_backoff(Duration::from_secs(1), Duration::MAX)
            .with_jitter(Jitter::None)
            .with_deadline(deadline);
        let mapper = AsyncMapper::new(move |i: &u32| {
            let (i, n) = (*i, seen.fetch_add(1, SeqCst));
            async move {
                sleep(Duration::from_secs(3600)).await; // far past any default
                if n < 2 { Err(boom("flaky")) } else { Ok(i) }
            }
        })
        .with_timeout(timeout)
        .with_retry(retry);
        let start = Instant::now();
        let out = within(
            Duration::from_secs(4 * 3600),
            pipeline.iter([7u32]).pipe(mapper).collect(),
        )
        .await;
        assert_eq!(values(out), [7]);
        // Three hour-long attempts, 1 s and 2 s apart: nothing cut short.
        assert_eq!(Instant::now() - start, Duration::from_secs(3 * 3600 + 3));
        let m = stage(&pipeline, "async_mapper");
        assert_eq!((m.emitted, m.retries, m.timeouts), (1, 2, 0));
    }
}

#[tokio::test(start_paused = true)]
async fn a_delay_that_never_ends_fails_the_item_at_once_instead_of_hanging() {
    for jitter in [Jitter::None, Jitter::Full, Jitter::Equal] {
        let retry = Retry::attempts(5)
            .with_backoff(Duration::MAX, Duration::MAX)
            .with_jitter(jitter);
        let mapper =
            AsyncMapper::new(|_: &u32| async { Err::<u32, _>(boom("down")) }).with_retry(retry);
        let start = Instant::now();
        let (_, mut errs) = split(within(MS, streamz::iter([1u32]).pipe(mapper).collect()).await);
        assert_eq!(Instant::now(), start);
        let mut err = errs.pop().unwrap();
        assert_eq!((err.kind(), err.attempts()), (ErrorKind::Failed, 1));
        assert_eq!(err.take_item::<u32>(), Some(1));
    }
}

/// An always-failing call with as many attempts as a `u32` holds: only
/// shutdown ends it.
fn always_failing(
    calls: &Arc<AtomicU32>,
) -> impl Fn(&String) -> std::future::Ready<Result<u8, io::Error>> + use<> {
    let seen = calls.clone();
    move |_: &String| {
        let n = seen.fetch_add(1, SeqCst) + 1;
        std::future::ready(Err(boom(&format!("attempt {n} failed"))))
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_unlimited_retries_with_the_item_and_its_attempts() {
    for ordered in [true, false] {
        let pipeline = Pipeline::new();
        let calls = Arc::new(AtomicU32::new(0));
        let mut mapper = AsyncMapper::new(always_failing(&calls)).with_retry(fixed_retry(u32::MAX));
        if !ordered {
            mapper = mapper.unordered();
        }
        let out = pipeline.iter([String::from("order-7")]).pipe(mapper);
        let reader = tokio::spawn(out.collect());
        // Attempts at 0, 0.1, 0.3, 0.7 and 1.5 s; the next would be at 3.1 s.
        sleep(Duration::from_secs(2)).await;
        assert_eq!(calls.load(SeqCst), 5);
        pipeline.shutdown();
        let out = within(MS, reader).await.unwrap();
        let (oks, mut errs) = split(out);
        assert!(oks.is_empty());
        let mut err = errs.pop().unwrap();
        assert_eq!(err.kind(), ErrorKind::Failed, "the last failure's kind");
        assert_eq!(err.attempts(), 5);
        assert_eq!(err.cause().unwrap().to_string(), "attempt 5 failed");
        assert_eq!(err.take_item::<String>().as_deref(), Some("order-7"));
        assert_eq!(calls.load(SeqCst), 5, "no attempt after shutdown");
        let m = stage(&pipeline, "async_mapper");
        assert_eq!((m.failed, m.retries, m.aborted), (1, 4, 0));
        assert_conserved(&m);
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_a_long_backoff_without_waiting_for_it() {
    let pipeline = Pipeline::new();
    let calls = Arc::new(AtomicU32::new(0));
    let retry = Retry::attempts(3)
        .with_backoff(Duration::from_secs(86_400), Duration::from_secs(86_400))
        .with_jitter(Jitter::None);
    let mapper = AsyncMapper::new(always_failing(&calls)).with_retry(retry);
    let mut out = pipeline.iter([String::from("a")]).pipe(mapper);
    let mut next = tokio::spawn(async move {
        let first = out.next().await;
        (first, out.next().await)
    });
    sleep(MS).await; // the first attempt has failed; a day of backoff starts
    assert_eq!(calls.load(SeqCst), 1);
    let shutdown_at = Instant::now();
    pipeline.shutdown();
    let (first, end) = within(MS, &mut next).await.unwrap();
    assert_eq!(
        Instant::now(),
        shutdown_at,
        "the backoff was not waited for"
    );
    let mut err = first.unwrap().unwrap_err();
    assert_eq!((err.kind(), err.attempts()), (ErrorKind::Failed, 1));
    assert_eq!(err.take_item::<String>().as_deref(), Some("a"));
    assert!(end.is_none(), "the output ends");
    assert_eq!(calls.load(SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn an_attempt_running_at_shutdown_finishes_and_its_failure_is_final() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let mapper = AsyncMapper::new(move |i: &u32| {
        let i = *i;
        seen.fetch_add(1, SeqCst);
        async move {
            sleep(Duration::from_secs(1)).await;
            if i == 0 {
                Err(boom("slow failure"))
            } else {
                Ok(i)
            }
        }
    })
    .with_concurrency(2)
    .with_retry(fixed_retry(10));
    let reader = tokio::spawn(flow.pipe(mapper).collect());
    tx.send(0).await.unwrap();
    tx.send(1).await.unwrap();
    sleep(500 * MS).await;
    pipeline.shutdown();
    let out = within(Duration::from_secs(2), reader).await.unwrap();
    let (oks, errs) = split(out);
    assert_eq!(oks, [1], "the running attempt finished");
    assert_eq!((errs[0].kind(), errs[0].attempts()), (ErrorKind::Failed, 1));
    assert_eq!(calls.load(SeqCst), 2, "not retried after shutdown");
    let m = stage(&pipeline, "async_mapper");
    assert_eq!((m.emitted, m.failed, m.retries), (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn conservation_holds_when_shutdown_ends_retries() {
    for ordered in [true, false] {
        let pipeline = Pipeline::with_edge(EdgeConfig::new(4, 2));
        let input = (0..200u32).map(|i| {
            if i % 23 == 0 {
                Err(StreamError::failed("reader", "bad"))
            } else {
                Ok(i)
            }
        });
        let mut mapper = AsyncMapper::new(|i: &u32| {
            let i = *i;
            async move {
                sleep(Duration::from_millis(u64::from(i % 7) * 50)).await;
                // A third always fails; the rest succeed.
                if i % 3 == 0 { Err(boom("down")) } else { Ok(i) }
            }
        })
        .with_concurrency(8)
        .with_retry(fixed_retry(u32::MAX));
        if !ordered {
            mapper = mapper.unordered();
        }
        let flow = pipeline.try_stream(futures::stream::iter(input));
        let reader = tokio::spawn(flow.pipe(mapper).collect());
        sleep(Duration::from_secs(5)).await;
        pipeline.shutdown();
        let out = within(Duration::from_secs(5), reader).await.unwrap();
        let m = stage(&pipeline, "async_mapper");
        assert_conserved(&m);
        assert!(
            m.failed > 0 && m.retries > 0 && m.errors_passed > 0,
            "{m:?}"
        );
        assert_eq!(m.aborted, 0, "shutdown aborts nothing: {m:?}");
        assert_eq!(out.len() as u64, m.emitted + m.failed + m.errors_passed);
        for e in out.iter().filter_map(|r| r.as_ref().err()) {
            if e.stage() == "async_mapper" {
                assert!(e.attempts() >= 1);
            }
        }
    }
}

#[tokio::test]
async fn a_huge_concurrency_allocates_nothing_up_front() {
    let mapper = AsyncMapper::new(|x: &u32| std::future::ready(Ok::<_, std::io::Error>(*x)))
        .with_concurrency(usize::MAX);
    let out = streamz::iter(0..1000u32).pipe(mapper).collect().await;
    assert_eq!(out.len(), 1000);
}

// ---- Holding calls while the dependency is down (`hold_while_down`) ----

/// A call that fails while `up` is false and counts every attempt.
fn dependency(
    up: &Arc<std::sync::atomic::AtomicBool>,
    calls: &Arc<AtomicU32>,
) -> impl Fn(&u32) -> std::future::Ready<Result<u32, io::Error>> + use<> {
    let (up, calls) = (up.clone(), calls.clone());
    move |n: &u32| {
        calls.fetch_add(1, SeqCst);
        std::future::ready(if up.load(SeqCst) {
            Ok(*n)
        } else {
            Err(boom("connection refused"))
        })
    }
}

#[tokio::test(start_paused = true)]
async fn held_items_spend_no_attempt_while_down_and_all_arrive_in_order_once_up() {
    for ordered in [true, false] {
        let pipeline = Pipeline::new();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let calls = Arc::new(AtomicU32::new(0));
        let (health, signal) = tokio::sync::watch::channel(streamz::Health::Healthy);
        let mut mapper = AsyncMapper::new(dependency(&up, &calls))
            .with_concurrency(4)
            .with_retry(fixed_retry(2))
            .hold_while_down(signal);
        if !ordered {
            mapper = mapper.unordered();
        }
        let (tx, flow) = pipeline.channel::<u32>();
        let reader = tokio::spawn(flow.pipe(mapper).collect());
        // The dependency goes down; the first item fails once (its retry
        // is due in 100 ms) before the signal says so.
        up.store(false, SeqCst);
        tx.send(0).await.unwrap();
        settle_briefly().await;
        assert_eq!(calls.load(SeqCst), 1);
        health.send(streamz::Health::unhealthy("db down")).unwrap();
        for i in 1..4 {
            tx.send(i).await.unwrap();
        }
        // A minute down: the retry and the new items wait, no attempt.
        sleep(Duration::from_secs(60)).await;
        assert_eq!(calls.load(SeqCst), 1, "no attempt while down");
        up.store(true, SeqCst);
        health.send(streamz::Health::Healthy).unwrap();
        drop(tx);
        let out = within(Duration::from_secs(1), reader).await.unwrap();
        let mut got = values(out);
        if !ordered {
            got.sort_unstable();
        }
        assert_eq!(got, [0, 1, 2, 3], "every item, none dead-lettered");
        assert_eq!(calls.load(SeqCst), 5, "one failed attempt, then one each");
        let m = stage(&pipeline, "async_mapper");
        assert_eq!((m.emitted, m.failed, m.retries), (4, 0, 1));
        assert_conserved(&m);
    }
}

/// Lets the pipeline's tasks run without moving the paused clock.
async fn settle_briefly() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_held_items_with_their_last_error_or_gate_closed_carrying_them() {
    let pipeline = Pipeline::new();
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let (health, signal) = tokio::sync::watch::channel(streamz::Health::Healthy);
    let mapper = AsyncMapper::new(dependency(&up, &calls))
        .with_concurrency(4)
        .with_retry(fixed_retry(u32::MAX))
        .hold_while_down(signal);
    let (tx, flow) = pipeline.channel::<u32>();
    let reader = tokio::spawn(flow.pipe(mapper).collect());
    tx.send(7).await.unwrap();
    settle_briefly().await;
    health.send(streamz::Health::unhealthy("db down")).unwrap();
    tx.send(8).await.unwrap();
    sleep(Duration::from_secs(10)).await;
    assert_eq!(calls.load(SeqCst), 1);
    pipeline.shutdown();
    let out = within(MS, reader).await.unwrap();
    let (oks, errs) = split(out);
    assert!(oks.is_empty());
    let mut errs = errs.into_iter();
    let mut retried = errs.next().unwrap();
    assert_eq!((retried.kind(), retried.attempts()), (ErrorKind::Failed, 1));
    assert_eq!(retried.cause().unwrap().to_string(), "connection refused");
    assert_eq!(retried.take_item::<u32>(), Some(7));
    let mut never = errs.next().unwrap();
    assert_eq!(
        (never.kind(), never.attempts()),
        (ErrorKind::GateClosed, 0),
        "never tried"
    );
    let down = never
        .cause()
        .unwrap()
        .downcast_ref::<streamz::DependencyDown>()
        .unwrap();
    assert_eq!(down.reason(), "db down");
    assert_eq!(never.take_item::<u32>(), Some(8));
    assert_eq!(calls.load(SeqCst), 1, "no call after shutdown");
    assert_conserved(&stage(&pipeline, "async_mapper"));
}

#[tokio::test(start_paused = true)]
async fn a_gate_handle_holds_the_items_past_the_gate_even_after_the_gate_ended() {
    let pipeline = Pipeline::new();
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let (health, check) = tokio::sync::watch::channel(streamz::Health::unhealthy("down"));
    let gate = streamz::HealthGate::new(check)
        .starting_open()
        .with_interval(100 * MS)
        .with_failures_to_close(1);
    let handle = gate.handle();
    let mapper = AsyncMapper::new(dependency(&up, &calls))
        .with_concurrency(8)
        .with_retry(fixed_retry(3))
        .hold_while_down(&handle);
    let out = tokio::spawn(pipeline.iter(0..8u32).pipe(gate).pipe(mapper).collect());
    // The items that passed the open gate fail once; their retries (100
    // ms later) find the gate closed and wait, long after the gate itself
    // has ended (its input did).
    sleep(Duration::from_secs(1)).await;
    assert_eq!(handle.state(), streamz::GateState::Closed);
    let during = calls.load(SeqCst);
    assert!(during <= 8, "at most one attempt per item: {during}");
    sleep(Duration::from_secs(60)).await;
    assert_eq!(
        calls.load(SeqCst),
        during,
        "no attempt while the gate is closed"
    );
    up.store(true, SeqCst);
    health.send(streamz::Health::Healthy).unwrap();
    let got = values(within(Duration::from_secs(5), out).await.unwrap());
    assert_eq!(
        got,
        (0..8).collect::<Vec<_>>(),
        "nothing failed for the outage"
    );
    assert_eq!(calls.load(SeqCst) - during, 8, "one attempt each once up");
    assert_conserved(&stage(&pipeline, "async_mapper"));
}

#[tokio::test(start_paused = true)]
async fn a_signal_whose_sender_is_gone_lets_the_calls_go_ahead() {
    let (health, signal) = tokio::sync::watch::channel(streamz::Health::unhealthy("down"));
    let mapper = AsyncMapper::new(|n: &u32| std::future::ready(Ok::<_, io::Error>(*n)))
        .hold_while_down(signal);
    let out = tokio::spawn(streamz::iter(0..3u32).pipe(mapper).collect());
    sleep(Duration::from_secs(1)).await;
    assert!(!out.is_finished(), "held while down");
    drop(health);
    let got = values(within(MS, out).await.unwrap());
    assert_eq!(got, [0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn a_retry_held_past_its_deadline_ends_with_its_failure_and_no_late_call() {
    let pipeline = Pipeline::new();
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let (health, signal) = tokio::sync::watch::channel(streamz::Health::Healthy);
    let mapper = AsyncMapper::new(dependency(&up, &calls))
        .with_retry(fixed_retry(10).with_deadline(Duration::from_millis(300)))
        .hold_while_down(signal);
    let out = tokio::spawn(pipeline.iter([5u32]).pipe(mapper).collect());
    settle_briefly().await; // the first attempt fails; a retry is due in 100 ms
    health.send(streamz::Health::unhealthy("db down")).unwrap();
    let start = Instant::now();
    let out = within(Duration::from_secs(1), out).await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(300),
        "ended at its deadline"
    );
    let mut err = out.into_iter().next().unwrap().unwrap_err();
    assert_eq!((err.kind(), err.attempts()), (ErrorKind::Failed, 1));
    assert_eq!(err.cause().unwrap().to_string(), "connection refused");
    assert_eq!(err.take_item::<u32>(), Some(5));
    // The mapper has ended: no late call, whatever the signal says now.
    drop(health);
    up.store(true, SeqCst);
    settle().await;
    assert_eq!(calls.load(SeqCst), 1);
    assert_conserved(&stage(&pipeline, "async_mapper"));
}

#[tokio::test(start_paused = true)]
async fn a_signal_that_always_has_an_update_does_not_take_the_task() {
    let signal =
        streamz::DependencySignal::from_stream(futures::stream::repeat(streamz::Health::Healthy));
    let mapper = AsyncMapper::new(|n: &u32| std::future::ready(Ok::<_, io::Error>(*n)))
        .with_concurrency(4)
        .hold_while_down(signal);
    let out = within(
        Duration::from_secs(1),
        streamz::iter(0..100u32).pipe(mapper).collect(),
    )
    .await;
    assert_eq!(values(out), (0..100).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_gate_kept_checking_for_another_pipeline_does_not_hold_up_its_own() {
    let (_health, check) = tokio::sync::watch::channel(streamz::Health::Healthy);
    let gate = streamz::HealthGate::new(check).with_interval(100 * MS);
    let handle = gate.handle();
    let a = Pipeline::new();
    let a_out = tokio::spawn(a.iter(0..3u32).pipe(gate).collect());
    // Another pipeline's mapper holds its calls on the gate.
    let b = Pipeline::new();
    let (tx, flow) = b.channel::<u32>();
    let mapper = AsyncMapper::new(|n: &u32| std::future::ready(Ok::<_, io::Error>(*n)))
        .hold_while_down(&handle);
    let b_out = tokio::spawn(flow.pipe(mapper).collect());
    assert_eq!(
        values(within(Duration::from_secs(1), a_out).await.unwrap()).len(),
        3
    );
    within(Duration::from_secs(1), a.join()).await.unwrap();
    // The gate has ended; its checker goes on for the mapper.
    let checks = handle.checks();
    sleep(Duration::from_secs(1)).await;
    assert!(
        handle.checks() >= checks + 9,
        "{} -> {}",
        checks,
        handle.checks()
    );
    tx.send(1).await.unwrap();
    drop(tx);
    assert_eq!(
        values(within(Duration::from_secs(1), b_out).await.unwrap()),
        [1]
    );
    within(Duration::from_secs(1), b.join()).await.unwrap();
    // The mapper let go: the checker stops.
    settle().await;
    let stopped = handle.checks();
    sleep(Duration::from_secs(1)).await;
    assert_eq!(handle.checks(), stopped);
}

#[tokio::test(start_paused = true)]
async fn an_abort_stops_a_gate_checker_kept_for_a_mapper() {
    let (_health, check) = tokio::sync::watch::channel(streamz::Health::Healthy);
    let gate = streamz::HealthGate::new(check).with_interval(100 * MS);
    let handle = gate.handle();
    let _held: streamz::DependencySignal = (&handle).into();
    let a = Pipeline::new();
    let (_tx, flow) = a.channel::<u32>();
    let _out = tokio::spawn(flow.pipe(gate).collect());
    settle_briefly().await;
    a.abort();
    let _ = within(Duration::from_secs(1), a.join()).await;
    settle().await;
    let stopped = handle.checks();
    sleep(Duration::from_secs(1)).await;
    assert_eq!(handle.checks(), stopped, "no more checks after the abort");
}
