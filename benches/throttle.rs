//! Throttle overhead: 1,000,000 `u64` through a throttle whose rate never
//! binds, next to the same flow with a plain stage in its place (the
//! transport alone), in the same run.
//!
//! Run: `cargo bench --bench throttle`.

mod support;

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;
use streamz::Throttle;

const N: u64 = 1_000_000;

async fn drain(mut flow: streamz::Flow<u64>) -> u64 {
    let mut n = 0;
    while let Some(chunk) = flow.next_chunk().await {
        n += chunk.values().len() as u64;
    }
    n
}

async fn relay_only() -> u64 {
    drain(streamz::iter(0..N).async_boundary("relay")).await
}

async fn unlimited_throttle() -> u64 {
    let throttle = Throttle::new(u64::MAX, Duration::from_secs(1)).with_burst(u64::MAX);
    drain(streamz::iter(0..N).pipe(throttle)).await
}

async fn unlimited_throttle_with_cost() -> u64 {
    let throttle = Throttle::new(u64::MAX, Duration::from_secs(1))
        .with_burst(u64::MAX)
        .with_cost(|_: &u64| 1);
    drain(streamz::iter(0..N).pipe(throttle)).await
}

/// A bench case: builds the future that runs it once.
type Case = fn() -> futures::future::BoxFuture<'static, u64>;

fn throttle(c: &mut Criterion) {
    let mut group = c.benchmark_group("throttle_1M");
    group.throughput(Throughput::Elements(N));
    group.sample_size(10);
    for (rt_name, rt) in support::runtimes() {
        let cases: [(&str, Case); 3] = [
            ("streamz_relay_only", || relay_only().boxed()),
            ("throttle_unlimited", || unlimited_throttle().boxed()),
            ("throttle_unlimited_cost_fn", || {
                unlimited_throttle_with_cost().boxed()
            }),
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

criterion_group!(benches, throttle);
criterion_main!(benches);
