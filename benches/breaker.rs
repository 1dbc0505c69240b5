//! The circuit breaker's overhead in the closed state: the same
//! AsyncMapper pipeline (concurrency 4, ordered) with and without a
//! `CircuitBreaker` around its call, in the same run, for a trivial call
//! (the worst case: the breaker's cost against almost nothing) and for a
//! call doing about a microsecond of work.
//!
//! Run: `cargo bench --bench breaker --features circuit-breaker`.

mod support;

use std::convert::Infallible;
use std::future::ready;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;
use streamz::breaker::{Breaker, BreakerConfig, CircuitBreaker};
use streamz::{AsyncMapper, Processor};

/// The call: `x + 1` after `work` rounds of arithmetic the optimiser
/// cannot remove.
fn call(x: u64, work: u32) -> u64 {
    let mut h = x;
    for i in 0..work {
        h = black_box(h.rotate_left(5) ^ u64::from(i)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    black_box(h);
    x + 1
}

async fn run<P: Processor<u64, u64>>(n: u64, stage: P) -> u64 {
    let mut flow = streamz::iter(0..n).pipe(stage);
    let mut sum = 0u64;
    while let Some(chunk) = flow.next_chunk().await {
        sum = chunk.values().iter().fold(sum, |a, x| a.wrapping_add(*x));
    }
    sum
}

async fn plain(n: u64, work: u32) -> u64 {
    let mapper = AsyncMapper::new(move |x: &u64| ready(Ok::<u64, Infallible>(call(*x, work))))
        .with_concurrency(4);
    run(n, mapper).await
}

async fn guarded(n: u64, work: u32, breaker: Breaker) -> u64 {
    let stage = CircuitBreaker::new(breaker, move |x: &u64| {
        ready(Ok::<u64, Infallible>(call(*x, work)))
    })
    .with_concurrency(4);
    run(n, stage).await
}

fn breaker(c: &mut Criterion) {
    // (name, items, rounds of work per call: about 1 µs at 800)
    for (group_name, n, work) in [
        ("breaker_trivial_1M", 1_000_000u64, 0u32),
        ("breaker_1us_100k", 100_000, 800),
    ] {
        let expected: u64 = (1..=n).sum();
        let mut group = c.benchmark_group(group_name);
        group.throughput(Throughput::Elements(n));
        group.sample_size(10);
        for (rt_name, rt) in support::runtimes() {
            let breaker = Breaker::new("bench", BreakerConfig::default());
            type Case = Box<dyn Fn() -> futures::future::BoxFuture<'static, u64>>;
            let cases: [(&str, Case); 2] = [
                ("async_mapper", Box::new(move || plain(n, work).boxed())),
                ("circuit_breaker", {
                    let breaker = breaker.clone();
                    Box::new(move || guarded(n, work, breaker.clone()).boxed())
                }),
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
            assert_eq!(breaker.state(), streamz::breaker::BreakerState::Closed);
        }
        group.finish();
    }
}

criterion_group!(benches, breaker);
criterion_main!(benches);
