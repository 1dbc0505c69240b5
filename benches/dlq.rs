//! The dead-letter queue's file sink in records per second, for each fsync
//! policy, next to the channel sink (the stage and its writer task without
//! any file) in the same run. Every one of the 20,000 items is an error
//! carrying a small struct, so every item becomes a record.
//!
//! Run: `cargo bench --bench dlq`. The files go to the system's temporary
//! directory; what an fsync costs depends on the disk under it.

mod support;

use std::path::Path;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::Serialize;
use streamz::dlq::{self, DeadLetterSink, FileSink, Fsync};
use streamz::{DeadLetterQueue, StreamError};

const N: u64 = 20_000;

#[derive(Debug, Clone, Serialize)]
struct Order {
    id: u64,
    customer: &'static str,
    cents: i64,
}

fn failures() -> impl Iterator<Item = streamz::Result<Order>> + Send + 'static {
    (0..N).map(|id| {
        Err(
            StreamError::failed("price", "quota exceeded").with_item(Order {
                id,
                customer: "customer-0001",
                cents: 1999,
            }),
        )
    })
}

/// Runs every failure through a dead-letter queue into `sink`.
async fn run<S: DeadLetterSink<Order>>(sink: S) {
    let out = streamz::try_stream(futures::stream::iter(failures()))
        .pipe(DeadLetterQueue::new(sink))
        .collect()
        .await;
    assert!(out.is_empty());
}

async fn channel_sink() {
    let (sink, letters) = dlq::channel::<Order>(1024);
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        while letters.recv().await.is_ok() {
            n += 1;
        }
        n
    });
    run(sink).await;
    assert_eq!(reader.await.unwrap(), N);
}

async fn file_sink(path: &Path, fsync: Fsync) {
    let _ = std::fs::remove_file(path);
    let sink = FileSink::<Order>::create(path)
        .await
        .unwrap()
        .with_fsync(fsync);
    let stats = sink.stats();
    run(sink).await;
    assert_eq!(stats.records(), N);
}

fn dlq(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.dlq.jsonl");
    let mut group = c.benchmark_group("dlq_20k_records");
    group.throughput(Throughput::Elements(N));
    group.sample_size(10);
    let policies = [
        ("file_never", Fsync::Never),
        (
            "file_interval_100ms",
            Fsync::Interval(Duration::from_millis(100)),
        ),
        ("file_every_1000", Fsync::EveryN(1000)),
        ("file_every_record", Fsync::EveryRecord),
    ];
    for (rt_name, rt) in support::runtimes() {
        group.bench_function(BenchmarkId::new("channel", rt_name), |b| {
            b.iter(|| rt.block_on(channel_sink()))
        });
        for (name, fsync) in policies {
            group.bench_function(BenchmarkId::new(name, rt_name), |b| {
                b.iter(|| rt.block_on(file_sink(&path, fsync)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, dlq);
criterion_main!(benches);
