//! Batcher of size 100 over 1,000,000 `u64`, next to baselines in the same
//! run: `futures::StreamExt::chunks(100)` over the same iterator, and a
//! streamz flow without the batcher (the transport alone).
//!
//! Run: `cargo bench --bench batcher`.

mod support;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::{FutureExt, StreamExt};
use streamz::Batcher;

const N: u64 = 1_000_000;

async fn futures_chunks() -> u64 {
    futures::stream::iter(0..N)
        .chunks(100)
        .fold(0, |acc, b| async move { acc + b.len() as u64 })
        .await
}

async fn streamz_batcher() -> u64 {
    let batcher = Batcher::new(100, Duration::from_millis(10));
    let mut flow = streamz::iter(0..N).pipe(batcher);
    let mut n = 0;
    while let Some(chunk) = flow.next_chunk().await {
        n += chunk.values().iter().map(|b| b.len() as u64).sum::<u64>();
    }
    n
}

async fn streamz_no_batcher() -> u64 {
    let mut flow = streamz::iter(0..N).async_boundary("relay");
    let mut n = 0;
    while let Some(chunk) = flow.next_chunk().await {
        n += chunk.values().len() as u64;
    }
    n
}

/// A bench case: builds the future that runs it once.
type Case = fn() -> futures::future::BoxFuture<'static, u64>;

fn batcher(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch_100_1M");
    group.throughput(Throughput::Elements(N));
    group.sample_size(10);
    for (rt_name, rt) in support::runtimes() {
        let cases: [(&str, Case); 3] = [
            ("futures_chunks", || futures_chunks().boxed()),
            ("streamz_relay_only", || streamz_no_batcher().boxed()),
            ("streamz_batcher", || streamz_batcher().boxed()),
        ];
        for (case, run) in cases {
            assert_eq!(rt.block_on(async { tokio::spawn(run()).await.unwrap() }), N);
            group.bench_function(BenchmarkId::new(case, rt_name), |b| {
                b.iter(|| black_box(rt.block_on(async { tokio::spawn(run()).await.unwrap() })))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, batcher);
criterion_main!(benches);
