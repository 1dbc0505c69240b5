//! 1,000,000 `u64` through five `x + 1` stages, next to two baselines in
//! the same run:
//!
//! - `raw_relay`: five tasks passing `Vec<u64>` chunks (up to 256) over
//!   bounded tokio channels, the floor DESIGN.md measured for chunked
//!   transport;
//! - `futures_map`: a `futures::StreamExt::map` chain of five maps over
//!   `stream::iter`, polled by one task.
//!
//! and the streamz chain twice: `streamz_stages` (five real stages, each its
//! own task and channel) and `streamz_fused` (five fused maps, one task).
//!
//! Run: `cargo bench --bench chain`. Each case runs on a 2-worker
//! multi-thread runtime and on a current-thread runtime.

mod support;

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::{FutureExt, StreamExt};
use streamz::{Map, Stage};

const N: u64 = 1_000_000;
const STAGES: usize = 5;

async fn raw_relay() -> u64 {
    support::raw_relay(N, STAGES).await
}

async fn futures_map() -> u64 {
    futures::stream::iter(0..N)
        .map(|x| x + 1)
        .map(|x| x + 1)
        .map(|x| x + 1)
        .map(|x| x + 1)
        .map(|x| x + 1)
        .fold(0, |acc, x| async move { acc + x })
        .await
}

async fn sum(flow: streamz::Flow<u64>) -> u64 {
    let mut flow = flow;
    let mut sum = 0;
    while let Some(chunk) = flow.next_chunk().await {
        assert!(!chunk.has_errors());
        sum += chunk.values().iter().sum::<u64>();
    }
    sum
}

async fn streamz_stages() -> u64 {
    let mut flow = streamz::iter(0..N);
    for _ in 0..STAGES {
        flow = flow.pipe(Stage::new("inc", Map::new(|x: &u64| x + 1)));
    }
    sum(flow).await
}

async fn streamz_fused() -> u64 {
    let mut flow = streamz::iter(0..N);
    for _ in 0..STAGES {
        flow = flow.map(|x: &u64| x + 1);
    }
    sum(flow).await
}

/// A bench case: builds the future that runs it once.
type Case = fn() -> futures::future::BoxFuture<'static, u64>;

fn chain(c: &mut Criterion) {
    let expected = (0..N).map(|x| x + STAGES as u64).sum::<u64>();
    let mut group = c.benchmark_group("chain_5_maps_1M");
    group.throughput(Throughput::Elements(N));
    group.sample_size(10);
    for (rt_name, rt) in support::runtimes() {
        // Each case runs inside one spawned task so that both runtime
        // flavours measure the same thing (the block_on thread is not a
        // worker of the multi-thread runtime).
        let cases: [(&str, Case); 4] = [
            ("raw_relay", || raw_relay().boxed()),
            ("futures_map", || futures_map().boxed()),
            ("streamz_stages", || streamz_stages().boxed()),
            ("streamz_fused", || streamz_fused().boxed()),
        ];
        for (case, run) in cases {
            assert_eq!(
                rt.block_on(async { tokio::spawn(run()).await.unwrap() }),
                expected
            );
            group.bench_function(BenchmarkId::new(case, rt_name), |b| {
                b.iter(|| black_box(rt.block_on(async { tokio::spawn(run()).await.unwrap() })))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, chain);
criterion_main!(benches);
