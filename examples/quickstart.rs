//! A small streamz pipeline: parse order lines, validate them, price them,
//! enrich them from a flaky service (timeout and retry), throttle them and
//! write them in batches. Failures arrive as values carrying their stage
//! and item, and a dead-letter queue at the end writes them to a file,
//! which is read back at the end.
//!
//! Run: `cargo run --example quickstart`

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::StreamExt;

use serde::Serialize;
use streamz::dlq::{FileSink, JsonItems, Replay};
use streamz::{
    AsyncMapper, Batcher, DeadLetter, DeadLetterQueue, Emit, Item, Map, Pipeline, Retry, Stage,
    Step, Throttle,
};

#[derive(Debug, Clone, Serialize)]
struct Order {
    id: u32,
    cents: i64,
}

/// Parses `id,cents` lines.
fn parse(line: &String) -> Result<Order, String> {
    let (id, cents) = line
        .split_once(',')
        .ok_or_else(|| format!("expected `id,cents`, got {line:?}"))?;
    Ok(Order {
        id: id.trim().parse().map_err(|e| format!("bad id: {e}"))?,
        cents: cents
            .trim()
            .parse()
            .map_err(|e| format!("bad amount: {e}"))?,
    })
}

/// A custom per-item step: rejects orders with a negative amount.
struct Validate;

impl Step<Order, Order> for Validate {
    fn on_item(&mut self, order: Item<'_, Order>, out: &mut Emit<'_, Order>) {
        if order.cents < 0 {
            return out.fail(order, "negative amount");
        }
        out.emit(order.take());
    }
}

#[derive(Debug, Clone, Copy)]
enum Tier {
    Standard,
    Gold,
}

#[derive(Debug, thiserror::Error)]
enum ServiceError {
    #[error("customer service unavailable")]
    Unavailable,
    #[error("no customer for order {0}")]
    NotFound(u32),
}

/// A stand-in for a remote customer service: order 2 finds it briefly
/// down (fails twice, then answers), order 7 has no customer, and order 5
/// hangs (the timeout cuts it off on every attempt).
async fn customer_tier(order: u32, calls: Arc<AtomicU32>) -> Result<Tier, ServiceError> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    match order {
        2 if calls.fetch_add(1, Ordering::Relaxed) < 2 => Err(ServiceError::Unavailable),
        5 => std::future::pending().await,
        7 => Err(ServiceError::NotFound(order)),
        n if n % 2 == 0 => Ok(Tier::Gold),
        _ => Ok(Tier::Standard),
    }
}

type Priced = (u32, i64);
type Enriched = (u32, i64, Tier);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lines = [
        "1, 1250",
        "2, 399",
        "three, 100",
        "4, -50",
        "5, 10000",
        "no comma",
        "7, 42",
        "8, 777",
        "9, 5",
    ];

    // The async call: 4 at a time, 100 ms per attempt, 3 attempts with
    // exponential backoff, and only "unavailable" is worth retrying.
    let calls = Arc::new(AtomicU32::new(0));
    let enrich = AsyncMapper::new(move |&(id, cents): &Priced| {
        let calls = calls.clone();
        async move {
            let tier = customer_tier(id, calls).await?;
            Ok::<Enriched, ServiceError>((id, cents, tier))
        }
    })
    .named("enrich")
    .with_concurrency(4)
    .with_timeout(Duration::from_millis(100))
    .with_retry(
        Retry::attempts(3).with_backoff(Duration::from_millis(20), Duration::from_millis(200)),
    )
    .retry_if(|e: &ServiceError| matches!(e, ServiceError::Unavailable));

    // Failures of every stage go to one dead-letter file, their items kept
    // as JSON: lines that did not parse, orders that did not validate,
    // priced orders the service could not enrich.
    // The file is kept after the run for you to read; each run starts it
    // afresh.
    let dlq_path = std::env::temp_dir().join("streamz-quickstart.dlq.jsonl");
    let _ = std::fs::remove_file(&dlq_path);
    let dead_letters = DeadLetterQueue::json(
        FileSink::create(&dlq_path).await?,
        JsonItems::new().of::<String>().of::<Order>().of::<Priced>(),
    );

    let pipeline = Pipeline::new();
    let batches = pipeline
        .iter(lines.map(String::from))
        .try_map(parse) // fused into the next stage's task
        .pipe(Stage::new("validate", Validate)) // its own task
        .pipe(Stage::new(
            "price",
            Map::new(|o: &Order| (o.id, o.cents * 120 / 100)),
        ))
        .pipe(enrich)
        // At most 50 orders per second downstream, in bursts of up to 4.
        .pipe(Throttle::new(50, Duration::from_secs(1)).with_burst(4))
        // Write in batches of up to 3, or whatever 50 ms collected.
        .pipe(Batcher::new(3, Duration::from_millis(50)))
        .pipe(dead_letters)
        .collect()
        .await;

    println!("batches written:");
    for batch in batches {
        // Failures went to the dead-letter file; only values arrive here.
        let batch = batch?;
        println!("  batch of {}:", batch.len());
        for (id, cents, tier) in batch {
            println!("    order {id}: {cents} cents incl. tax, {tier:?} customer");
        }
    }

    let records: Vec<DeadLetter<serde_json::Value>> = Replay::open(&dlq_path)
        .await?
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    println!(
        "\n{} failures in the dead-letter file {}:",
        records.len(),
        dlq_path.display()
    );
    for r in &records {
        println!(
            "  #{} [{}] stage `{}` after {} attempt(s): {}\n     item: {}",
            r.sequence,
            r.kind,
            r.stage,
            r.attempts,
            r.message,
            r.item
                .as_ref()
                .map_or_else(|| "none".to_owned(), |v| v.to_string())
        );
    }

    println!("\nstage counters:");
    for m in pipeline.metrics() {
        println!(
            "  {:<9} received {:>2}  emitted {:>2}  failed {:>2}  errors passed {:>2}  \
             retries {:>2}  timeouts {:>2}  dead-lettered {:>2}",
            m.name,
            m.received,
            m.emitted,
            m.failed,
            m.errors_passed,
            m.retries,
            m.timeouts,
            m.dead_lettered
        );
    }
    pipeline.join().await?;
    Ok(())
}
