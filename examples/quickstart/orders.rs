//! The quickstart's pipeline, shared with `tests/topology.rs` (which
//! checks the picture of it that the quickstart prints).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::Serialize;
use streamz::dlq::{FileSink, JsonItems};
use streamz::{
    AsyncMapper, Batcher, DeadLetterQueue, Emit, Item, Map, Pipeline, Retry, Stage, Step, Throttle,
};

#[derive(Debug, Clone, Serialize)]
pub struct Order {
    pub id: u32,
    pub cents: i64,
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
pub enum Tier {
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
pub type Enriched = (u32, i64, Tier);

/// The order lines the quickstart reads: good ones, and ones that fail in
/// each way.
pub const LINES: [&str; 9] = [
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

/// Runs the quickstart's pipeline over [`LINES`], writing its failures to
/// the dead-letter file `dlq_path` (made afresh), and returns the pipeline
/// (for its counters and picture) with the batches that reached the end.
pub async fn run(
    dlq_path: &Path,
) -> Result<(Pipeline, Vec<streamz::Result<Vec<Enriched>>>), Box<dyn std::error::Error>> {
    let lines = LINES;

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
    let _ = std::fs::remove_file(dlq_path);
    let dead_letters = DeadLetterQueue::json(
        FileSink::create(dlq_path).await?,
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
    Ok((pipeline, batches))
}
