//! Gate a pipeline's ingress on the health of the service it writes to.
//! The service goes down for a while: the gate closes, the producer waits
//! (nothing is dropped, nothing is sent to a failing service), and when
//! the service is back everything flows again.
//!
//! Run: `cargo run --example health_gate`
//!
//! With the `http` feature, `streamz::HttpProbe::new("http://host/health")`
//! is a ready-made check for a service with a health endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use streamz::{EdgeConfig, GateState, HealthGate, Pipeline, health_fn};
use tokio::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The service's health, as its health check would report it.
    let service_up = Arc::new(AtomicBool::new(true));
    let check = health_fn({
        let up = service_up.clone();
        move || {
            let up = up.clone();
            async move { up.load(Ordering::Relaxed) }
        }
    });
    // Check every 20 ms; close after 2 bad answers, open after 2 good ones.
    let gate = HealthGate::new(check)
        .with_interval(Duration::from_millis(20))
        .with_failures_to_close(2)
        .with_successes_to_open(2);
    let handle = gate.handle();

    let start = Instant::now();
    let mut status = handle.subscribe();
    let watcher = tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let s = status.borrow_and_update().clone();
            println!(
                "{:>5} ms  gate {:?}{}",
                start.elapsed().as_millis(),
                s.state,
                s.reason.map(|r| format!(" ({r})")).unwrap_or_default()
            );
        }
    });

    // A small edge, so the producer feels the closed gate quickly.
    let pipeline = Pipeline::with_edge(EdgeConfig::new(16, 16));
    let (tx, flow) = pipeline.channel::<u32>();
    let written = Arc::new(AtomicU32::new(0));
    let sink = tokio::spawn({
        let written = written.clone();
        flow.pipe(gate).for_each(move |item| {
            item.expect("the gate passes values unchanged");
            written.fetch_add(1, Ordering::Relaxed);
        })
    });

    // The service fails from 100 ms to 400 ms.
    tokio::spawn({
        let up = service_up.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            up.store(false, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(300)).await;
            up.store(true, Ordering::Relaxed);
        }
    });

    // The producer: one record per millisecond, reporting each wait.
    let mut longest_wait = Duration::ZERO;
    for i in 0..600 {
        let before = Instant::now();
        tx.send(i).await?;
        longest_wait = longest_wait.max(before.elapsed());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(tx);
    sink.await?;
    let gate = pipeline
        .stage_metrics("health_gate")
        .expect("the gate's counters");
    println!(
        "600 produced, {} written, {} received by the gate; the producer waited up to {} ms; \
         {} checks, {} unhealthy, closed {} time(s)",
        written.load(Ordering::Relaxed),
        gate.received,
        longest_wait.as_millis(),
        handle.checks(),
        handle.unhealthy_checks(),
        handle.closings()
    );
    assert_eq!(handle.state(), GateState::Open);
    pipeline.join().await?;
    watcher.abort();
    Ok(())
}
