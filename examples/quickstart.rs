//! A small streamz pipeline: parse order lines, validate them, price them,
//! and show that failures arrive as values carrying their stage and item.
//!
//! Run: `cargo run --example quickstart`

use streamz::{Emit, Item, Map, Pipeline, Stage, Step};

#[derive(Debug, Clone)]
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

#[tokio::main]
async fn main() {
    let lines = [
        "1, 1250",
        "2, 399",
        "three, 100",
        "4, -50",
        "5, 10000",
        "no comma",
        "7, 42",
    ];

    let pipeline = Pipeline::new();
    let results = pipeline
        .iter(lines.map(String::from))
        .try_map(parse) // fused into the next stage's task
        .pipe(Stage::new("validate", Validate)) // its own task
        .pipe(Stage::new(
            "price",
            Map::new(|o: &Order| (o.id, o.cents * 120 / 100)),
        ))
        .collect()
        .await;

    println!("results, in input order:");
    for result in results {
        match result {
            Ok((id, cents)) => println!("  ok      order {id}: {cents} cents incl. tax"),
            Err(mut err) => {
                // The failed item comes back as its own type.
                let item = err
                    .take_item::<String>()
                    .map(|line| format!("line {line:?}"))
                    .or_else(|| err.take_item::<Order>().map(|o| format!("{o:?}")))
                    .unwrap_or_default();
                println!(
                    "  failed  [{}] {}: {err}\n          item: {item}",
                    err.kind(),
                    err.stage()
                );
            }
        }
    }

    println!("\nstage counters:");
    for m in pipeline.metrics() {
        println!(
            "  {:<9} received {:>2}  emitted {:>2}  failed {:>2}  errors passed {:>2}  dropped {:>2}",
            m.name, m.received, m.emitted, m.failed, m.errors_passed, m.dropped
        );
    }
    pipeline.join().await.expect("no stage task panicked");
}
