//! Model tests of the circuit breaker's concurrent use (loom explores
//! every interleaving of the threads' lock operations):
//!
//! - never more half-open trial calls in flight than permitted,
//! - a trial call that is cancelled frees its slot: half-open never gets
//!   stuck,
//! - concurrent failures open the breaker exactly once; no transition is
//!   lost from the audit trail or the counters;
//! - a reset racing a trial call leaves a consistent breaker, and the audit
//!   trail and the listeners see transitions in the order they happened.
//!
//! Run: `RUSTFLAGS="--cfg streamz_loom" cargo test --release --features circuit-breaker --test loom_breaker`
#![cfg(all(streamz_loom, feature = "circuit-breaker"))]

use std::num::NonZeroU32;
use std::time::Duration;

use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use streamz::breaker::{Breaker, BreakerConfig, BreakerState, Window, loom_clock};

const MS: Duration = Duration::from_millis(1);

fn config() -> BreakerConfig {
    let n = |v| NonZeroU32::new(v).unwrap();
    let mut c = BreakerConfig::default();
    c.window = Window::Count(n(100));
    c.minimum_calls = n(100);
    c.consecutive_failures = Some(n(2));
    c.half_open_calls = n(2);
    c.successes_to_close = n(2);
    c.open_for = Duration::from_secs(3600);
    c
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

/// A breaker in half-open: opened by two failures, then an hour passes.
fn half_open() -> Breaker {
    let b = Breaker::new("m", config());
    for _ in 0..2 {
        b.try_acquire().unwrap().failure(MS);
    }
    assert_eq!(b.state(), BreakerState::Open);
    loom_clock::advance(Duration::from_secs(3600));
    b
}

#[test]
fn half_open_permits_at_most_the_trial_calls_and_never_gets_stuck() {
    model(|| {
        let b = half_open();
        let granted = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let b = b.clone();
                let granted = granted.clone();
                loom::thread::spawn(move || {
                    if let Ok(permit) = b.try_acquire() {
                        granted.fetch_add(1, SeqCst);
                        assert!(b.metrics().trials_in_flight <= 2);
                        if i == 1 {
                            drop(permit); // cancelled
                        } else {
                            permit.success(MS);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.metrics().trials_in_flight, 0);
        let granted = granted.load(SeqCst);
        assert!((2..=3).contains(&granted), "{granted}");
        match b.state() {
            BreakerState::Closed => {}
            BreakerState::HalfOpen => {
                // One success and a cancelled call: the freed slot is
                // given again, and its success closes the breaker.
                b.try_acquire().unwrap().success(MS);
                assert_eq!(b.state(), BreakerState::Closed);
            }
            s => panic!("unexpected state {s:?}"),
        }
        let m = b.metrics();
        assert_eq!(m.transitions as usize, b.audit_trail().len());
    });
}

#[test]
fn concurrent_failures_open_the_breaker_exactly_once() {
    model(|| {
        let b = Breaker::new("m", config());
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let b = b.clone();
                loom::thread::spawn(move || {
                    if let Ok(permit) = b.try_acquire() {
                        permit.failure(MS);
                    }
                    if let Ok(permit) = b.try_acquire() {
                        permit.failure(MS);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.state(), BreakerState::Open);
        let trail = b.audit_trail();
        assert_eq!(trail.len(), 1);
        assert_eq!(
            (trail[0].from, trail[0].to),
            (BreakerState::Closed, BreakerState::Open)
        );
        let m = b.metrics();
        assert_eq!(m.permitted + m.rejected, 4);
        assert_eq!(m.failures, m.permitted);
        assert!(m.permitted >= 2);
    });
}

#[test]
fn a_reset_racing_a_failed_trial_leaves_a_consistent_breaker_and_an_ordered_trail() {
    model(|| {
        let b = half_open();
        let heard = Arc::new(loom::sync::Mutex::new(Vec::new()));
        b.on_transition({
            let heard = heard.clone();
            move |t| heard.lock().unwrap().push((t.from, t.to))
        });
        let trial = {
            let b = b.clone();
            loom::thread::spawn(move || {
                if let Ok(permit) = b.try_acquire() {
                    permit.failure(MS);
                }
            })
        };
        b.reset();
        trial.join().unwrap();
        // Either the trial failed before the reset (then the reset closed
        // it) or after it: an outcome from before the reset never moves
        // the reset breaker.
        assert_eq!(b.metrics().trials_in_flight, 0);
        assert!(matches!(
            b.state(),
            BreakerState::Closed | BreakerState::Open
        ));
        assert_eq!(b.metrics().transitions as usize, b.audit_trail().len());
        // The audit trail and the listener see the transitions in the
        // order they happened.
        let trail: Vec<_> = b.audit_trail().iter().map(|t| (t.from, t.to)).collect();
        for pair in trail.windows(2) {
            assert_eq!(pair[0].1, pair[1].0, "{trail:?}");
        }
        assert_eq!(trail.last().unwrap().1, b.state(), "{trail:?}");
        // The listener heard the same transitions, in the same order (those
        // after the one the breaker was built with).
        let heard = heard.lock().unwrap().clone();
        assert_eq!(heard[..], trail[trail.len() - heard.len()..], "{trail:?}");
    });
}

/// A mapper holding its calls on a breaker waits for the breaker's next
/// change; a transition on another thread, at any point of that wait's
/// setting up, reaches it (a lost wake-up would hold the mapper's items
/// until some later transition).
#[test]
fn a_transition_always_reaches_a_mapper_holding_on_the_breaker() {
    use futures::StreamExt;
    use streamz::Health;
    use streamz::breaker::loom_hooks;

    model(|| {
        let b = Breaker::new("m", config());
        let watched = b.clone();
        let watcher = loom::thread::spawn(move || {
            loom::future::block_on(async move {
                let mut updates = std::pin::pin!(loom_hooks::health_updates(watched));
                // Healthy first if it looked before the transition; then
                // (or at once) the opening.
                let mut next = updates.next().await;
                if next == Some(Health::Healthy) {
                    next = updates.next().await;
                }
                assert!(matches!(next, Some(Health::Unhealthy(_))), "{next:?}");
            });
        });
        b.force_open();
        watcher.join().unwrap();
    });
}
