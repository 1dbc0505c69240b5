//! AsyncMapper with a trivial async function over 1,000,000 `u64`, ordered
//! and unordered, concurrency 2 and 8, next to
//! `futures::StreamExt::buffered` / `buffer_unordered` doing the same work
//! in the same run.
//!
//! `async_map_head_of_line`: the cost of order on the real clock. 2,000
//! calls that take 1 ms, every 50th 20 ms (a slow dependency's tail), at
//! concurrency 16, ordered and unordered: in ordered mode a slow call holds
//! back the finished ones behind it, and their slots, until it is done.
//!
//! Run: `cargo bench --bench async_mapper`.

mod support;

use std::convert::Infallible;
use std::future::ready;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::{FutureExt, StreamExt};
use streamz::AsyncMapper;

const N: u64 = 1_000_000;

async fn futures_buffered(c: usize, ordered: bool) -> u64 {
    let calls = futures::stream::iter(0..N).map(|x| ready(x + 1));
    let sum = |acc: u64, x: u64| ready(acc.wrapping_add(x));
    if ordered {
        calls.buffered(c).fold(0, sum).await
    } else {
        calls.buffer_unordered(c).fold(0, sum).await
    }
}

async fn streamz_mapper(c: usize, ordered: bool) -> u64 {
    let mapper =
        AsyncMapper::new(|x: &u64| ready(Ok::<u64, Infallible>(x + 1))).with_concurrency(c);
    let mapper = if ordered { mapper } else { mapper.unordered() };
    let mut flow = streamz::iter(0..N).pipe(mapper);
    let mut sum = 0u64;
    while let Some(chunk) = flow.next_chunk().await {
        sum = chunk.values().iter().fold(sum, |a, x| a.wrapping_add(*x));
    }
    sum
}

fn async_mapper(c: &mut Criterion) {
    let expected: u64 = (1..=N).sum();
    let mut group = c.benchmark_group("async_map_1M");
    group.throughput(Throughput::Elements(N));
    group.sample_size(10);
    for (rt_name, rt) in support::runtimes() {
        for conc in [2, 8] {
            for ordered in [true, false] {
                let (base, ours) = if ordered {
                    ("futures_buffered", "streamz_ordered")
                } else {
                    ("futures_buffer_unordered", "streamz_unordered")
                };
                for (case, streamz) in [(base, false), (ours, true)] {
                    let run = move || {
                        if streamz {
                            streamz_mapper(conc, ordered).boxed()
                        } else {
                            futures_buffered(conc, ordered).boxed()
                        }
                    };
                    let once = || rt.block_on(async { tokio::spawn(run()).await.unwrap() });
                    assert_eq!(once(), expected);
                    let id = BenchmarkId::new(format!("{case}_c{conc}"), rt_name);
                    group.bench_function(id, |b| b.iter(|| black_box(once())));
                }
            }
        }
    }
    group.finish();
}

const CALLS: u64 = 2_000;

/// 1 ms per call, 20 ms for every 50th.
async fn slow_tail(x: u64) -> Result<u64, Infallible> {
    let ms = if x % 50 == 49 { 20 } else { 1 };
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    Ok(x)
}

async fn head_of_line_run(ordered: bool) -> u64 {
    let mapper = AsyncMapper::new(|x: &u64| slow_tail(*x)).with_concurrency(16);
    let mapper = if ordered { mapper } else { mapper.unordered() };
    let mut flow = streamz::iter(0..CALLS).pipe(mapper);
    let mut n = 0;
    while let Some(chunk) = flow.next_chunk().await {
        n += chunk.values().len() as u64;
    }
    n
}

fn head_of_line(c: &mut Criterion) {
    let mut group = c.benchmark_group("async_map_head_of_line");
    group.throughput(Throughput::Elements(CALLS));
    group.sample_size(10);
    for (rt_name, rt) in support::runtimes() {
        for (case, ordered) in [("ordered_c16", true), ("unordered_c16", false)] {
            let once =
                || rt.block_on(async { tokio::spawn(head_of_line_run(ordered)).await.unwrap() });
            assert_eq!(once(), CALLS);
            group.bench_function(BenchmarkId::new(case, rt_name), |b| {
                b.iter(|| black_box(once()))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, async_mapper, head_of_line);
criterion_main!(benches);
