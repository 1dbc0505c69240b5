//! Property: whatever sequence of calls, outcomes, cancellations, time and
//! manual control a breaker sees, its invariants hold after every step.
#![cfg(feature = "circuit-breaker")]

use std::num::NonZeroU32;
use std::time::Duration;

use proptest::prelude::*;
use streamz::breaker::{
    Breaker, BreakerConfig, BreakerState, OpenBackoff, Permit, SlowCall, Window,
};

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    Succeed(usize),
    Fail(usize),
    Slow(usize),
    Cancel(usize),
    Advance(u64),
    Reset,
    ForceOpen,
    Disable,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Acquire),
        4 => any::<usize>().prop_map(Op::Succeed),
        4 => any::<usize>().prop_map(Op::Fail),
        1 => any::<usize>().prop_map(Op::Slow),
        1 => any::<usize>().prop_map(Op::Cancel),
        3 => (0u64..3000).prop_map(Op::Advance),
        1 => Just(Op::Reset),
        1 => Just(Op::ForceOpen),
        1 => Just(Op::Disable),
    ]
}

fn config() -> impl Strategy<Value = BreakerConfig> {
    (
        prop_oneof![
            (1u32..20).prop_map(|n| Window::Count(NonZeroU32::new(n).unwrap())),
            (100u64..5000).prop_map(|ms| Window::Time(Duration::from_millis(ms))),
        ],
        (1u32..=10).prop_map(|r| f64::from(r) / 10.0),
        proptest::option::of(1u32..5),
        1u32..8,
        (1u32..4, 1u32..4),
        (1u64..2000, any::<bool>()),
        0u64..1500,
    )
        .prop_map(
            |(
                window,
                rate,
                consecutive,
                minimum,
                (trials, successes),
                (open_ms, backoff),
                interval,
            )| {
                let n = |v: u32| NonZeroU32::new(v).unwrap();
                let mut c = BreakerConfig::default();
                c.window = window;
                c.failure_rate = rate;
                c.consecutive_failures = consecutive.map(n);
                c.minimum_calls = n(match window {
                    Window::Count(size) => minimum.min(size.get()),
                    Window::Time(_) => minimum,
                });
                c.half_open_calls = n(trials);
                c.successes_to_close = n(successes.min(trials));
                c.open_for = Duration::from_millis(open_ms);
                c.open_backoff = backoff.then_some(OpenBackoff {
                    factor: 2.0,
                    max: Duration::from_millis(open_ms * 4),
                });
                c.slow_call = Some(SlowCall {
                    duration: Duration::from_millis(100),
                    rate: 0.9,
                });
                c.min_transition_interval = Duration::from_millis(interval);
                c.audit_capacity = 10_000;
                c
            },
        )
}

const AUTOMATIC: [(BreakerState, BreakerState); 4] = [
    (BreakerState::Closed, BreakerState::Open),
    (BreakerState::Open, BreakerState::HalfOpen),
    (BreakerState::HalfOpen, BreakerState::Open),
    (BreakerState::HalfOpen, BreakerState::Closed),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_invariants_hold_after_every_step(config in config(), ops in prop::collection::vec(op(), 1..120)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let _guard = rt.enter();
        let trials = config.half_open_calls.get();
        let breaker = Breaker::new("p", config);
        let mut held: Vec<Permit<'_>> = Vec::new();
        let take = |held: &mut Vec<Permit<'_>>, i: usize| -> Option<usize> {
            (!held.is_empty()).then(|| i % held.len())
        };
        for op in ops {
            match op {
                Op::Acquire => match breaker.try_acquire() {
                    Ok(p) => held.push(p),
                    // Closed and disabled breakers always permit (a refusal
                    // names the state it was made in, after any pending
                    // transition was applied).
                    Err(e) => prop_assert!(
                        matches!(e.state(), BreakerState::Open | BreakerState::ForcedOpen | BreakerState::HalfOpen),
                        "{:?} refused", e.state()
                    ),
                },
                Op::Succeed(i) => if let Some(i) = take(&mut held, i) { held.swap_remove(i).success(Duration::from_millis(1)) },
                Op::Fail(i) => if let Some(i) = take(&mut held, i) { held.swap_remove(i).failure(Duration::from_millis(1)) },
                Op::Slow(i) => if let Some(i) = take(&mut held, i) { held.swap_remove(i).success(Duration::from_secs(1)) },
                Op::Cancel(i) => if let Some(i) = take(&mut held, i) { drop(held.swap_remove(i)) },
                Op::Advance(ms) => rt.block_on(tokio::time::advance(Duration::from_millis(ms))),
                Op::Reset => breaker.reset(),
                Op::ForceOpen => breaker.force_open(),
                Op::Disable => breaker.disable(),
            }
            // Never more trial calls in flight than permitted.
            prop_assert!(breaker.metrics().trials_in_flight <= trials);
            // Every permit is accounted for.
            let m = breaker.metrics();
            prop_assert_eq!(m.permitted, m.successes + m.failures + m.cancelled + held.len() as u64);
            // No transition is lost, and automatic ones follow the diagram.
            let trail = breaker.audit_trail();
            prop_assert_eq!(m.transitions, trail.len() as u64);
            for t in &trail {
                if !t.reason.ends_with("by hand") {
                    prop_assert!(AUTOMATIC.contains(&(t.from, t.to)), "{:?}", t);
                }
            }
            for pair in trail.windows(2) {
                prop_assert_eq!(pair[0].to, pair[1].from);
            }
            prop_assert_eq!(trail.last().map_or(BreakerState::Closed, |t| t.to), m.state);
        }
        // Half-open never gets stuck: with no call in flight, a trial slot
        // is free (once any minimum interval has passed).
        held.clear();
        rt.block_on(tokio::time::advance(Duration::from_secs(2)));
        if breaker.state() == BreakerState::HalfOpen {
            prop_assert!(breaker.try_acquire().is_ok() || breaker.state() != BreakerState::HalfOpen);
        }
    }
}

/// What the caller sees of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Value,
    Failed,
    Refused,
}

/// Runs `calls` (outcome, duration in ms) one at a time through a
/// `CircuitBreaker` stage, and the same calls by hand with a permit each;
/// returns what each saw and the two breakers.
async fn stage_and_by_hand(
    config: BreakerConfig,
    calls: Vec<(bool, u64)>,
) -> (Vec<Seen>, Vec<Seen>, Breaker, Breaker) {
    use streamz::ErrorKind;
    use streamz::breaker::CircuitBreaker;

    let staged = Breaker::new("stage", config);
    let stage = CircuitBreaker::new(staged.clone(), |&(ok, ms): &(bool, u64)| async move {
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if ok { Ok(()) } else { Err("down") }
    });
    let out = streamz::iter(calls.clone()).pipe(stage).collect().await;
    let seen_stage = out
        .iter()
        .map(|r| match r {
            Ok(()) => Seen::Value,
            Err(e) if e.kind() == ErrorKind::CircuitOpen => Seen::Refused,
            Err(_) => Seen::Failed,
        })
        .collect();

    let by_hand = Breaker::new("by_hand", config);
    let mut seen_hand = Vec::new();
    for (ok, ms) in calls {
        match by_hand.try_acquire() {
            Ok(permit) => {
                if ms > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                permit.record(ok);
                seen_hand.push(if ok { Seen::Value } else { Seen::Failed });
            }
            Err(_) => seen_hand.push(Seen::Refused),
        }
    }
    (seen_stage, seen_hand, staged, by_hand)
}

fn calls() -> impl Strategy<Value = Vec<(bool, u64)>> {
    let call = (
        prop::bool::weighted(0.7),
        prop_oneof![3 => Just(0u64), 1 => 1u64..150],
    );
    prop::collection::vec(call, 1..80)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The stage asks the breaker on its lock-free lane and reports quick
    /// successes in batches: it must decide exactly as a permit per call
    /// does, call for call, with the same counters and transitions.
    #[test]
    fn the_stage_decides_like_a_permit_per_call(
        config in config(),
        timed in any::<bool>(),
        calls in calls(),
    ) {
        let mut config = config;
        if !timed {
            config.slow_call = None;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let (stage, hand, staged, by_hand) = rt.block_on(stage_and_by_hand(config, calls));
        prop_assert_eq!(stage, hand);
        let (a, b) = (staged.metrics(), by_hand.metrics());
        prop_assert_eq!(
            (a.state, a.permitted, a.rejected, a.successes, a.failures, a.slow_calls, a.cancelled, a.transitions, a.window_calls),
            (b.state, b.permitted, b.rejected, b.successes, b.failures, b.slow_calls, b.cancelled, b.transitions, b.window_calls)
        );
        let trail = |b: &Breaker| b.audit_trail().into_iter().map(|t| (t.from, t.to, t.reason)).collect::<Vec<_>>();
        prop_assert_eq!(trail(&staged), trail(&by_hand));
    }
}
