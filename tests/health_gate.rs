//! The health gate: hysteresis and timing on a paused clock, backpressure
//! while closed, the closed-too-long policies, and bad checks.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use streamz::{
    ClosedPolicy, ConfigError, EdgeConfig, ErrorKind, GateError, GateState, Health, HealthCheck,
    HealthGate, Pipeline, TrySendError,
};
use support::{assert_conserved, settle, split, stage};
use tokio::sync::watch;
use tokio::time::Instant;

const TICK: Duration = Duration::from_millis(100);

/// A check that answers what `up` says, counting its calls.
fn switch(up: &Arc<AtomicBool>, calls: &Arc<AtomicUsize>) -> impl HealthCheck {
    let (up, calls) = (up.clone(), calls.clone());
    streamz::health_fn(move || {
        calls.fetch_add(1, Ordering::SeqCst);
        let healthy = up.load(Ordering::SeqCst);
        async move { healthy }
    })
}

/// Waits for the gate to reach `state`; returns when it did.
async fn reached(status: &mut watch::Receiver<streamz::GateStatus>, state: GateState) -> Instant {
    status
        .wait_for(|s| s.state == state)
        .await
        .expect("the gate's status channel stays open");
    Instant::now()
}

#[tokio::test(start_paused = true)]
async fn it_closes_after_n_unhealthy_answers_and_opens_after_m_healthy_ones() {
    let (up, calls) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicUsize::new(0)),
    );
    let gate = HealthGate::new(switch(&up, &calls))
        .with_interval(TICK)
        .with_failures_to_close(3)
        .with_successes_to_open(2);
    let handle = gate.handle();
    let mut status = handle.subscribe();
    let (tx, flow) = streamz::channel::<u32>();
    let out = tokio::spawn(flow.pipe(gate).collect());

    // Starts closed; the first check runs at once, the second opens it.
    let start = Instant::now();
    assert_eq!(reached(&mut status, GateState::Open).await - start, TICK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Down: checks at +100, +200, +300 ms; the third closes the gate.
    tokio::time::advance(Duration::from_millis(50)).await;
    up.store(false, Ordering::SeqCst);
    let went_down = Instant::now();
    let closed_at = reached(&mut status, GateState::Closed).await;
    assert_eq!(closed_at - went_down, Duration::from_millis(250));
    assert_eq!(handle.unhealthy_checks(), 3);
    assert_eq!(handle.closings(), 1);
    assert_eq!(
        handle.status().reason.as_deref(),
        Some("reported unhealthy")
    );

    // Up again: two healthy answers (+100, +200 ms) open it.
    up.store(true, Ordering::SeqCst);
    let opened_at = reached(&mut status, GateState::Open).await;
    assert_eq!(opened_at - closed_at, Duration::from_millis(200));
    assert_eq!(handle.status().reason, None);

    drop(tx);
    assert!(out.await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_single_blip_does_not_close_the_gate() {
    let (up, calls) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicUsize::new(0)),
    );
    let gate = HealthGate::new(switch(&up, &calls)).with_interval(TICK);
    let handle = gate.handle();
    let (tx, flow) = streamz::channel::<u32>();
    let out = tokio::spawn(flow.pipe(gate).collect());
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Two unhealthy answers in a row, fewer than the three that close it.
    up.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    up.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(handle.unhealthy_checks(), 2);
    assert_eq!(handle.closings(), 0);
    assert_eq!(handle.state(), GateState::Open);
    drop(tx);
    out.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn while_closed_the_producer_waits_and_no_item_is_lost() {
    let (up, calls) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let pipeline = Pipeline::with_edge(EdgeConfig::new(4, 4));
    let gate = HealthGate::new(switch(&up, &calls)).with_interval(TICK);
    let handle = gate.handle();
    let (tx, flow) = pipeline.channel::<u32>();
    let mut flow = flow.pipe(gate);

    // Closed from the start: the producer fills the source's buffer and
    // then has to wait; the gate takes nothing.
    let mut accepted = 0;
    loop {
        match tx.try_send(accepted) {
            Ok(()) => accepted += 1,
            Err(TrySendError::Full(_)) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(accepted, 4);
    let producer = tokio::spawn(async move {
        for i in 4..100 {
            tx.send(i).await.unwrap();
        }
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(handle.state(), GateState::Closed);
    assert!(!producer.is_finished(), "the producer did not wait");
    let gate_metrics = stage(&pipeline, "health_gate");
    assert_eq!(gate_metrics.received, 0);
    assert!(handle.checks() >= 100);

    // The dependency recovers: every item arrives, in order.
    up.store(true, Ordering::SeqCst);
    let mut got = Vec::new();
    while let Some(item) = flow.next().await {
        got.push(item.unwrap());
    }
    producer.await.unwrap();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    let m = stage(&pipeline, "health_gate");
    assert_eq!((m.received, m.emitted), (100, 100));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn a_watch_signal_moves_the_gate_without_waiting_for_the_next_poll() {
    let (health, signal) = watch::channel(true);
    let gate = HealthGate::new(signal)
        .with_interval(Duration::from_secs(3600))
        .with_failures_to_close(1);
    let handle = gate.handle();
    let mut status = handle.subscribe();
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let out = tokio::spawn(flow.pipe(gate).collect());
    let start = reached(&mut status, GateState::Open).await;
    health.send(false).unwrap();
    assert_eq!(reached(&mut status, GateState::Closed).await, start);
    health.send(true).unwrap();
    assert_eq!(reached(&mut status, GateState::Open).await, start);
    // A dropped signal reads as unhealthy at the next poll.
    drop(health);
    tokio::time::advance(Duration::from_secs(3600)).await;
    let reason = status
        .wait_for(|s| s.state == GateState::Closed)
        .await
        .unwrap()
        .reason
        .clone();
    assert_eq!(
        reason.as_deref(),
        Some("the health signal's sender was dropped")
    );
    // A closed gate holds even the end of its input: only an abort (or a
    // closed-too-long policy) ends it.
    drop(tx);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!out.is_finished());
    pipeline.abort();
    assert!(out.await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_check_that_panics_or_hangs_counts_as_unhealthy() {
    let calls = Arc::new(AtomicUsize::new(0));
    let check = streamz::health_fn({
        let calls = calls.clone();
        move || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => Health::Healthy,
                    1 => panic!("probe bug"),
                    _ => std::future::pending().await,
                }
            }
        }
    });
    let gate = HealthGate::new(check)
        .with_interval(TICK)
        .with_check_timeout(Duration::from_millis(50))
        .with_failures_to_close(1);
    let handle = gate.handle();
    let mut status = handle.subscribe();
    let pipeline = Pipeline::new();
    let (_tx, flow) = pipeline.channel::<u32>();
    let out = tokio::spawn(flow.pipe(gate).collect());
    reached(&mut status, GateState::Open).await;
    // The panic closes the gate, with the panic as the reason.
    reached(&mut status, GateState::Closed).await;
    let reason = handle.status().reason.unwrap();
    assert_eq!(reason, "the health check panicked: probe bug");
    // The next check hangs and is cut off: the reason follows.
    let reason = status
        .wait_for(|s| s.reason.as_deref() != Some(reason.as_str()))
        .await
        .unwrap()
        .reason
        .clone()
        .unwrap();
    assert_eq!(reason, "the health check took longer than 50ms");
    assert_eq!(handle.unhealthy_checks(), 2);
    pipeline.abort();
    out.await.unwrap();
}

/// A check that is never healthy.
fn down() -> impl HealthCheck {
    streamz::health_fn(|| async { Health::unhealthy("database unreachable") })
}

#[tokio::test(start_paused = true)]
async fn closed_too_long_fail_policy_ends_the_stream_with_an_error() {
    let pipeline = Pipeline::new();
    let gate = HealthGate::new(down())
        .with_interval(TICK)
        .with_closed_limit(Duration::from_secs(2), ClosedPolicy::Fail);
    let (tx, flow) = pipeline.channel::<u32>();
    let mut flow = flow.pipe(gate);
    tx.send(1).await.unwrap();
    let start = Instant::now();
    let err = flow.next().await.unwrap().unwrap_err();
    assert_eq!(Instant::now() - start, Duration::from_secs(2));
    assert_eq!(err.kind(), ErrorKind::GateClosed);
    assert!(!err.has_item());
    let source = err.cause().unwrap().downcast_ref::<GateError>().unwrap();
    assert_eq!(
        source.to_string(),
        "the health gate has been closed for longer than 2s: database unreachable"
    );
    assert!(flow.next().await.is_none());
    // The item that waited is counted, and the producer is told.
    assert!(tx.send(2).await.is_err());
    let m = stage(&pipeline, "health_gate");
    assert_eq!((m.received, m.aborted, m.failed), (1, 1, 0));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn closed_too_long_reject_policy_passes_items_as_errors_until_it_opens() {
    let (up, calls) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let pipeline = Pipeline::new();
    let gate = HealthGate::new(switch(&up, &calls))
        .with_interval(TICK)
        .with_closed_limit(Duration::from_secs(1), ClosedPolicy::Reject);
    let handle = gate.handle();
    let (tx, flow) = pipeline.channel::<u32>();
    let mut flow = flow.pipe(gate);
    for i in 0..3 {
        tx.send(i).await.unwrap();
    }
    let start = Instant::now();
    let (values, errors) = split(vec![
        flow.next().await.unwrap(),
        flow.next().await.unwrap(),
        flow.next().await.unwrap(),
    ]);
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
    assert!(values.is_empty());
    for (i, mut e) in errors.into_iter().enumerate() {
        assert_eq!(e.kind(), ErrorKind::GateClosed);
        assert_eq!(e.attempts(), 0, "the gate held it: never tried");
        assert_eq!(e.take_item::<u32>(), Some(i as u32));
    }
    // Healthy again: values pass as values.
    up.store(true, Ordering::SeqCst);
    let mut status = handle.subscribe();
    reached(&mut status, GateState::Open).await;
    tx.send(3).await.unwrap();
    assert_eq!(flow.next().await.unwrap().unwrap(), 3);
    drop(tx);
    assert!(flow.next().await.is_none());
    let m = stage(&pipeline, "health_gate");
    assert_eq!((m.received, m.failed, m.emitted), (4, 3, 1));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn wait_policy_keeps_waiting_and_abort_stops_a_closed_gate() {
    let pipeline = Pipeline::new();
    let gate = HealthGate::new(down())
        .with_interval(TICK)
        .with_closed_limit(Duration::from_secs(1), ClosedPolicy::Wait);
    let (tx, flow) = pipeline.channel::<u32>();
    let out = tokio::spawn(flow.pipe(gate).collect());
    tx.send(1).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!out.is_finished());
    assert_eq!(stage(&pipeline, "health_gate").received, 0);
    pipeline.abort();
    pipeline.join().await.unwrap();
    assert!(out.await.unwrap().is_empty());
    let m = stage(&pipeline, "health_gate");
    assert_eq!((m.received, m.aborted), (1, 1));
    assert_conserved(&m);
    // The checker stopped with the gate.
    assert_eq!(pipeline.running_tasks(), 0);
}

#[tokio::test(start_paused = true)]
async fn starting_open_passes_items_before_the_first_check_answers() {
    let (tx_gate, signal) = watch::channel(Health::unhealthy("slow to start"));
    let gate = HealthGate::new(signal).starting_open().with_interval(TICK);
    let handle = gate.handle();
    assert_eq!(handle.state(), GateState::Open);
    let out = streamz::iter(0..5u32).pipe(gate).collect().await;
    assert_eq!(out.len(), 5);
    drop(tx_gate);
}

#[tokio::test]
async fn bad_configuration_is_refused_when_piped() {
    let gate = || HealthGate::new(down());
    let field = |g| {
        let e: ConfigError = support::refused::<u32, u32, _>(g);
        assert_eq!(
            (e.operator(), e.stage()),
            (Some("HealthGate"), Some("health_gate"))
        );
        e.field()
    };
    assert_eq!(field(gate().with_interval(Duration::ZERO)), "interval");
    assert_eq!(
        field(gate().with_check_timeout(Duration::ZERO)),
        "check_timeout"
    );
    assert_eq!(field(gate().with_failures_to_close(0)), "failures_to_close");
    assert_eq!(field(gate().with_successes_to_open(0)), "successes_to_open");
    assert_eq!(
        field(gate().with_closed_limit(Duration::ZERO, ClosedPolicy::Fail)),
        "closed_limit"
    );
}

#[tokio::test(start_paused = true)]
async fn the_checker_ends_with_the_stream() {
    let pipeline = Pipeline::new();
    let gate = HealthGate::new(streamz::health_fn(|| async { true })).with_interval(TICK);
    let out = pipeline.iter(0..10u32).pipe(gate).collect().await;
    assert_eq!(out.len(), 10);
    pipeline.join().await.unwrap();
    settle().await;
    assert_eq!(pipeline.running_tasks(), 0);
}

/// A check whose change signal panics.
struct BrokenSignal(Arc<AtomicBool>);

impl HealthCheck for BrokenSignal {
    async fn check(&mut self) -> Health {
        Health::from(self.0.load(Ordering::SeqCst))
    }

    async fn changed(&mut self) {
        panic!("signal bug");
    }
}

#[tokio::test(start_paused = true)]
async fn a_change_signal_that_panics_leaves_the_gate_polling() {
    let up = Arc::new(AtomicBool::new(false));
    let gate = HealthGate::new(BrokenSignal(up.clone())).with_interval(TICK);
    let handle = gate.handle();
    let mut status = handle.subscribe();
    let (tx, flow) = streamz::channel::<u32>();
    let out = tokio::spawn(flow.pipe(gate).collect());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(handle.state(), GateState::Closed);
    up.store(true, Ordering::SeqCst);
    reached(&mut status, GateState::Open).await;
    tx.send(1).await.unwrap();
    drop(tx);
    assert_eq!(out.await.unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_graceful_shutdown_releases_what_waits_at_a_closed_gate_as_errors() {
    let pipeline = Pipeline::new();
    let gate = HealthGate::new(down()).with_interval(TICK);
    let (tx, flow) = pipeline.channel::<u32>();
    let out = tokio::spawn(flow.pipe(gate).collect());
    for i in 0..5 {
        tx.send(i).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!out.is_finished(), "closed: nothing passes");
    pipeline.shutdown();
    let out = tokio::time::timeout(Duration::from_secs(3600), out)
        .await
        .expect("a shutdown ends a closed gate")
        .unwrap();
    let (values, errors) = split(out);
    assert!(values.is_empty());
    assert_eq!(errors.len(), 5);
    for (i, mut e) in errors.into_iter().enumerate() {
        assert_eq!(e.kind(), ErrorKind::GateClosed);
        let source = e.cause().unwrap().downcast_ref::<GateError>().unwrap();
        assert!(
            matches!(source, GateError::ShutDownWhileClosed { reason } if reason == "database unreachable"),
            "{source:?}"
        );
        assert_eq!(e.take_item::<u32>(), Some(i as u32), "the item rides along");
    }
    tokio::time::timeout(Duration::from_secs(3600), pipeline.join())
        .await
        .expect("every task ends")
        .unwrap();
    let m = stage(&pipeline, "health_gate");
    assert_eq!((m.received, m.failed, m.aborted), (5, 5, 0));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn checks_keep_their_cadence_when_a_check_is_slow() {
    let started = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = started.clone();
    let t0 = Instant::now();
    // Each check takes 300 ms of a 1 s interval.
    let check = streamz::health_fn(move || {
        log.lock().unwrap().push(Instant::now() - t0);
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            true
        }
    });
    let gate = HealthGate::new(check).with_interval(Duration::from_secs(1));
    let (tx, flow) = Pipeline::new().channel::<u32>();
    let out = tokio::spawn(flow.pipe(gate).collect());
    tokio::time::sleep(Duration::from_millis(4500)).await;
    drop(tx);
    out.await.unwrap();
    let secs: Vec<u64> = started
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.as_millis() as u64)
        .collect();
    // Every interval from the first check, not every interval after the
    // previous one finished (which would be 0, 1300, 2600, 3900).
    assert_eq!(secs, [0, 1000, 2000, 3000, 4000]);
}

#[tokio::test(start_paused = true)]
async fn duration_max_settings_mean_never() {
    let calls = Arc::new(AtomicUsize::new(0));
    let up = Arc::new(AtomicBool::new(true));
    let gate = HealthGate::new(switch(&up, &calls))
        .with_interval(Duration::MAX)
        .with_check_timeout(Duration::MAX)
        .with_closed_limit(Duration::MAX, ClosedPolicy::Fail);
    let pipeline = Pipeline::new();
    let out = tokio::spawn(pipeline.iter(0..100u32).pipe(gate).collect());
    let out = tokio::time::timeout(Duration::from_secs(3600), out)
        .await
        .expect("the first check opens the gate; the pipeline ends")
        .unwrap();
    assert_eq!(out.len(), 100);
    // One check at the start, none scheduled after it.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// The gate opening in the same instant as a graceful shutdown, in both
/// orders: whichever the gate sees first, every item leaves once, as a
/// value or as a `gate_closed` error carrying it, and the pipeline ends.
/// (The loom models cover the checker's own lifecycle; this race is the
/// gate task's, decided in one task by the order it sees the two events.)
#[tokio::test(start_paused = true)]
async fn a_gate_opening_as_the_pipeline_shuts_down_loses_nothing() {
    for open_first in [true, false] {
        let pipeline = Pipeline::new();
        let (health, check) = watch::channel(Health::unhealthy("down"));
        let gate = HealthGate::new(check).with_interval(TICK);
        let (tx, flow) = pipeline.channel::<u32>();
        let out = tokio::spawn(flow.pipe(gate).collect());
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        settle().await;
        assert!(!out.is_finished(), "closed: nothing passes");
        // Both events before the gate's task runs again.
        if open_first {
            health.send(Health::Healthy).unwrap();
            pipeline.shutdown();
        } else {
            pipeline.shutdown();
            health.send(Health::Healthy).unwrap();
        }
        let out = tokio::time::timeout(Duration::from_secs(3600), out)
            .await
            .expect("the pipeline ends")
            .unwrap();
        let (values, errors) = split(out);
        let mut seen: Vec<u32> = values;
        for mut e in errors {
            assert_eq!(e.kind(), ErrorKind::GateClosed);
            seen.push(e.take_item::<u32>().expect("the item rides along"));
        }
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2, 3, 4], "open_first {open_first}");
        let m = stage(&pipeline, "health_gate");
        assert_eq!(m.received, 5);
        assert_conserved(&m);
    }
}
