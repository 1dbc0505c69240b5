//! Feature `metrics`: a known run, exported through the `metrics` facade to
//! a Prometheus recorder serving text over HTTP on 127.0.0.1, scraped with a
//! real HTTP client. The series must hold the run's values: the stage
//! counters equal `Pipeline::metrics()`, and the operators' own series
//! (mapper latency and in-flight, throttle delay, batch sizes, edge fill,
//! gate state and checks, dead-letter records and fsyncs, breaker state,
//! calls and transitions) show what the run did.
#![cfg(all(feature = "metrics", feature = "http"))]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use streamz::dlq::FileSink;
use streamz::{AsyncMapper, Batcher, DeadLetterQueue, HealthGate, Pipeline, Retry, Throttle};

/// The series of a Prometheus text page: `name{labels}` to value.
fn parse(page: &str) -> HashMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn get(series: &HashMap<String, f64>, key: &str) -> f64 {
    *series
        .get(key)
        .unwrap_or_else(|| panic!("no series {key} in the scrape"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_every_series_of_a_known_run() {
    tokio::time::timeout(Duration::from_secs(60), run())
        .await
        .expect("the run and the scrape finish");
}

/// The recorder, installed once for the tests of this binary, serving on
/// 127.0.0.1 at the address returned.
fn recorder() -> std::net::SocketAddr {
    static ADDR: std::sync::OnceLock<std::net::SocketAddr> = std::sync::OnceLock::new();
    *ADDR.get_or_init(|| {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // Installed from a thread outside any runtime, so the exporter
        // serves from a runtime of its own: one of a test would end with
        // that test, and the others' scrapes would be refused.
        std::thread::spawn(move || {
            PrometheusBuilder::new()
                .with_http_listener(addr)
                .set_buckets(&[0.001, 0.01, 0.1, 1.0, 10.0])
                .unwrap()
                .install()
                .unwrap();
        })
        .join()
        .unwrap();
        addr
    })
}

async fn scrape(addr: std::net::SocketAddr) -> (String, HashMap<String, f64>) {
    let page = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = parse(&page);
    (page, series)
}

/// Two pipelines with the same name (one built again after a restart, say)
/// add up in one series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_that_share_names_add_up() {
    let addr = recorder();
    for _ in 0..2 {
        let pipeline = Pipeline::builder().with_name("again").build();
        let out = pipeline
            .iter(0..5u32)
            .map(|n: &u32| n + 1)
            .named("inc")
            .collect()
            .await;
        assert_eq!(out.len(), 5);
        pipeline.join().await.unwrap();
    }
    let (page, series) = scrape(addr).await;
    let key = r#"streamz_stage_items_total{pipeline="again",stage="inc",outcome="emitted"}"#;
    assert_eq!(get(&series, key), 10.0, "{page}");
}

async fn run() {
    let addr = recorder();

    let dir = tempfile::tempdir().unwrap();
    let dlq_path = dir.path().join("dlq.jsonl");
    let sink = FileSink::<u32>::create(&dlq_path).await.unwrap();
    let (_health, check) = tokio::sync::watch::channel(true);
    let failed_once = Arc::new(AtomicBool::new(false));

    // 3 fails once (a retry saves it); 11 never answers in time.
    let call = AsyncMapper::new(move |n: &u32| {
        let n = *n;
        let failed_once = failed_once.clone();
        async move {
            if n == 3 && !failed_once.swap(true, Ordering::Relaxed) {
                return Err(std::io::Error::other("busy"));
            }
            if n == 11 {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok(n)
        }
    })
    .named("call")
    .with_concurrency(4)
    .with_timeout(Duration::from_millis(50))
    .with_retry(
        Retry::attempts(2).with_backoff(Duration::from_millis(1), Duration::from_millis(1)),
    );
    let call_limit = call.concurrency_limit();

    let pipeline = Pipeline::builder().with_name("scrape").build();
    let out = pipeline
        .iter(1..=20u32)
        .pipe(
            HealthGate::new(check)
                .named("gate")
                .with_interval(Duration::from_millis(10)),
        )
        // 5, 10, 15 and 20 are dropped.
        .filter(|n: &u32| n % 5 != 0)
        // 7 fails.
        .try_map(|n: &u32| if *n == 7 { Err("seven") } else { Ok(*n) })
        .named("parse")
        .pipe(call)
        // 200 a second, one at a time: the values wait for tokens.
        .pipe(Throttle::new(200, Duration::from_secs(1)).named("throttle"))
        .pipe(Batcher::new(5, Duration::from_secs(1)).named("batch"))
        .pipe(DeadLetterQueue::new(sink).named("dlq"))
        .collect()
        .await;
    assert!(out.iter().all(Result::is_ok), "failures went to the file");
    pipeline.join().await.unwrap();

    #[cfg(feature = "circuit-breaker")]
    let breaker = {
        use streamz::breaker::{Breaker, BreakerConfig, BreakerState};
        let breaker = Breaker::new("scrape_breaker", BreakerConfig::default());
        for _ in 0..3 {
            breaker.try_acquire().unwrap().success(Duration::ZERO);
        }
        breaker.transition_to(BreakerState::Open, "test", "a known run");
        breaker
    };

    let (page, series) = scrape(addr).await;
    let stage = |name: &str, outcome: &str| {
        get(
            &series,
            &format!(
                r#"streamz_stage_items_total{{pipeline="scrape",stage="{name}",outcome="{outcome}"}}"#
            ),
        )
    };

    // Every stage counter equals the pipeline's own snapshot.
    for m in pipeline.metrics() {
        for (outcome, n) in [
            ("received", m.received),
            ("emitted", m.emitted),
            ("failed", m.failed),
            ("errors_passed", m.errors_passed),
            ("dropped", m.dropped),
            ("aborted", m.aborted),
            ("undelivered", m.undelivered),
            ("dead_lettered", m.dead_lettered),
        ] {
            assert_eq!(
                stage(&m.name, outcome),
                n as f64,
                "{} {outcome}\n{page}",
                m.name
            );
        }
        let of = |name: &str| {
            get(
                &series,
                &format!(r#"{name}{{pipeline="scrape",stage="{}"}}"#, m.name),
            )
        };
        assert_eq!(of("streamz_stage_retries_total"), m.retries as f64);
        assert_eq!(of("streamz_stage_timeouts_total"), m.timeouts as f64);
    }
    // ... and holds what the run did.
    assert_eq!(stage("iter", "emitted"), 20.0);
    assert_eq!(stage("filter", "dropped"), 4.0);
    assert_eq!(stage("parse", "failed"), 1.0);
    assert_eq!(stage("call", "failed"), 1.0);
    assert_eq!(stage("dlq", "dead_lettered"), 2.0);
    let call = pipeline.stage_metrics("call").unwrap();
    assert_eq!((call.retries, call.timeouts), (2, 2), "3 once, 11 twice");

    let one = |key: &str| get(&series, key);
    // Each attempt is timed: 15 values, 2 of them tried again.
    assert_eq!(
        one(r#"streamz_async_mapper_call_duration_seconds_count{pipeline="scrape",stage="call"}"#),
        17.0
    );
    assert_eq!(
        one(r#"streamz_async_mapper_in_flight{pipeline="scrape",stage="call"}"#),
        0.0
    );
    assert_eq!(
        one(r#"streamz_async_mapper_concurrency_limit{pipeline="scrape",stage="call"}"#),
        4.0
    );
    assert_eq!(call_limit.get(), 4);
    assert!(
        one(r#"streamz_throttle_delay_seconds_count{pipeline="scrape",stage="throttle"}"#) >= 1.0
    );
    assert_eq!(
        one(r#"streamz_batcher_batch_size_items_sum{pipeline="scrape",stage="batch"}"#),
        14.0
    );
    assert_eq!(
        one(r#"streamz_edge_capacity_items{pipeline="scrape",stage="gate",to="filter"}"#),
        1024.0
    );
    assert_eq!(
        one(r#"streamz_edge_items{pipeline="scrape",stage="gate",to="filter"}"#),
        0.0
    );
    assert_eq!(
        one(r#"streamz_gate_open{pipeline="scrape",stage="gate"}"#),
        1.0
    );
    assert!(
        one(r#"streamz_gate_checks_total{pipeline="scrape",stage="gate",result="healthy"}"#) >= 1.0
    );
    assert_eq!(
        one(r#"streamz_dlq_records_total{pipeline="scrape",stage="dlq",result="written"}"#),
        2.0
    );
    let file = dlq_path.display();
    assert!(
        one(&format!(
            r#"streamz_dlq_fsyncs_total{{file="{file}",result="ok"}}"#
        )) >= 1.0
    );

    #[cfg(feature = "circuit-breaker")]
    {
        let b = |rest: &str| one(&format!("streamz_breaker_{rest}"));
        assert_eq!(b(r#"state{breaker="scrape_breaker",state="open"}"#), 1.0);
        assert_eq!(b(r#"state{breaker="scrape_breaker",state="closed"}"#), 0.0);
        assert_eq!(
            b(r#"transitions_total{breaker="scrape_breaker",to="open"}"#),
            1.0
        );
        assert_eq!(
            b(r#"calls_total{breaker="scrape_breaker",outcome="success"}"#),
            3.0
        );
        assert_eq!(
            b(r#"calls_total{breaker="scrape_breaker",outcome="permitted"}"#),
            3.0
        );
        drop(breaker);
    }
}

/// An adaptive limit's gauge follows the limit as it moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_limit_is_exported() {
    let addr = recorder();
    // On a paused clock of its own (the recorder is process-wide), a
    // dependency of 10 ms whatever the load: the limit climbs from 1 to 6.
    let limit = std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let m = AsyncMapper::new(|n: &u32| {
                let n = *n;
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Ok::<_, std::io::Error>(n)
                }
            })
            .with_adaptive_concurrency(1, 6)
            .named("adaptive");
            let limit = m.concurrency_limit();
            let pipeline = Pipeline::builder().with_name("adaptive").build();
            let out = pipeline.iter(0..500u32).pipe(m).collect().await;
            assert_eq!(out.len(), 500);
            pipeline.join().await.unwrap();
            limit.get()
        })
    })
    .join()
    .unwrap();
    assert_eq!(limit, 6);
    let (page, series) = scrape(addr).await;
    let key = r#"streamz_async_mapper_concurrency_limit{pipeline="adaptive",stage="adaptive"}"#;
    assert_eq!(get(&series, key), 6.0, "{page}");
}

/// A broadcast output that sheds exports what it missed, and whether it
/// was detached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_outputs_that_shed_are_exported() {
    use streamz::{BranchPolicy, Broadcast, EdgeConfig};
    let addr = recorder();
    let pipeline = Pipeline::builder().with_name("tee").build();
    let tee = Broadcast::new(3)
        .named("tee")
        .with_policy(1, BranchPolicy::DropNewest)
        .with_policy(2, BranchPolicy::Detach)
        .with_edge(EdgeConfig::new(8, 8));
    let stats = tee.branch_stats();
    let [main, dropping, detached]: [_; 3] = pipeline
        .iter(0..1_000u32)
        .broadcast_with(tee)
        .try_into()
        .unwrap();
    assert_eq!(main.collect().await.len(), 1_000);
    drop((dropping, detached));
    pipeline.join().await.unwrap();
    assert_eq!((stats.dropped(1), stats.dropped(2)), (992, 992));
    let (page, series) = scrape(addr).await;
    let key = |name: &str, output: u32| {
        format!(
            r#"streamz_broadcast_output_{name}{{pipeline="tee",stage="tee",output="{output}"}}"#
        )
    };
    assert_eq!(get(&series, &key("dropped_total", 1)), 992.0, "{page}");
    assert_eq!(get(&series, &key("dropped_total", 2)), 992.0, "{page}");
    assert_eq!(get(&series, &key("detached", 1)), 0.0, "{page}");
    assert_eq!(get(&series, &key("detached", 2)), 1.0, "{page}");
    assert!(
        !series.contains_key(&key("dropped_total", 0)),
        "a waiting output has no series"
    );
}

/// A stage named after the publisher has looked at its pipeline (before it
/// runs) reports under its name; after an abort the gauges fall to 0 (the
/// mapper's in-flight count, and the fill of a channel whose receiver
/// drained it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_names_and_aborts_leave_no_stale_series() {
    let addr = recorder();
    let pipeline = Pipeline::builder().with_name("late").build();
    let flow = pipeline.iter(0..5_000u32).map(|n: &u32| *n);
    // The publisher runs on its own clock: it may look before the name.
    pipeline.publish_metrics();
    let flow = flow
        .named("renamed")
        .pipe(streamz::Stage::new(
            "double",
            streamz::Map::new(|n: &u32| n * 2),
        ))
        .pipe(
            AsyncMapper::new(|_: &u32| std::future::pending::<Result<u32, std::io::Error>>())
                .named("stuck")
                .with_concurrency(4),
        );
    let reader = tokio::spawn(flow.collect());
    let key = |rest: &str| rest.replace("P", r#"pipeline="late""#);
    let in_flight = key(r#"streamz_async_mapper_in_flight{P,stage="stuck"}"#);
    let held = key(r#"streamz_edge_items{P,stage="double",to="stuck"}"#);
    // Polls the page until the mapper holds its 4 calls and items wait in
    // the channel into it (a bound of 30 s for a broken run).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        pipeline.publish_metrics();
        let (_, series) = scrape(addr).await;
        if series.get(&in_flight) == Some(&4.0) && series.get(&held).is_some_and(|&n| n > 0.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the mapper never held 4 calls with items waiting in its input"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pipeline.abort();
    pipeline.join().await.unwrap();
    let _ = reader.await;
    let (page, series) = scrape(addr).await;
    assert_eq!(get(&series, &in_flight), 0.0, "{page}");
    let renamed = key(r#"streamz_stage_items_total{P,stage="renamed",outcome="received"}"#);
    assert!(get(&series, &renamed) > 0.0, "{page}");
    assert!(
        !page.contains(r#"pipeline="late",stage="map""#),
        "no series under the name it had before: {page}"
    );
    assert_eq!(get(&series, &held), 0.0, "the channel was drained: {page}");
}

/// A pipeline dropped without `join` publishes what it counted as it goes:
/// a run shorter than the publisher's second still shows every count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_dropped_without_join_publishes_its_counts() {
    let addr = recorder();
    let pipeline = Pipeline::builder().with_name("unjoined").build();
    let out = pipeline
        .iter(0..1_700u32)
        .map(|n: &u32| n + 1)
        .named("inc")
        .collect()
        .await;
    assert_eq!(out.len(), 1_700);
    drop(pipeline);
    let (page, series) = scrape(addr).await;
    let key = r#"streamz_stage_items_total{pipeline="unjoined",stage="inc",outcome="emitted"}"#;
    assert_eq!(get(&series, key), 1_700.0, "{page}");
}

/// Stage tasks that outlive every handle on their pipeline are published
/// until they end: the series reach the final counts with no `join`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_that_outlive_their_pipeline_are_published_to_the_end() {
    let addr = recorder();
    let pipeline = Pipeline::builder().with_name("outlived").build();
    let (tx, flow) = pipeline.channel::<u32>();
    let reader = tokio::spawn(
        flow.map(|n: &u32| *n)
            .named("m")
            .async_boundary("hop")
            .collect(),
    );
    drop(pipeline);
    for n in 0..1_700u32 {
        tx.send(n).await.unwrap();
    }
    drop(tx);
    assert_eq!(reader.await.unwrap().len(), 1_700);
    let key = r#"streamz_stage_items_total{pipeline="outlived",stage="hop",outcome="emitted"}"#;
    // The publisher runs every second of real time: a bound of 30 s for a
    // broken run.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (page, series) = scrape(addr).await;
        match series.get(key) {
            Some(&1_700.0) => break,
            Some(&n) if n > 1_700.0 => panic!("counted twice: {page}"),
            _ => assert!(
                std::time::Instant::now() < deadline,
                "never reached 1,700: {page}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A merge runs the merged pipeline's steps in tasks of the pipeline that
/// merged it: dropped mid-item, those tasks still count into the merged
/// pipeline's stages, and the series follow them to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_pipeline_dropped_mid_item_is_published_to_the_end() {
    let addr = recorder();
    let merging = Pipeline::builder().with_name("merging").build();
    let merged = Pipeline::builder().with_name("merged").build();
    let (started_tx, started) = std::sync::mpsc::channel::<()>();
    let (release, go) = std::sync::mpsc::channel::<()>();
    let go = std::sync::Mutex::new(go);
    let slow = merged
        .iter(0..1u32)
        .map(move |n: &u32| {
            let _ = started_tx.send(());
            let _ = go.lock().unwrap().recv(); // until the test drops `release`
            *n
        })
        .named("slow");
    let flow = merging.iter(std::iter::empty::<u32>()).merge_with(slow);
    drop((merging, merged));
    let mut reading = Box::pin(flow.collect());
    // Polls the merge until its one call has started.
    tokio::select! {
        _ = &mut reading => panic!("the merge ended before its call"),
        started = tokio::task::spawn_blocking(move || started.recv()) => started.unwrap().unwrap(),
    }
    drop(reading); // every handle on both pipelines is gone, mid-call
    drop(release); // the call returns
    let key = r#"streamz_stage_items_total{pipeline="merged",stage="slow",outcome="emitted"}"#;
    // The publisher runs every second of real time: a bound of 30 s for a
    // broken run.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (page, series) = scrape(addr).await;
        if series.get(key) == Some(&1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the call that ended after the drop never showed: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
