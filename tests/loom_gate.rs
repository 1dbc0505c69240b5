//! Model tests of what a health gate's checker shares with the mappers
//! holding their calls on the gate's state (loom explores every
//! interleaving of the threads' operations on the holders' count):
//!
//! - the last holder letting go always wakes the checker waiting for it
//!   (the lingering checker stops; a lost wake-up would keep it checking
//!   for ever), with one holder and with two letting go at once;
//! - a holder taken while the checker looks keeps it waiting.
//!
//! Under the model the release signal is a small model of tokio's
//! `Notify` on loom's lock (its documented contract: a `Notified` receives
//! every `notify_waiters` made after it was created), so loom sees each
//! step of a wake-up. Checking the count before creating the `Notified`
//! (the classic lost wake-up) makes the first model deadlock.
//!
//! Run: `RUSTFLAGS="--cfg streamz_loom" cargo test --release --features circuit-breaker --test loom_gate`
#![cfg(streamz_loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, Ordering::SeqCst};
use streamz::gate_loom_hooks as loom_hooks;
use streamz::{DependencySignal, GateHandle, Health, HealthGate};

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
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
