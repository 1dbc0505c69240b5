//! The composed pipeline of `benches/pipeline.rs` and
//! `examples/pipeline_memory.rs`, written twice: with streamz operators and
//! with `futures::StreamExt` combinators, doing the same work.
//!
//! records → map (price) → async call (concurrency 4, ordered; 1 % fail)
//! → failures to a dead-letter channel → filter (drop a third) → batches of
//! 100 → sink (count batches and values).

use std::future::ready;
use std::time::Duration;

use futures::StreamExt;
use streamz::{AsyncMapper, Batcher, DeadLetterQueue};

/// One input record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub id: u64,
    pub cents: u64,
}

/// What a run produced, to check the two versions agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    pub values: u64,
    pub batches: u64,
    pub dead_letters: u64,
    pub checksum: u64,
}

fn record(id: u64) -> Record {
    Record { id, cents: id * 3 }
}

fn price(r: &Record) -> Record {
    Record {
        id: r.id,
        cents: r.cents * 6 / 5,
    }
}

/// The async call: trivial, failing for 1 % of the records.
fn call(r: &Record) -> std::future::Ready<Result<u64, &'static str>> {
    ready(if r.id % 100 == 7 {
        Err("the service refused the record")
    } else {
        Ok(r.cents + 1)
    })
}

fn keep(v: &u64) -> bool {
    v % 3 != 0
}

/// Reads dead letters until the channel closes; returns how many.
async fn drain<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> u64 {
    let mut n = 0;
    while rx.recv().await.is_some() {
        n += 1;
    }
    n
}

pub async fn streamz_pipeline(n: u64) -> Summary {
    let (dead, letters) = streamz::dlq::channel::<Record>(1024);
    let dead_letters = tokio::spawn(async move {
        let mut n = 0;
        while letters.recv().await.is_ok() {
            n += 1;
        }
        n
    });
    let mut flow = streamz::iter((0..n).map(record))
        .map(price)
        .pipe(AsyncMapper::new(call).with_concurrency(4))
        .pipe(DeadLetterQueue::new(dead))
        .filter(keep)
        .pipe(Batcher::new(100, Duration::from_millis(10)));
    let mut s = Summary::default();
    while let Some(chunk) = flow.next_chunk().await {
        for batch in chunk.values() {
            s.batches += 1;
            s.values += batch.len() as u64;
            s.checksum = batch.iter().fold(s.checksum, |a, v| a.wrapping_add(*v));
        }
    }
    s.dead_letters = dead_letters.await.unwrap();
    s
}

pub async fn futures_pipeline(n: u64) -> Summary {
    let (dead, letters) = tokio::sync::mpsc::channel::<Record>(1024);
    let dead_letters = tokio::spawn(drain(letters));
    let batches = futures::stream::iter((0..n).map(record))
        .map(|r| price(&r))
        .map(|r| async move { call(&r).await.map_err(|_| r) })
        .buffered(4)
        .filter_map(|result| {
            // The sender is cloned only for a failure (1 %).
            let failed = result.err().map(|r| (r, dead.clone()));
            let value = result.ok();
            async move {
                if let Some((r, dead)) = failed {
                    dead.send(r).await.ok();
                }
                value
            }
        })
        .filter(|v| ready(keep(v)))
        .chunks(100);
    let s = batches
        .fold(Summary::default(), |mut s, batch| {
            s.batches += 1;
            s.values += batch.len() as u64;
            s.checksum = batch.iter().fold(s.checksum, |a, v| a.wrapping_add(*v));
            ready(s)
        })
        .await;
    drop(dead);
    Summary {
        dead_letters: dead_letters.await.unwrap(),
        ..s
    }
}
