//! The circuit breaker: every threshold and timing on a paused clock,
//! manual control, listeners and the audit trail, the operator's policies,
//! the breaker as a health check, and the registry.
#![cfg(feature = "circuit-breaker")]

mod support;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use streamz::breaker::{
    Breaker, BreakerConfig, BreakerRegistry, BreakerState, CallOutcome, CircuitBreaker,
    CircuitOpen, OpenBackoff, OpenPolicy, RegistryError, SlowCall, Window,
};
use streamz::{ErrorKind, GateState, HealthGate, Pipeline};
use support::{assert_conserved, split, stage};

const MS: Duration = Duration::from_millis(1);

fn n(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap()
}

/// A small config: window of 10 calls, at least 4, 50 %, open 1 s, two
/// trial calls that must both succeed.
fn config() -> BreakerConfig {
    let mut c = BreakerConfig::default();
    c.window = Window::Count(n(10));
    c.minimum_calls = n(4);
    c.open_for = Duration::from_secs(1);
    c.half_open_calls = n(2);
    c.successes_to_close = n(2);
    c
}

fn ok(b: &Breaker) {
    b.try_acquire().unwrap().success(MS);
}

fn fail(b: &Breaker) {
    b.try_acquire().unwrap().failure(MS);
}

#[tokio::test(start_paused = true)]
async fn the_failure_rate_opens_it_only_after_the_minimum_calls() {
    let b = Breaker::new("b", config());
    // 3 failures: 100 %, but fewer than the 4 calls needed to judge.
    for _ in 0..3 {
        fail(&b);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    fail(&b);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(
        b.audit_trail()[0].reason,
        "failure rate 100% over 4 calls (threshold 50%)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rate_below_the_threshold_keeps_it_closed_and_the_count_window_slides() {
    let b = Breaker::new("b", config());
    // 4 failures in 10 calls, never 50 % from the fourth call on.
    for i in 0..10 {
        if [3, 4, 8, 9].contains(&i) {
            fail(&b)
        } else {
            ok(&b)
        }
    }
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.metrics().window_calls, 10);
    assert!((b.metrics().failure_rate.unwrap() - 0.4).abs() < 1e-9);
    // The oldest calls slide out: 10 successes bring the rate to 0.
    for _ in 0..10 {
        ok(&b);
    }
    assert_eq!(b.metrics().failure_rate, Some(0.0));
}

#[tokio::test(start_paused = true)]
async fn a_time_window_forgets_old_failures() {
    let mut c = config();
    c.window = Window::Time(Duration::from_secs(10));
    let b = Breaker::new("b", c);
    fail(&b);
    fail(&b);
    tokio::time::advance(Duration::from_secs(11)).await;
    // The two old failures are gone: 2 failures of 4 calls would open it.
    ok(&b);
    ok(&b);
    fail(&b);
    assert_eq!(b.metrics().window_calls, 3);
    assert_eq!(b.state(), BreakerState::Closed);
    fail(&b);
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_open_it_without_waiting_for_the_minimum() {
    let mut c = config();
    c.window = Window::Count(n(100));
    c.minimum_calls = n(100);
    c.consecutive_failures = Some(n(3));
    let b = Breaker::new("b", c);
    fail(&b);
    fail(&b);
    ok(&b); // the run restarts
    fail(&b);
    fail(&b);
    assert_eq!(b.state(), BreakerState::Closed);
    fail(&b);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.audit_trail()[0].reason, "3 consecutive failures");
}

#[tokio::test(start_paused = true)]
async fn the_slow_call_rate_opens_it() {
    let mut c = config();
    c.slow_call = Some(SlowCall {
        duration: Duration::from_millis(500),
        rate: 0.75,
    });
    let b = Breaker::new("b", c);
    b.try_acquire().unwrap().success(Duration::from_millis(499));
    for _ in 0..2 {
        b.try_acquire().unwrap().success(Duration::from_millis(500));
    }
    assert_eq!(b.state(), BreakerState::Closed);
    // 3 slow of 4: 75 %.
    b.try_acquire().unwrap().success(Duration::from_secs(3));
    assert_eq!(b.state(), BreakerState::Open);
    assert!(b.audit_trail()[0].reason.starts_with("slow-call rate 75%"));
    assert_eq!(b.metrics().slow_calls, 3);
}

/// Opens `b` (config(): 4 failures).
fn open(b: &Breaker) {
    for _ in 0..4 {
        fail(b);
    }
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn open_refuses_until_the_open_duration_then_half_open_permits_only_the_trial_calls() {
    let b = Breaker::new("b", config());
    open(&b);
    tokio::time::advance(Duration::from_millis(999)).await;
    let refused = b.try_acquire().unwrap_err();
    assert_eq!(refused.state(), BreakerState::Open);
    assert_eq!(refused.retry_in(), Some(MS));
    tokio::time::advance(MS).await;
    let first = b.try_acquire().unwrap();
    assert_eq!(b.state(), BreakerState::HalfOpen);
    let second = b.try_acquire().unwrap();
    assert_eq!(b.try_acquire().unwrap_err().state(), BreakerState::HalfOpen);
    first.success(MS);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    // A slot used by a finished trial is not given again.
    assert!(b.try_acquire().is_err());
    second.success(MS);
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.metrics().window_calls, 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_trial_reopens_it_for_longer_with_backoff_up_to_the_cap() {
    let mut c = config();
    c.open_backoff = Some(OpenBackoff {
        factor: 2.0,
        max: Duration::from_secs(5),
    });
    let b = Breaker::new("b", c);
    open(&b);
    let mut waited = Vec::new();
    for _ in 0..4 {
        let opened = tokio::time::Instant::now();
        let permit = b.acquire().await; // waits for the half-open trial
        waited.push(opened.elapsed());
        permit.failure(MS);
        assert_eq!(b.state(), BreakerState::Open);
    }
    let secs = |s| Duration::from_secs(s);
    assert_eq!(waited, [secs(1), secs(2), secs(4), secs(5)]);
    // Closing resets the backoff.
    tokio::time::advance(secs(5)).await;
    ok(&b);
    ok(&b);
    assert_eq!(b.state(), BreakerState::Closed);
    open(&b);
    let opened = tokio::time::Instant::now();
    b.acquire().await.success(MS);
    assert_eq!(opened.elapsed(), secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_trial_call_frees_its_slot() {
    let b = Breaker::new("b", config());
    open(&b);
    tokio::time::advance(Duration::from_secs(1)).await;
    let a = b.try_acquire().unwrap();
    let c = b.try_acquire().unwrap();
    assert!(b.try_acquire().is_err());
    assert_eq!(b.metrics().trials_in_flight, 2);
    drop(a); // cancelled: no outcome
    assert_eq!(b.metrics().trials_in_flight, 1);
    b.try_acquire().unwrap().success(MS);
    c.success(MS);
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.metrics().cancelled, 1);
}

#[tokio::test(start_paused = true)]
async fn the_minimum_interval_holds_back_a_transition_until_it_passes() {
    let mut c = config();
    c.min_transition_interval = Duration::from_secs(10);
    c.open_for = Duration::from_secs(1);
    let b = Breaker::new("b", c);
    // Closed since t=0: opening at t=2 s waits until t=10 s.
    tokio::time::advance(Duration::from_secs(2)).await;
    open_pending(&b);
    assert_eq!(b.state(), BreakerState::Closed);
    tokio::time::advance(Duration::from_secs(8)).await;
    // The next call applies the pending transition, and is refused.
    assert!(b.try_acquire().is_err());
    assert_eq!(b.state(), BreakerState::Open);
    // Open lasts at least the minimum interval, not just open_for.
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(b.try_acquire().is_err());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(b.try_acquire().is_ok());
}

fn open_pending(b: &Breaker) {
    for _ in 0..4 {
        fail(b);
    }
}

#[tokio::test(start_paused = true)]
async fn manual_control_and_listeners_and_a_bounded_audit_trail() {
    let mut c = config();
    c.audit_capacity = 3;
    let b = Breaker::new("b", c);
    let seen = Arc::new(Mutex::new(Vec::new()));
    b.on_transition({
        let seen = seen.clone();
        move |t| seen.lock().unwrap().push((t.from, t.to))
    });
    b.on_transition(|_| panic!("a broken alert hook"));
    b.force_open();
    assert!(b.try_acquire().is_err());
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(
        b.try_acquire().unwrap_err().state(),
        BreakerState::ForcedOpen
    );
    b.disable();
    for _ in 0..50 {
        fail(&b);
    }
    assert_eq!(b.state(), BreakerState::Disabled);
    b.reset();
    assert_eq!(b.state(), BreakerState::Closed);
    open(&b);
    use BreakerState::*;
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (Closed, ForcedOpen),
            (ForcedOpen, Disabled),
            (Disabled, Closed),
            (Closed, Open)
        ]
    );
    let trail: Vec<_> = b.audit_trail().into_iter().map(|t| t.to).collect();
    assert_eq!(trail, [Disabled, Closed, Open]);
    let m = b.metrics();
    assert_eq!((m.transitions, m.failures, m.state), (4, 54, Open));
}

#[tokio::test(start_paused = true)]
async fn the_operator_rejects_while_open_with_the_item_in_the_error() {
    let b = Breaker::new("ledger", config());
    let pipeline = Pipeline::new();
    let stage_ = CircuitBreaker::new(b.clone(), |x: &u32| {
        let x = *x;
        async move { if x < 4 { Err("down") } else { Ok(x * 10) } }
    })
    .named("post");
    let out = pipeline.iter(0..10u32).pipe(stage_).collect().await;
    let (values, errors) = split(out);
    assert!(values.is_empty());
    assert_eq!(errors.len(), 10);
    for (i, mut e) in errors.into_iter().enumerate() {
        let expected = if i < 4 {
            ErrorKind::Failed
        } else {
            ErrorKind::CircuitOpen
        };
        assert_eq!((e.kind(), e.stage()), (expected, "post"));
        if i >= 4 {
            let open = e.cause().unwrap().downcast_ref::<CircuitOpen>().unwrap();
            assert_eq!(open.breaker(), "ledger");
        }
        assert_eq!(e.take_item::<u32>(), Some(i as u32));
    }
    let m = stage(&pipeline, "post");
    assert_eq!((m.received, m.failed), (10, 10));
    assert_conserved(&m);
    assert_eq!(b.metrics().rejected, 6);
}

#[tokio::test(start_paused = true)]
async fn the_operator_builds_no_call_for_a_refused_item_and_counts_a_panic_as_a_failure() {
    let b = Breaker::new("ledger", config());
    let built = Arc::new(AtomicU32::new(0));
    let pipeline = Pipeline::new();
    let calls = built.clone();
    let stage_ = CircuitBreaker::new(b.clone(), move |x: &u32| {
        calls.fetch_add(1, Ordering::SeqCst);
        let x = *x;
        async move {
            if x == 0 {
                panic!("the ledger client panicked");
            }
            Err::<u32, _>("down")
        }
    })
    .named("post");
    let out = pipeline.iter(0..10u32).pipe(stage_).collect().await;
    let kinds: Vec<ErrorKind> = out.iter().map(|r| r.as_ref().unwrap_err().kind()).collect();
    // The panic and three errors make four failures: the breaker opens
    // (the minimum is 4) and the other six are refused unbuilt.
    assert_eq!(kinds[0], ErrorKind::Panicked);
    assert_eq!(kinds[1..4], [ErrorKind::Failed; 3]);
    assert_eq!(kinds[4..], [ErrorKind::CircuitOpen; 6]);
    assert_eq!(built.load(Ordering::SeqCst), 4);
    let m = b.metrics();
    assert_eq!(
        (m.permitted, m.failures, m.cancelled, m.rejected),
        (4, 4, 0, 6)
    );
    assert_conserved(&stage(&pipeline, "post"));
}

#[tokio::test(start_paused = true)]
async fn the_operator_waits_while_open_under_the_wait_policy() {
    let b = Breaker::new("b", config());
    open(&b);
    let start = tokio::time::Instant::now();
    let stage_ = CircuitBreaker::new(b.clone(), |x: &u32| {
        let x = *x;
        async move { Ok::<_, &str>(x) }
    })
    .with_open_policy(OpenPolicy::Wait)
    .with_concurrency(4);
    let out = streamz::iter(0..6u32).pipe(stage_).collect().await;
    let values: Vec<u32> = out.into_iter().map(Result::unwrap).collect();
    assert_eq!(values, [0, 1, 2, 3, 4, 5]);
    // Waited for the open second, then two trials closed it.
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(b.state(), BreakerState::Closed);
}

/// A pipeline gated on `b` (closing on one unhealthy answer), once its gate
/// has opened: the gate's handle and status, the input, the output task.
async fn gate_on(
    b: &Breaker,
    interval: Duration,
) -> (
    streamz::GateHandle,
    tokio::sync::watch::Receiver<streamz::GateStatus>,
    streamz::Pusher<u32>,
    tokio::task::JoinHandle<Vec<streamz::Result<u32>>>,
) {
    let gate = HealthGate::new(b.clone())
        .with_interval(interval)
        .with_failures_to_close(1);
    let handle = gate.handle();
    let mut status = handle.subscribe();
    let (tx, flow) = streamz::channel::<u32>();
    let out = tokio::spawn(flow.pipe(gate).collect());
    status
        .wait_for(|s| s.state == GateState::Open)
        .await
        .unwrap();
    (handle, status, tx, out)
}

#[tokio::test(start_paused = true)]
async fn a_breaker_gates_a_pipeline_ingress() {
    let b = Breaker::new("db", config());
    let (handle, mut status, tx, out) = gate_on(&b, Duration::from_secs(60)).await;
    // The breaker opens: the gate follows at once, not at the next poll.
    let at = tokio::time::Instant::now();
    open(&b);
    status
        .wait_for(|s| s.state == GateState::Closed)
        .await
        .unwrap();
    assert_eq!(at.elapsed(), Duration::ZERO);
    assert_eq!(
        handle.status().reason.as_deref(),
        Some("circuit breaker `db` is Open")
    );
    b.reset();
    status
        .wait_for(|s| s.state == GateState::Open)
        .await
        .unwrap();
    tx.send(1).await.unwrap();
    drop(tx);
    assert_eq!(out.await.unwrap().len(), 1);
}

#[test]
fn the_registry_builds_breakers_from_defaults_and_overrides_up_to_a_limit() {
    let registry = BreakerRegistry::from_toml(
        r#"
        max_breakers = 2
        [defaults]
        window = { time = "60s" }
        failure_rate = 0.25
        open_for = "30s"
        [breakers.pgmq]
        consecutive_failures = 3
        open_for = "15s"
        open_backoff = { factor = 2.0, max = "2m" }
        "#,
    )
    .unwrap();
    let pgmq = registry.get("pgmq").unwrap();
    let c = pgmq.config();
    assert_eq!(c.window, Window::Time(Duration::from_secs(60)));
    assert_eq!(
        (c.failure_rate, c.open_for),
        (0.25, Duration::from_secs(15))
    );
    assert_eq!(c.consecutive_failures, Some(n(3)));
    let other = registry.get("search").unwrap();
    assert_eq!(other.config().open_for, Duration::from_secs(30));
    assert_eq!(other.config().consecutive_failures, None);
    // The same name is the same shared breaker.
    registry.get("pgmq").unwrap().force_open();
    assert_eq!(pgmq.state(), BreakerState::ForcedOpen);
    let err = registry.get("third").unwrap_err();
    assert!(matches!(err, RegistryError::LimitReached { max: 2, .. }));
    assert_eq!(
        err.to_string(),
        "the registry holds its limit of 2 circuit breakers; `third` was not created"
    );
    assert_eq!(registry.metrics().len(), 2);
}

#[test]
fn bad_configuration_is_rejected_with_the_field_named() {
    let err = BreakerRegistry::from_toml("[breakers.x]\nfailure_rate = 0").unwrap_err();
    assert_eq!(
        err.to_string(),
        "circuit breaker `x`: `failure_rate` must be a rate above 0 and at most 1"
    );
    let err = BreakerRegistry::from_toml("[defaults]\nopen_for = \"0s\"").unwrap_err();
    assert!(
        err.to_string()
            .contains("`open_for` must be greater than zero")
    );
    let err = BreakerRegistry::from_toml("[defaults]\nfailure_treshold = 3").unwrap_err();
    assert!(
        err.to_string().contains("unknown field `failure_treshold`"),
        "{err}"
    );
    let mut c = config();
    c.successes_to_close = n(3);
    assert!(Breaker::new("b", c).validate().is_err());
    let mut c = config();
    c.open_backoff = Some(OpenBackoff {
        factor: 0.5,
        max: Duration::from_secs(1),
    });
    assert!(Breaker::new("b", c).validate().is_err());
    let mut c = config();
    c.slow_call = Some(SlowCall {
        duration: Duration::ZERO,
        rate: 0.5,
    });
    assert!(Breaker::new("b", c).validate().is_err());
    let zero = CircuitBreaker::new(Breaker::new("b", config()), |_: &u8| async {
        Ok::<u8, &str>(0)
    })
    .with_concurrency(0);
    assert_eq!(
        streamz::iter([1u8]).try_pipe(zero).unwrap_err().field(),
        "concurrency"
    );
}

#[tokio::test(start_paused = true)]
async fn around_a_processor_each_output_settles_its_permit() {
    let mut c = config();
    c.window = Window::Count(n(1000));
    c.minimum_calls = n(1000); // stays closed: only counting here
    let b = Breaker::new("b", c);
    let inner = streamz::AsyncMapper::new(|x: &u32| {
        let x = *x;
        async move { if x % 3 == 0 { Err("bad") } else { Ok(x) } }
    })
    .named("call")
    .with_concurrency(4);
    let pipeline = Pipeline::new();
    let input: Vec<streamz::Result<u32>> = (0..30)
        .map(|i| {
            if i == 7 {
                Err(streamz::StreamError::failed("source", "torn record"))
            } else {
                Ok(i)
            }
        })
        .collect();
    let out = pipeline
        .try_stream(futures::stream::iter(input))
        .pipe(CircuitBreaker::around(b.clone(), inner).named("guard"))
        .collect()
        .await;
    let (values, errors) = split(out);
    assert_eq!(values.len(), 19);
    assert_eq!(errors.len(), 11); // 10 failures of the call, 1 from the source
    let m = b.metrics();
    // The source's error passed through without a permit or an outcome.
    assert_eq!((m.permitted, m.successes, m.failures), (29, 19, 10));
    assert_eq!(m.cancelled, 0);
    for name in ["guard", "call", "guard.settle"] {
        assert_conserved(&stage(&pipeline, name));
    }
}

#[tokio::test(start_paused = true)]
async fn around_an_open_breaker_refuses_values_and_passes_errors() {
    let b = Breaker::new("b", config());
    b.force_open();
    let inner = streamz::Stage::new("inner", streamz::Map::new(|x: &u32| x + 1));
    let input: Vec<streamz::Result<u32>> = vec![
        Ok(1),
        Err(streamz::StreamError::failed("source", "torn")),
        Ok(2),
    ];
    let out = streamz::try_stream(futures::stream::iter(input))
        .pipe(CircuitBreaker::around(b.clone(), inner))
        .collect()
        .await;
    let mut errors = split(out).1;
    assert_eq!(errors.len(), 3);
    assert_eq!(errors[1].stage(), "source");
    for i in [0, 2] {
        assert_eq!(
            (errors[i].kind(), errors[i].stage(), errors[i].attempts()),
            (ErrorKind::CircuitOpen, "circuit_breaker", 0)
        );
    }
    assert_eq!(errors[2].take_item::<u32>(), Some(2));
    assert_eq!(b.metrics().rejected, 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_trial_is_not_undone_by_later_successes_while_a_transition_waits() {
    let mut c = config();
    c.half_open_calls = n(3);
    c.successes_to_close = n(2);
    c.min_transition_interval = Duration::from_millis(500);
    let b = Breaker::new("b", c);
    tokio::time::advance(Duration::from_millis(500)).await;
    open(&b);
    tokio::time::advance(Duration::from_secs(1)).await;
    let trials: Vec<_> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
    let mut trials = trials.into_iter();
    trials.next().unwrap().failure(MS); // within the interval: waits
    trials.next().unwrap().success(MS);
    trials.next().unwrap().success(MS);
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(
        b.audit_trail().last().unwrap().reason,
        "a trial call failed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_gate_on_an_idle_breaker_reopens_when_the_open_period_ends() {
    let b = Breaker::new("db", config());
    let (_handle, mut status, tx, out) = gate_on(&b, Duration::from_millis(100)).await;
    open(&b);
    status
        .wait_for(|s| s.state == GateState::Closed)
        .await
        .unwrap();
    // Nobody calls the breaker: reading its state ends the open period.
    let closed_at = tokio::time::Instant::now();
    status
        .wait_for(|s| s.state == GateState::Open)
        .await
        .unwrap();
    assert_eq!(closed_at.elapsed(), Duration::from_secs(1));
    assert_eq!(b.state(), BreakerState::HalfOpen);
    drop(tx);
    out.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_listener_may_call_back_into_the_breaker() {
    let b = Breaker::new("b", config());
    let seen = Arc::new(Mutex::new(Vec::new()));
    b.on_transition({
        let (b, seen) = (b.clone(), seen.clone());
        move |t| {
            seen.lock().unwrap().push(t.to);
            // An automatic reset on opening, and a listener added from a
            // listener: neither deadlocks.
            if t.to == BreakerState::Open {
                b.on_transition(|_| {});
                b.reset();
            }
            let _ = b.state();
        }
    });
    open_pending(&b);
    assert_eq!(b.state(), BreakerState::Closed);
    use BreakerState::*;
    assert_eq!(*seen.lock().unwrap(), [Open, Closed]);
    let trail: Vec<_> = b.audit_trail().iter().map(|t| (t.from, t.to)).collect();
    assert_eq!(trail, [(Closed, Open), (Open, Closed)]);
}

#[tokio::test(start_paused = true)]
async fn around_matches_outputs_by_position_not_by_stage_name() {
    let b = Breaker::new("b", config());
    // Upstream errors named like the inner stage settle nothing.
    let input: Vec<streamz::Result<u32>> = (0..10)
        .map(|i| {
            if i % 2 == 0 {
                Err(streamz::StreamError::failed("inner", "upstream"))
            } else {
                Ok(i)
            }
        })
        .collect();
    let inner = streamz::Stage::new("inner", streamz::Map::new(|x: &u32| x + 1));
    let out = streamz::try_stream(futures::stream::iter(input))
        .pipe(CircuitBreaker::around(b.clone(), inner))
        .collect()
        .await;
    assert_eq!(out.len(), 10);
    let m = b.metrics();
    assert_eq!((m.permitted, m.successes, m.failures), (5, 5, 0));
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn minimum_calls_above_a_count_window_is_allowed_and_never_judges_the_rate() {
    let mut c = config();
    c.window = Window::Count(n(5));
    c.minimum_calls = n(10);
    let b = Breaker::new("b", c);
    assert_eq!(b.validate(), Ok(()));
    for _ in 0..50 {
        fail(&b);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    let m = b.metrics();
    assert_eq!((m.window_calls, m.window_failures), (5, 5));
    assert_eq!(m.failure_rate, None, "never evaluated");
    // Failures in a row still open it.
    c.consecutive_failures = Some(n(3));
    let b = Breaker::new("b", c);
    for _ in 0..3 {
        fail(&b);
    }
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn rates_are_not_evaluated_below_the_minimum_calls() {
    let mut c = config();
    c.slow_call = Some(SlowCall {
        duration: Duration::from_secs(1),
        rate: 1.0,
    });
    let b = Breaker::new("b", c);
    let m = b.metrics();
    assert_eq!((m.failure_rate, m.slow_call_rate), (None, None));
    fail(&b);
    b.try_acquire().unwrap().success(Duration::from_secs(2)); // slow
    ok(&b);
    let m = b.metrics();
    assert_eq!(
        (m.window_calls, m.window_failures, m.window_slow_calls),
        (3, 1, 1)
    );
    assert_eq!((m.failure_rate, m.slow_call_rate), (None, None));
    ok(&b); // the fourth call: judged from now on
    let m = b.metrics();
    assert_eq!((m.failure_rate, m.slow_call_rate), (Some(0.25), Some(0.25)));
}

#[tokio::test(start_paused = true)]
async fn a_call_leaves_a_time_window_exactly_its_length_after_it_was_recorded() {
    let mut c = config();
    c.window = Window::Time(Duration::from_secs(10));
    let b = Breaker::new("b", c);
    tokio::time::advance(Duration::from_secs(3)).await;
    fail(&b); // recorded at t = 3 s
    tokio::time::advance(Duration::from_secs(10) - Duration::from_nanos(1)).await;
    assert_eq!(b.metrics().window_calls, 1, "still in at t + 10 s - 1 ns");
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert_eq!(b.metrics().window_calls, 0, "gone at t + 10 s");
}

#[tokio::test(start_paused = true)]
async fn no_call_stays_in_a_time_window_longer_than_the_window() {
    // Calls at every 100 ms over 30 s of a 10 s window (and of a 2.5 s
    // one, whose buckets are a tenth of it): each one is counted at most
    // the window's length after it was made, and at least the length less
    // one bucket.
    for (span, bucket) in [(10_000u64, 1_000u64), (2_500, 250)] {
        let mut c = config();
        c.window = Window::Time(Duration::from_millis(span));
        c.minimum_calls = n(1_000_000); // never opens: only counting
        let b = Breaker::new("b", c);
        let start = tokio::time::Instant::now();
        let mut made: Vec<u64> = Vec::new();
        for _ in 0..300 {
            let now = start.elapsed().as_millis() as u64;
            made.push(now);
            ok(&b);
            let in_window = made.iter().filter(|&&t| now < t + span).count() as u64;
            let at_least = made.iter().filter(|&&t| now < t + span - bucket).count() as u64;
            let counted = b.metrics().window_calls;
            assert!(
                (at_least..=in_window).contains(&counted),
                "span {span} at {now} ms: {counted} counted, {at_least}..={in_window} allowed"
            );
            tokio::time::advance(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_ignored_call_leaves_every_count_unchanged() {
    let b = Breaker::new("b", config());
    fail(&b);
    ok(&b);
    let before = b.metrics();
    b.try_acquire().unwrap().ignore();
    b.try_acquire().unwrap().report(CallOutcome::Ignored);
    let after = b.metrics();
    assert_eq!(after.ignored, 2);
    assert_eq!(
        (
            after.successes,
            after.failures,
            after.window_calls,
            after.window_failures,
            after.failure_rate
        ),
        (
            before.successes,
            before.failures,
            before.window_calls,
            before.window_failures,
            before.failure_rate
        )
    );
    // An ignored trial frees its slot: half-open does not get stuck.
    b.transition_to(BreakerState::HalfOpen, "test", "try it");
    b.try_acquire().unwrap().ignore();
    b.try_acquire().unwrap().ignore();
    ok(&b);
    ok(&b);
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn manual_transitions_reach_every_state_from_every_state() {
    use BreakerState::*;
    let states = [Closed, Open, HalfOpen, ForcedOpen, Disabled];
    for from in states {
        for to in states {
            let b = Breaker::new("b", config());
            let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let listened = seen.clone();
            b.on_transition(move |t| listened.lock().unwrap().push(t.clone()));
            b.transition_to(from, "setup", "from");
            assert_eq!(b.state(), from);
            let before = b.audit_trail().len();
            b.transition_to(to, "alice", format!("{from:?} to {to:?}"));
            assert_eq!(b.state(), to, "{from:?} -> {to:?}");
            let trail = b.audit_trail();
            if from == to {
                assert_eq!(trail.len(), before, "no transition to the same state");
                continue;
            }
            let t = trail.last().unwrap();
            assert_eq!((t.from, t.to), (from, to));
            assert_eq!(t.by.as_deref(), Some("alice"));
            assert_eq!(t.reason, format!("{from:?} to {to:?}"));
            assert_eq!(seen.lock().unwrap().last(), Some(t), "listeners see it too");
            // What each state does afterwards.
            match to {
                Closed | Disabled | HalfOpen => assert!(b.try_acquire().is_ok()),
                Open | ForcedOpen => assert!(b.try_acquire().is_err()),
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn opened_by_hand_it_recovers_normally_and_forced_open_it_does_not() {
    let b = Breaker::new("b", config()); // open for 1 s
    b.transition_to(BreakerState::Open, "on-call", "maintenance");
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(b.state(), BreakerState::Open);
    tokio::time::advance(MS).await;
    assert_eq!(b.state(), BreakerState::HalfOpen);
    let t = b.audit_trail().last().unwrap().clone();
    assert_eq!(
        (t.by, t.reason.as_str()),
        (None, "the open duration passed")
    );
    ok(&b);
    ok(&b);
    assert_eq!(b.state(), BreakerState::Closed);

    b.transition_to(BreakerState::ForcedOpen, "on-call", "hold it");
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(b.state(), BreakerState::ForcedOpen);
    // Half-open by hand: "try it now".
    b.transition_to(BreakerState::HalfOpen, "on-call", "try it");
    fail(&b);
    assert_eq!(b.state(), BreakerState::Open, "a failed trial reopens it");
}

#[tokio::test(start_paused = true)]
async fn a_manual_transition_ignores_the_minimum_interval() {
    let mut c = config();
    c.min_transition_interval = Duration::from_secs(60);
    let b = Breaker::new("b", c);
    b.transition_to(BreakerState::Open, "a", "1");
    b.transition_to(BreakerState::Closed, "a", "2");
    b.transition_to(BreakerState::HalfOpen, "a", "3");
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(b.audit_trail().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn rejections_are_counted_per_state() {
    let b = Breaker::new("b", config());
    b.force_open();
    for _ in 0..3 {
        assert!(b.try_acquire().is_err());
    }
    assert_eq!(b.metrics().rejected_in_state, 3);
    b.transition_to(BreakerState::Open, "a", "b");
    assert!(b.try_acquire().is_err());
    let m = b.metrics();
    assert_eq!((m.rejected, m.rejected_in_state), (4, 1));
}

const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Open, and still open (refusing, with no reachable time to retry at) a
/// century later.
async fn assert_open_for_good(b: &Breaker) {
    tokio::time::advance(CENTURY).await;
    assert_eq!(b.state(), BreakerState::Open, "never half-open by itself");
    let refused = b.try_acquire().unwrap_err();
    assert_eq!(refused.state(), BreakerState::Open);
    // `None` for never; a value the clock cannot reach is as good.
    assert!(
        refused.retry_in().is_none_or(|d| d > 1000 * CENTURY),
        "{:?}",
        refused.retry_in()
    );
    // A waiting caller waits (it neither panics nor gets a permit) ...
    assert!(
        tokio::time::timeout(CENTURY, b.acquire()).await.is_err(),
        "no permit while open for good"
    );
    // ... until a manual transition.
    b.reset();
    assert_eq!(b.state(), BreakerState::Closed);
    ok(b);
}

#[tokio::test(start_paused = true)]
async fn an_open_duration_of_duration_max_means_open_until_reset() {
    for open_for in [Duration::MAX, Duration::new(u64::MAX, 0)] {
        let mut c = config();
        c.open_for = open_for;
        let b = Breaker::new("b", c);
        open(&b);
        if open_for == Duration::MAX {
            assert_eq!(b.try_acquire().unwrap_err().retry_in(), None);
        }
        assert_open_for_good(&b).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_huge_open_duration_or_backoff_from_toml_never_panics_or_half_opens() {
    // `open_for` at the largest value humantime reads.
    let registry = BreakerRegistry::from_toml(
        r#"
        [breakers.forever]
        minimum_calls = 4
        open_for = "18446744073709551615s"
        [breakers.backoff]
        minimum_calls = 4
        open_for = "1s"
        half_open_calls = 1
        successes_to_close = 1
        open_backoff = { factor = 1e300, max = "18446744073709551615s" }
        "#,
    )
    .unwrap();
    let forever = registry.get("forever").unwrap();
    open(&forever);
    assert_open_for_good(&forever).await;

    // The first opening lasts 1 s; the trial fails; the second would last
    // 1e300 s, past any clock: capped at `max`, which is never.
    let backoff = registry.get("backoff").unwrap();
    open(&backoff);
    let permit = tokio::time::timeout(Duration::from_secs(2), backoff.acquire())
        .await
        .expect("half-open after the first, short opening");
    permit.failure(MS);
    assert_open_for_good(&backoff).await;

    // Beyond a `Duration`: a typed error, not a panic.
    let err =
        BreakerRegistry::from_toml("[defaults]\nopen_for = \"18446744073709551616s\"").unwrap_err();
    assert!(matches!(err, RegistryError::Parse(_)), "{err}");
}

#[tokio::test(start_paused = true)]
async fn an_endless_minimum_interval_keeps_the_breaker_where_it_is() {
    let mut c = config();
    c.min_transition_interval = Duration::MAX;
    let b = Breaker::new("b", c);
    for _ in 0..4 {
        fail(&b);
    }
    tokio::time::advance(CENTURY).await;
    assert_eq!(b.state(), BreakerState::Closed, "the opening never comes");
    // A waiting caller is not left sleeping on an overflowed deadline.
    assert!(tokio::time::timeout(MS, b.acquire()).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_restored_open_breaker_keeps_the_rest_of_its_open_time() {
    let mut c = config();
    c.open_for = Duration::from_secs(60);
    let before = Breaker::new("b", c);
    open(&before);
    tokio::time::advance(Duration::from_secs(20)).await;
    let saved = serde_json::to_string(&before.snapshot()).unwrap();

    // A restart: a new breaker from the same configuration.
    let after = Breaker::new("b", c);
    let transitions = Arc::new(Mutex::new(Vec::new()));
    let seen = transitions.clone();
    after.on_transition(move |t| seen.lock().unwrap().push((t.to, t.reason.clone())));
    after.restore(&serde_json::from_str(&saved).unwrap());
    assert_eq!(after.state(), BreakerState::Open);
    assert!(after.try_acquire().is_err());
    assert_eq!(
        transitions.lock().unwrap().as_slice(),
        [(BreakerState::Open, "restored from a snapshot".to_owned())]
    );
    // 40 s were left (less the few microseconds of wall clock this test
    // took): still open at 39 s, half-open by 41 s.
    tokio::time::advance(Duration::from_secs(39)).await;
    assert_eq!(after.state(), BreakerState::Open);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(after.state(), BreakerState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn an_open_time_that_ran_out_while_down_goes_half_open_at_once() {
    let before = Breaker::new("b", config());
    open(&before);
    let mut snapshot = before.snapshot();
    snapshot.open_until = Some(std::time::SystemTime::now() - Duration::from_secs(5));
    let after = Breaker::new("b", config());
    after.restore(&snapshot);
    assert_eq!(after.state(), BreakerState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn the_backoff_carries_over_a_restart() {
    let mut c = config();
    c.open_backoff = Some(OpenBackoff {
        factor: 2.0,
        max: Duration::from_secs(60),
    });
    let before = Breaker::new("b", c);
    open(&before); // open 1 s
    tokio::time::advance(Duration::from_secs(1)).await;
    fail(&before); // a trial call fails: open 2 s
    assert_eq!(before.state(), BreakerState::Open);
    let snapshot = before.snapshot();
    assert_eq!(snapshot.opens_in_a_row, 2);

    let after = Breaker::new("b", c);
    after.restore(&snapshot);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(after.state(), BreakerState::HalfOpen);
    fail(&after); // the third opening in a row: 4 s, as without the restart
    tokio::time::advance(Duration::from_millis(3_900)).await;
    assert_eq!(after.state(), BreakerState::Open);
    tokio::time::advance(Duration::from_millis(200)).await;
    assert_eq!(after.state(), BreakerState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn a_registry_saves_and_loads_every_breaker_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("breakers.json");
    let toml = "[defaults]\nopen_for = \"1m\"\nminimum_calls = 2\nwindow = { count = 4 }";
    let registry = BreakerRegistry::from_toml(toml).unwrap();
    assert_eq!(registry.load(&path).await.unwrap(), 0, "the first start");
    let payments = registry.get("payments").unwrap();
    payments.try_acquire().unwrap().failure(MS);
    payments.try_acquire().unwrap().failure(MS);
    assert_eq!(payments.state(), BreakerState::Open);
    registry.get("ledger").unwrap().force_open();
    registry.get("search").unwrap();
    registry.save(&path).await.unwrap();
    registry.save(&path).await.unwrap(); // replaces, leaves no temporary
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    let restarted = BreakerRegistry::from_toml(toml).unwrap();
    assert_eq!(restarted.load(&path).await.unwrap(), 3);
    let state = |name: &str| restarted.get(name).unwrap().state();
    assert_eq!(state("payments"), BreakerState::Open);
    assert_eq!(state("ledger"), BreakerState::ForcedOpen);
    assert_eq!(state("search"), BreakerState::Closed);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(state("payments"), BreakerState::HalfOpen);

    // Not a state file: refused, nothing restored.
    std::fs::write(&path, b"{\"version\": 1, \"breakers\": [{\"name\": 3}]}").unwrap();
    let fresh = BreakerRegistry::from_toml(toml).unwrap();
    let err = fresh.load(&path).await.unwrap_err();
    assert!(matches!(err, RegistryError::State { .. }), "{err}");
    assert!(fresh.breakers().is_empty());
    std::fs::write(&path, b"{\"version\": 9, \"breakers\": []}").unwrap();
    let err = fresh.load(&path).await.unwrap_err();
    assert!(err.to_string().contains("version 9"), "{err}");
    // A directory that does not exist: a typed error naming the file.
    let err = registry
        .save(dir.path().join("no/such/breakers.json"))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Io { .. }), "{err}");
    assert!(err.to_string().contains("breakers.json"), "{err}");
}

// ---- Composition with the mapper's timeout, retries and order ----

#[tokio::test(start_paused = true)]
async fn a_timed_out_call_is_a_failure_of_the_breakers_call() {
    let mut c = config();
    c.consecutive_failures = Some(n(2));
    let b = Breaker::new("b", c);
    let stage = CircuitBreaker::new(b.clone(), |_: &u32| {
        std::future::pending::<Result<u32, std::io::Error>>()
    })
    .with_timeout(100 * MS);
    let out = streamz::iter(0..4u32).pipe(stage).collect().await;
    let kinds: Vec<ErrorKind> = out.iter().map(|r| r.as_ref().unwrap_err().kind()).collect();
    assert_eq!(
        kinds,
        [
            ErrorKind::TimedOut,
            ErrorKind::TimedOut,
            ErrorKind::CircuitOpen,
            ErrorKind::CircuitOpen
        ]
    );
    let m = b.metrics();
    assert_eq!((m.failures, m.cancelled, m.rejected), (2, 0, 2));
}

#[tokio::test(start_paused = true)]
async fn with_wait_the_timeout_measures_the_call_not_the_wait_for_a_permit() {
    let b = Breaker::new("b", config()); // open for 1 s
    b.transition_to(BreakerState::Open, "test", "down for a second");
    let stage = CircuitBreaker::new(b.clone(), |n: &u32| {
        let n = *n;
        async move {
            tokio::time::sleep(50 * MS).await;
            Ok::<_, std::io::Error>(n)
        }
    })
    .with_open_policy(OpenPolicy::Wait)
    .with_timeout(100 * MS);
    let start = tokio::time::Instant::now();
    let out = streamz::iter(0..2u32).pipe(stage).collect().await;
    assert_eq!(
        support::values(out),
        [0, 1],
        "waited 1 s for a permit, then 50 ms calls"
    );
    assert!(start.elapsed() >= Duration::from_secs(1));
    let m = b.metrics();
    assert_eq!((m.rejected, m.successes), (0, 2), "a wait is not a refusal");
}

#[tokio::test(start_paused = true)]
async fn every_retry_asks_the_breaker_and_a_refused_retry_ends_the_item() {
    let mut c = config();
    c.consecutive_failures = Some(n(3));
    let b = Breaker::new("b", c);
    let stage = CircuitBreaker::new(b.clone(), |_: &u32| {
        std::future::ready(Err::<u32, _>(std::io::Error::other("down")))
    })
    .with_retry(
        streamz::Retry::attempts(5)
            .with_backoff(10 * MS, 10 * MS)
            .with_jitter(streamz::Jitter::None),
    );
    let mut out = streamz::iter([1u32]).pipe(stage).collect().await;
    let mut err = out.pop().unwrap().unwrap_err();
    // Three failed attempts open the breaker; the fourth is refused.
    assert_eq!((err.kind(), err.attempts()), (ErrorKind::CircuitOpen, 4));
    assert_eq!(err.take_item::<u32>(), Some(1));
    let m = b.metrics();
    assert_eq!((m.permitted, m.failures, m.rejected), (3, 3, 1));
}

#[tokio::test(start_paused = true)]
async fn a_result_classified_as_a_failure_opens_the_breaker_and_still_passes() {
    let mut c = config();
    c.consecutive_failures = Some(n(2));
    let b = Breaker::new("b", c);
    // A "200 with an error body": the value passes, the breaker counts a failure.
    let stage = CircuitBreaker::new(b.clone(), |n: &i32| {
        std::future::ready(Ok::<_, std::io::Error>(-*n))
    })
    .classify(|r: Result<&i32, &std::io::Error>| match r {
        Ok(v) if *v < 0 => CallOutcome::Failure,
        Ok(_) => CallOutcome::Success,
        Err(_) => CallOutcome::Failure,
    })
    .unordered()
    .with_concurrency(1);
    let out = streamz::iter([1, 2, 3]).pipe(stage).collect().await;
    assert_eq!(out[0].as_ref().unwrap(), &-1);
    assert_eq!(out[1].as_ref().unwrap(), &-2);
    assert_eq!(out[2].as_ref().unwrap_err().kind(), ErrorKind::CircuitOpen);
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_classifier_that_panics_fails_the_item_and_counts_a_failure() {
    let b = Breaker::new("b", config());
    let stage = CircuitBreaker::new(b.clone(), |n: &u32| {
        std::future::ready(Ok::<_, std::io::Error>(*n))
    })
    .classify(|_: Result<&u32, &std::io::Error>| -> CallOutcome { panic!("bad classifier") });
    let pipeline = Pipeline::new();
    let out = pipeline.iter([5u32]).pipe(stage).collect().await;
    let mut err = out.into_iter().next().unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Panicked);
    assert_eq!(err.take_item::<u32>(), Some(5));
    assert_eq!(b.metrics().failures, 1);
    assert_conserved(&stage_metrics(&pipeline));
}

fn stage_metrics(pipeline: &Pipeline) -> streamz::StageMetrics {
    stage(pipeline, "circuit_breaker")
}

#[tokio::test(start_paused = true)]
async fn a_mapper_holding_on_a_breaker_waits_through_the_open_period() {
    let mut c = config();
    c.consecutive_failures = Some(n(1));
    let b = Breaker::new("b", c);
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    // A plain mapper (not guarded) that holds while the breaker is open.
    let mapper = streamz::AsyncMapper::new(move |n: &u32| {
        counted.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok::<_, std::io::Error>(*n))
    })
    .hold_while_down(b.clone());
    fail(&b); // open for 1 s
    let start = tokio::time::Instant::now();
    let out = streamz::iter(0..3u32).pipe(mapper).collect().await;
    assert_eq!(support::values(out), [0, 1, 2]);
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "held until half-open"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}
