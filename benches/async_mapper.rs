//! AsyncMapper with a trivial async function over 1,000,000 `u64`, ordered
//! and unordered, concurrency 2 and 8, next to
//! `futures::StreamExt::buffered` / `buffer_unordered` doing the same work
//! in the same run.
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
    let mapper = AsyncMapper::new(|x: &u64| ready(Ok::<u64, Infallible>(x + 1)))
        .with_concurrency(c)
        .unwrap();
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

criterion_group!(benches, async_mapper);
criterion_main!(benches);
