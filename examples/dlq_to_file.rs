//! Route failures to a durable dead-letter file, then replay it: read the
//! records back, fix the items, and feed them through the pipeline again.
//!
//! Run: `cargo run --example dlq_to_file`

use std::time::Duration;

use serde::{Deserialize, Serialize};
use streamz::dlq::{FileSink, Fsync, Replay};
use streamz::{AsyncMapper, ConfigError, DeadLetter, DeadLetterQueue, Pipeline, Processor, Retry};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payment {
    id: u32,
    account: String,
    cents: i64,
}

#[derive(Debug, thiserror::Error)]
enum LedgerError {
    #[error("account `{0}` is unknown to the ledger")]
    UnknownAccount(String),
    #[error("the ledger is unavailable")]
    Unavailable,
}

/// A stand-in for a ledger service: it does not know accounts starting
/// with `x-` (a data problem, not worth retrying), and is down for every
/// tenth payment while `down` is true.
async fn post(payment: Payment, down: bool) -> Result<u32, LedgerError> {
    tokio::time::sleep(Duration::from_millis(1)).await;
    if payment.account.starts_with("x-") {
        return Err(LedgerError::UnknownAccount(payment.account));
    }
    if down && payment.id % 10 == 0 {
        return Err(LedgerError::Unavailable);
    }
    Ok(payment.id)
}

/// The posting stage: 8 calls at a time, 3 attempts for an unavailable
/// ledger, none for an unknown account.
fn ledger(down: bool) -> Result<impl Processor<Payment, u32>, ConfigError> {
    Ok(AsyncMapper::new(move |p: &Payment| post(p.clone(), down))
        .named("post")
        .with_concurrency(8)
        .with_retry(
            Retry::attempts(3).with_backoff(Duration::from_millis(2), Duration::from_millis(10)),
        )
        .retry_if(|e: &LedgerError| matches!(e, LedgerError::Unavailable)))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The file is kept after the run for you to read; each run starts it
    // afresh.
    let path = std::env::temp_dir().join("streamz-payments.dlq.jsonl");
    let _ = std::fs::remove_file(&path);

    let payments: Vec<Payment> = (1..=200)
        .map(|id| Payment {
            id,
            account: if id % 25 == 0 {
                format!("x-{id}")
            } else {
                format!("acct-{id}")
            },
            cents: i64::from(id) * 100,
        })
        .collect();

    // 1. The first run: the ledger is down for some payments and does not
    //    know some accounts. Failures go to the file, synced every 50
    //    records and at the end.
    let sink = FileSink::<Payment>::create(&path)
        .await?
        .with_fsync(Fsync::EveryN(50));
    let stats = sink.stats();
    let pipeline = Pipeline::new();
    let posted = pipeline
        .iter(payments)
        .pipe(ledger(true)?)
        .pipe(DeadLetterQueue::new(sink))
        .collect()
        .await;
    let dlq = pipeline
        .stage_metrics("dead_letter_queue")
        .expect("the stage exists");
    println!(
        "first run: {} posted, {} dead-lettered to {} ({} records, {} sync(s))",
        posted.len(),
        dlq.dead_lettered,
        path.display(),
        stats.records(),
        stats.syncs()
    );
    pipeline.join().await?;

    // 2. Replay: read the records, fix what can be fixed, post again.
    println!("replay (the first records):");
    let replay = Replay::<Payment>::open(&path).await?;
    let read = replay.stats();
    let pipeline = Pipeline::new();
    let fixed = pipeline
        .try_stream(replay)
        .tap(|r: &DeadLetter<Payment>| {
            if r.sequence > 4 {
                return;
            }
            println!(
                "  record {:>2}: payment {:>3} failed in `{}` ({}) after {} attempt(s): {}",
                r.sequence,
                r.item.as_ref().map_or(0, |p| p.id),
                r.stage,
                r.kind,
                r.attempts,
                r.message
            )
        })
        .try_map(|r: &DeadLetter<Payment>| {
            let mut payment = r.item.clone().ok_or("the record kept no item")?;
            // The fix: unknown `x-` accounts were migrated to `acct-`.
            if let Some(rest) = payment.account.strip_prefix("x-") {
                payment.account = format!("acct-{rest}");
            }
            Ok::<_, &str>(payment)
        })
        .pipe(ledger(false)?)
        .collect()
        .await;
    let (ok, failed): (Vec<_>, Vec<_>) = fixed.into_iter().partition(Result::is_ok);
    println!(
        "replay: {} records read ({} torn), {} posted, {} failed again",
        read.records(),
        read.torn(),
        ok.len(),
        failed.len()
    );
    pipeline.join().await?;
    Ok(())
}
