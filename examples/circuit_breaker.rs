//! A circuit breaker around calls to a ledger that falls over for a while.
//! Read the warnings in `docs/circuit-breaker.md` first: the breaker is
//! opt-in for good reasons.
//!
//! Run: `cargo run --example circuit_breaker --features circuit-breaker`
//!
//! The breaker comes from a registry configured in TOML. While it is open,
//! payments fail fast as `circuit_open` errors carrying the payment, and a
//! dead-letter queue keeps them; half-open trial calls find the ledger
//! back, and the breaker closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use streamz::breaker::{BreakerRegistry, CircuitBreaker};
use streamz::{DeadLetterQueue, ErrorKind, Pipeline};
use tokio::time::Instant;

const CONFIG: &str = r#"
max_breakers = 10

[defaults]
failure_rate = 0.5
minimum_calls = 10
open_for = "30s"

[breakers.ledger]
consecutive_failures = 3
open_for = "50ms"
open_backoff = { factor = 2.0, max = "200ms" }
half_open_calls = 2
successes_to_close = 2
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let registry = BreakerRegistry::from_toml(CONFIG)?;
    let breaker = registry.get("ledger")?;
    let start = Instant::now();
    breaker.on_transition(move |t| {
        println!(
            "{:>4} ms  breaker {:?} -> {:?}: {}",
            start.elapsed().as_millis(),
            t.from,
            t.to,
            t.reason
        )
    });

    // The ledger is down from 50 ms to 250 ms after the start.
    let calls = Arc::new(AtomicU32::new(0));
    let post = {
        let calls = calls.clone();
        move |payment: &u32| {
            let payment = *payment;
            calls.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                let t = start.elapsed();
                if t > Duration::from_millis(50) && t < Duration::from_millis(250) {
                    Err(std::io::Error::other("ledger unavailable"))
                } else {
                    Ok(payment)
                }
            }
        }
    };

    let (dead, letters) = streamz::dlq::channel::<u32>(1024);
    let kept = tokio::spawn(async move {
        let mut kinds = std::collections::BTreeMap::new();
        while let Ok(letter) = letters.recv().await {
            *kinds.entry(letter.kind.as_str()).or_insert(0) += 1;
        }
        kinds
    });

    let pipeline = Pipeline::new();
    let posted = pipeline
        .stream(futures::stream::unfold(0u32, |n| async move {
            // One payment per millisecond, for 400 ms.
            tokio::time::sleep(Duration::from_millis(1)).await;
            (n < 400).then_some((n, n + 1))
        }))
        .pipe(CircuitBreaker::new(breaker.clone(), post).with_concurrency(4))
        .pipe(DeadLetterQueue::new(dead))
        .collect()
        .await;
    let kinds = kept.await?;

    let m = breaker.metrics();
    println!(
        "\n{} payments: {} posted, dead-lettered {:?}; {} calls made, {} refused without a call",
        400,
        posted.len(),
        kinds,
        calls.load(Ordering::Relaxed) - u32::try_from(m.rejected)?,
        m.rejected,
    );
    println!(
        "breaker: {:?}, {} transitions, audit trail of {}",
        m.state,
        m.transitions,
        breaker.audit_trail().len()
    );
    assert_eq!(
        posted.len() + kinds.values().sum::<usize>(),
        400,
        "every payment is posted or dead-lettered"
    );
    assert!(kinds.contains_key(ErrorKind::Failed.as_str()));
    pipeline.join().await?;
    Ok(())
}
