//! `ParMap` against the serial stage, on the 2-worker multi-thread runtime:
//!
//! - `cpu_10us`: 20,000 items through a CPU-bound function of about 10 µs
//!   per item (rounds of a hash), as a `Stage` map (one core) and as a
//!   `ParMap` with 2 workers;
//! - `trivial`: 1,000,000 items through `x + 1` both ways: what `ParMap`
//!   costs where there is nothing to spread.
//!
//! Run: `cargo bench --bench parallel`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use streamz::{Map, ParMap, Stage};

/// Rounds of the hash making about 10 µs on the development machine.
const ROUNDS: u64 = 20_000;

fn heavy(n: &u64) -> u64 {
    (0..ROUNDS).fold(*n, |h, i| h.rotate_left(5) ^ i.wrapping_mul(0x9e37_79b9))
}

fn trivial(n: &u64) -> u64 {
    n + 1
}

async fn sum(mut flow: streamz::Flow<u64>) -> u64 {
    let mut s = 0u64;
    while let Some(chunk) = flow.next_chunk().await {
        s = chunk.values().iter().fold(s, |a, x| a.wrapping_add(*x));
    }
    s
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    for (name, n, f) in [
        ("cpu_10us", 20_000u64, heavy as fn(&u64) -> u64),
        ("trivial", 1_000_000, trivial),
    ] {
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(n));
        group.sample_size(10);
        let serial = move || async move {
            sum(streamz::iter(0..n).pipe(Stage::new("map", Map::new(f)))).await
        };
        let parallel = move || async move {
            sum(streamz::iter(0..n).pipe(ParMap::new(f).with_workers(2))).await
        };
        let expected = rt.block_on(async { tokio::spawn(serial()).await.unwrap() });
        assert_eq!(
            rt.block_on(async { tokio::spawn(parallel()).await.unwrap() }),
            expected
        );
        group.bench_function(BenchmarkId::new("stage_map", "multi_thread_2"), |b| {
            b.iter(|| black_box(rt.block_on(async { tokio::spawn(serial()).await.unwrap() })))
        });
        group.bench_function(BenchmarkId::new("par_map_2", "multi_thread_2"), |b| {
            b.iter(|| black_box(rt.block_on(async { tokio::spawn(parallel()).await.unwrap() })))
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
