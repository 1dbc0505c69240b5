//! Model tests of what a health gate shares between its checker, its own
//! task and the mappers holding their calls on its state (loom explores
//! every interleaving of the threads' operations on it):
//!
//! - an opening the checker records always reaches the gate's task, and a
//!   mapper holding on the gate, also after the gate has ended (a lost
//!   wake-up would hold the input, or the mapper's calls, for ever);
//! - the gate's task ends on the checker's last word, however the
//!   checker's changes interleave with its polls;
//! - the last holder letting go always wakes the lingering checker waiting
//!   for it (a lost wake-up would keep it checking for ever), with one
//!   holder and with two letting go at once; a holder left keeps it going.
//!
//! loom cannot see tokio's lock and atomics, so under the model tokio's
//! `Notify` and `watch` are replaced by small models of them on loom's
//! lock that keep their documented contracts (`src/base/loom_notify.rs`,
//! `src/base/loom_watch.rs`), and loom sees each step of a wake-up.
//! Each model fails (deadlocks) on the bug it is there for: the checker
//! reading the holders' count before creating its `Notified` (the classic
//! lost wake-up), the gate's task not polling the next change after taking
//! one, a holding mapper not polling its signal again after an update.
//!
//! Run: `RUSTFLAGS="--cfg streamz_loom" cargo test --release --features circuit-breaker --test loom_gate`
#![cfg(streamz_loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::future::poll_fn;
use std::task::Poll;
use streamz::gate_loom_hooks as loom_hooks;

use streamz::{DependencySignal, GateHandle, GateState, Health, HealthGate};

type Check = tokio::sync::watch::Receiver<Health>;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

/// A gate that starts closed, closes after one unhealthy answer and opens
/// after one healthy one; its own check is never asked (the model feeds
/// the checker its answers).
fn gate() -> HealthGate<Check> {
    let (_health, check) = tokio::sync::watch::channel(Health::Healthy);
    HealthGate::new(check).with_failures_to_close(1)
}

/// Runs the gate's task until it takes input (what its driver would wait
/// for).
fn until_the_gate_takes_input(gate: &mut loom_hooks::ModelGate) {
    loom::future::block_on(poll_fn(|cx| {
        loop {
            if gate.takes_input() {
                return Poll::Ready(());
            }
            if gate.poll_status(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }));
}

/// Runs a holding mapper until its signal says it may call.
fn until_up(signal: &mut DependencySignal) {
    loom::future::block_on(poll_fn(|cx| {
        if loom_hooks::poll_up(signal, cx) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }));
}

#[test]
fn an_opening_always_reaches_the_gate_task() {
    model(|| {
        let (mut checker, mut gate) = loom_hooks::parts(gate());
        let checker = loom::thread::spawn(move || {
            checker.answer(Health::Healthy);
            checker // the checker goes on running
        });
        // Returns only once the opening is seen: a lost wake-up is a
        // deadlock, which loom reports.
        until_the_gate_takes_input(&mut gate);
        assert_eq!(gate.state(), GateState::Open);
        drop(checker.join().unwrap());
    });
}

#[test]
fn the_gate_task_ends_on_the_checkers_last_word() {
    model(|| {
        let (mut checker, mut gate) = loom_hooks::parts(gate());
        let checker = loom::thread::spawn(move || {
            checker.answer(Health::Healthy);
            checker.answer(Health::unhealthy("down"));
            checker.answer(Health::Healthy);
            // The checker ends (its gate's pipeline stopped it).
        });
        // The gate's task follows the changes until the checker is gone,
        // seeing some or all of them, and keeps the last.
        loom::future::block_on(poll_fn(|cx| {
            while gate.follows_the_checker() {
                if gate.poll_status(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            Poll::Ready(())
        }));
        assert_eq!(gate.state(), GateState::Open);
        assert!(gate.takes_input());
        checker.join().unwrap();
    });
}

#[test]
fn an_opening_reaches_the_gate_task_and_a_holding_mapper_alike() {
    model(|| {
        let gate = gate();
        let mut signal = DependencySignal::from(&gate.handle());
        let (mut checker, mut gate) = loom_hooks::parts(gate);
        let task = loom::thread::spawn(move || {
            until_the_gate_takes_input(&mut gate);
            gate.state()
        });
        let checker = loom::thread::spawn(move || {
            checker.answer(Health::Healthy);
            checker
        });
        until_up(&mut signal);
        assert_eq!(task.join().unwrap(), GateState::Open);
        drop(checker.join().unwrap());
    });
}

#[test]
fn an_opening_after_the_gate_ended_reaches_a_holding_mapper() {
    model(|| {
        let gate = gate();
        let mut signal = DependencySignal::from(&gate.handle());
        let (mut checker, mut gate) = loom_hooks::parts(gate);
        // The pipeline shuts down: the gate's task lets its input go and
        // ends; the checker lingers for the mapper.
        gate.shut_down();
        assert!(gate.takes_input());
        drop(gate);
        let checker = loom::thread::spawn(move || {
            checker.answer(Health::Healthy);
            checker
        });
        until_up(&mut signal);
        drop(checker.join().unwrap());
    });
}

fn handle() -> GateHandle {
    let (_health, check) = tokio::sync::watch::channel(Health::Healthy);
    HealthGate::new(check).handle()
}

#[test]
fn the_last_holder_letting_go_wakes_the_checker_waiting_for_it() {
    model(|| {
        let handle = handle();
        let signal = DependencySignal::from(&handle);
        let mapper = loom::thread::spawn(move || drop(signal));
        // Returns only if the release is seen: a lost wake-up is a
        // deadlock, which loom reports.
        loom::future::block_on(loom_hooks::released(&handle));
        mapper.join().unwrap();
    });
}

#[test]
fn two_holders_letting_go_at_once_wake_the_checker() {
    model(|| {
        let handle = handle();
        let (a, b) = (
            DependencySignal::from(&handle),
            DependencySignal::from(&handle),
        );
        let first = loom::thread::spawn(move || drop(a));
        let second = loom::thread::spawn(move || drop(b));
        loom::future::block_on(loom_hooks::released(&handle));
        first.join().unwrap();
        second.join().unwrap();
    });
}

#[test]
fn a_holder_still_there_keeps_the_checker_waiting() {
    model(|| {
        let handle = handle();
        let kept = DependencySignal::from(&handle);
        let gone = DependencySignal::from(&handle);
        let released = Arc::new(AtomicBool::new(false));
        let seen = released.clone();
        let watcher = handle.clone();
        let checker = loom::thread::spawn(move || {
            loom::future::block_on(loom_hooks::released(&watcher));
            seen.store(true, SeqCst);
        });
        drop(gone);
        // One holder is left: the checker must not have stopped.
        assert!(!released.load(SeqCst));
        drop(kept);
        checker.join().unwrap();
        assert!(released.load(SeqCst));
    });
}
