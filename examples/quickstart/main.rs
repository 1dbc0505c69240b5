//! A small streamz pipeline: parse order lines, validate them, price them,
//! enrich them from a flaky service (timeout and retry), throttle them and
//! write them in batches. Failures arrive as values carrying their stage
//! and item, and a dead-letter queue at the end writes them to a file,
//! which is read back at the end.
//!
//! Run: `cargo run --example quickstart` (add `-- --dot` for the pipeline's
//! picture in Graphviz's format instead of Mermaid).

mod orders;

use futures::StreamExt;
use streamz::DeadLetter;
use streamz::dlq::Replay;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The file is kept after the run for you to read; each run starts it
    // afresh.
    let dlq_path = std::env::temp_dir().join("streamz-quickstart.dlq.jsonl");
    let (pipeline, batches) = orders::run(&dlq_path).await?;

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

    // The pipeline's picture with its counters, as Mermaid (GitHub renders
    // it in Markdown), or with `-- --dot` in Graphviz's format
    // (docs/observability.md shows both).
    let topology = pipeline.topology();
    if std::env::args().any(|a| a == "--dot") {
        println!("\npipeline (DOT):\n{}", topology.to_dot());
    } else {
        println!("\npipeline (Mermaid):\n{}", topology.to_mermaid());
    }
    pipeline.join().await?;
    Ok(())
}
