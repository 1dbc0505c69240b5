//! Throttle: exact timing of the shaping mode, bursts, costs, errors,
//! backpressure, the dropping mode, abort and bad configuration. All on a
//! paused clock.

mod support;

use std::time::Duration;

use futures::StreamExt;
use streamz::{EdgeConfig, ErrorKind, Pipeline, StreamError, Throttle, TrySendError};
use support::{assert_conserved, split, stage, values};
use tokio::time::{Instant, sleep};

const MS: Duration = Duration::from_millis(1);

/// The time each item reached the consumer, relative to `start`.
async fn arrival_times<T: Send + 'static>(
    mut flow: streamz::Flow<T>,
    start: Instant,
) -> Vec<Duration> {
    let mut times = Vec::new();
    while let Some(item) = flow.next().await {
        drop(item);
        times.push(Instant::now() - start);
    }
    times
}

#[tokio::test(start_paused = true)]
async fn a_thousand_items_at_100_per_second_with_burst_10_take_9_9_seconds() {
    let pipeline = Pipeline::new();
    let start = Instant::now();
    let throttle = Throttle::new(100, Duration::from_secs(1)).with_burst(10);
    let times = arrival_times(pipeline.iter(0..1000u32).pipe(throttle), start).await;
    assert_eq!(times.len(), 1000);
    for (k, t) in times.iter().enumerate() {
        // The burst of ten at once, then one every 10 ms; never early.
        let earliest = MS * 10 * (k.saturating_sub(9) as u32);
        assert!(*t >= earliest, "item {k} at {t:?}, before {earliest:?}");
    }
    assert_eq!(times[9], Duration::ZERO);
    assert_eq!(times[999], Duration::from_millis(9900));
    let m = stage(&pipeline, "throttle");
    assert_eq!((m.received, m.emitted, m.dropped), (1000, 1000, 0));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn no_window_of_one_period_holds_more_than_rate_plus_burst() {
    let start = Instant::now();
    let throttle = Throttle::new(50, Duration::from_secs(1)).with_burst(20);
    let (tx, flow) = streamz::channel::<u32>();
    let feeder = tokio::spawn(async move {
        // Bursty input: 300 at once, a pause, 300 more.
        for i in 0..300 {
            tx.send(i).await.unwrap();
        }
        sleep(Duration::from_secs(20)).await;
        for i in 0..300 {
            tx.send(i).await.unwrap();
        }
    });
    let times = arrival_times(flow.pipe(throttle), start).await;
    feeder.await.unwrap();
    assert_eq!(times.len(), 600);
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|u| **u < *t + Duration::from_secs(1));
        assert!(
            in_window.count() <= 70,
            "more than 50 + 20 in the second after {t:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_cost_function_charges_tokens_per_value() {
    let start = Instant::now();
    // 100 tokens per second, burst 100; values cost their length.
    let throttle = Throttle::new(100, Duration::from_secs(1))
        .with_burst(100)
        .with_cost(|s: &String| s.len() as u64);
    let input = [
        "x".repeat(60),
        "y".repeat(40),
        "z".repeat(50),
        String::new(),
    ];
    let times = arrival_times(streamz::iter(input).pipe(throttle), start).await;
    // 60 + 40 use the burst; 50 more take half a second; an empty value is free.
    assert_eq!(times, [0, 0, 500, 500].map(Duration::from_millis));
}

#[tokio::test(start_paused = true)]
async fn a_value_heavier_than_the_burst_waits_for_a_full_bucket_and_leaves_debt() {
    let start = Instant::now();
    let throttle = Throttle::new(10, Duration::from_secs(1))
        .with_burst(10)
        .with_cost(|n: &u64| *n);
    let times = arrival_times(streamz::iter([5u64, 30, 1]).pipe(throttle), start).await;
    // 5 from the burst; 30 waits until the bucket is full again (0.5 s)
    // and leaves a debt of 20 tokens, repaid at 2.5 s; the 1 token the last
    // value needs comes 0.1 s later.
    assert_eq!(times, [0, 500, 2600].map(Duration::from_millis));
}

#[tokio::test(start_paused = true)]
async fn errors_pass_in_order_without_tokens_unless_configured() {
    let items = || {
        futures::stream::iter(vec![
            Ok(1u32),
            Err(StreamError::failed("reader", "a")),
            Err(StreamError::failed("reader", "b")),
            Ok(2),
        ])
    };
    let start = Instant::now();
    let pipeline = Pipeline::new();
    let free = Throttle::new(1, Duration::from_secs(1));
    let times = arrival_times(pipeline.try_stream(items()).pipe(free), start).await;
    assert_eq!(times, [0, 0, 0, 1000].map(Duration::from_millis));
    let m = stage(&pipeline, "throttle");
    assert_eq!((m.emitted, m.errors_passed), (2, 2));
    assert_conserved(&m);

    let start = Instant::now();
    let charged = Throttle::new(1, Duration::from_secs(1)).with_error_cost(1);
    let out = streamz::try_stream(items()).pipe(charged);
    let times = arrival_times(out, start).await;
    assert_eq!(times, [0, 1000, 2000, 3000].map(Duration::from_millis));
}

#[tokio::test(start_paused = true)]
async fn shaping_never_drops_and_holds_the_producer_back() {
    let edge = EdgeConfig::new(4, 2);
    let pipeline = Pipeline::with_edge(edge);
    let (tx, flow) = pipeline.channel::<u32>();
    let throttle = Throttle::new(1, Duration::from_secs(1));
    let reader = tokio::spawn(flow.pipe(throttle).collect());
    let mut accepted = 0u32;
    loop {
        match tx.try_send(accepted) {
            Ok(()) => accepted += 1,
            Err(TrySendError::Full(_)) => break,
            Err(TrySendError::Closed(_)) => panic!("closed"),
        }
        tokio::task::yield_now().await;
    }
    // The producer was refused long before the throttle let much through.
    assert!(accepted < 20, "accepted {accepted}");
    let before = Instant::now();
    tx.send(accepted).await.unwrap();
    assert!(Instant::now() > before, "the send waited for the throttle");
    drop(tx);
    let out = values(reader.await.unwrap());
    assert_eq!(out, (0..=accepted).collect::<Vec<_>>(), "nothing dropped");
    assert_eq!(stage(&pipeline, "throttle").dropped, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_mode_emits_on_the_leading_edge_and_counts_every_drop() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let throttle = Throttle::new(1, Duration::from_millis(100)).dropping();
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut flow = flow.pipe(throttle);
        let mut got = Vec::new();
        while let Some(item) = flow.next().await {
            got.push((item.unwrap(), Instant::now() - start));
        }
        got
    });
    // One item every 10 ms for one second.
    for i in 0..100 {
        tx.send(i).await.unwrap();
        sleep(10 * MS).await;
    }
    drop(tx);
    let got = reader.await.unwrap();
    let kept: Vec<u32> = got.iter().map(|(v, _)| *v).collect();
    assert_eq!(kept, (0..100).step_by(10).collect::<Vec<_>>());
    assert!(got.iter().all(|(v, t)| *t == MS * 10 * *v), "never delayed");
    let m = stage(&pipeline, "throttle");
    assert_eq!((m.received, m.emitted, m.dropped), (100, 10, 90));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn dropping_mode_never_drops_errors() {
    let input = futures::stream::iter(vec![
        Ok(1u32),
        Ok(2),
        Err(StreamError::failed("reader", "bad")),
        Ok(3),
    ]);
    let throttle = Throttle::new(1, Duration::from_secs(1))
        .with_error_cost(1)
        .dropping();
    let (oks, errs) = split(streamz::try_stream(input).pipe(throttle).collect().await);
    assert_eq!(oks, [1]);
    assert_eq!(errs.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_cost_function_fails_only_its_value() {
    let pipeline = Pipeline::new();
    let throttle = Throttle::new(1000, Duration::from_secs(1)).with_cost(|s: &String| {
        assert!(s != "bad", "no cost for bad");
        1
    });
    let input = ["a", "bad", "c"].map(String::from);
    let (oks, mut errs) = split(pipeline.iter(input).pipe(throttle).collect().await);
    assert_eq!(oks, ["a", "c"]);
    assert_eq!(errs[0].kind(), ErrorKind::Panicked);
    assert_eq!(errs[0].take_item::<String>().as_deref(), Some("bad"));
    let m = stage(&pipeline, "throttle");
    assert_eq!((m.emitted, m.failed), (2, 1));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn abort_while_waiting_counts_the_held_items() {
    let pipeline = Pipeline::new();
    let throttle = Throttle::new(1, Duration::from_secs(1));
    let mut out = pipeline.iter(0..100u32).pipe(throttle);
    assert_eq!(out.next().await.unwrap().unwrap(), 0);
    sleep(2500 * MS).await;
    pipeline.abort();
    pipeline.join().await.unwrap();
    let rest: Vec<_> = out.collect().await;
    let m = stage(&pipeline, "throttle");
    assert!(m.aborted > 0, "{m:?}");
    assert_conserved(&m);
    assert_eq!(
        stage(&pipeline, "iter").emitted,
        1 + rest.len() as u64 + support::stopped_early(&pipeline) + pipeline.discarded()
    );
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_lets_the_waiting_items_through_at_the_rate() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let throttle = Throttle::new(1, Duration::from_secs(1));
    let start = Instant::now();
    let reader = tokio::spawn(arrival_times(flow.pipe(throttle), start));
    for i in 0..3 {
        tx.send(i).await.unwrap();
    }
    pipeline.shutdown();
    let times = reader.await.unwrap();
    assert_eq!(times, [0, 1000, 2000].map(Duration::from_millis));
    let m = stage(&pipeline, "throttle");
    assert_eq!((m.received, m.emitted, m.aborted), (3, 3, 0));
    assert_conserved(&m);
}

#[tokio::test]
async fn bad_configuration_is_refused_when_piped() {
    let one_second = Duration::from_secs(1);
    let field = |t: Throttle<u8>| support::refused(t).field();
    assert_eq!(field(Throttle::new(0, one_second)), "rate");
    assert_eq!(field(Throttle::new(1, Duration::ZERO)), "period");
    assert_eq!(field(Throttle::new(1, Duration::MAX)), "period");
    assert_eq!(field(Throttle::new(1, one_second).with_burst(0)), "burst");
    let err = support::refused(Throttle::<u8>::new(0, one_second).named("api"));
    assert_eq!(
        err.to_string(),
        "Throttle `api`: `rate` must be greater than zero"
    );
}

/// On the real clock: tokio's timer wakes late, and a limiter that lost
/// that lateness on every wait delivered about half its rate with burst 1
/// (1,000/s gave about 465/s). The precise figure is measured by
/// `cargo bench --bench throttle_rate`; this only checks a loose bound that
/// the old behaviour fails, so a loaded machine cannot make it flaky.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_real_time_the_delivered_rate_is_close_to_the_configured_one() {
    const RATE: u64 = 1000;
    const ITEMS: u64 = 400;
    let throttle = Throttle::new(RATE, Duration::from_secs(1));
    let mut flow = streamz::iter(0..=ITEMS).pipe(throttle);
    // The first item passes at once; time from it.
    flow.next().await.unwrap().unwrap();
    let start = std::time::Instant::now();
    let mut n = 0;
    let run = async {
        while flow.next().await.is_some() {
            n += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("400 items at 1,000/s take well under a minute");
    let rate = n as f64 / start.elapsed().as_secs_f64();
    assert_eq!(n, ITEMS);
    assert!(
        rate > 0.75 * RATE as f64,
        "{rate:.0}/s delivered of {RATE}/s"
    );
    assert!(
        rate < 1.05 * RATE as f64,
        "{rate:.0}/s is faster than {RATE}/s"
    );
}
