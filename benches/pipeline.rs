//! The composed pipeline as users run it: 1,000,000 records through map →
//! AsyncMapper (trivial async call, concurrency 4, ordered, 1 % failing) →
//! DeadLetterQueue to a channel sink → filter → Batcher (100) → sink, next
//! to the same work written with `futures::StreamExt` combinators and to
//! the raw chunked relay of the core bench (five hops), in the same run,
//! on both runtime flavours. The workload is in `support/pipeline.rs`,
//! shared with `examples/pipeline_memory.rs`.
//!
//! Run: `cargo bench --bench pipeline`.

#[path = "support/pipeline.rs"]
#[allow(dead_code)]
mod pipeline;
mod support;

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;

const N: u64 = 1_000_000;

fn composed(c: &mut Criterion) {
    let expected = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(pipeline::futures_pipeline(N));
    assert_eq!(expected.dead_letters, N / 100);
    let mut group = c.benchmark_group("pipeline_1M");
    group.throughput(Throughput::Elements(N));
    group.sample_size(10);
    for (rt_name, rt) in support::runtimes() {
        assert_eq!(
            rt.block_on(async { tokio::spawn(pipeline::streamz_pipeline(N)).await.unwrap() }),
            expected
        );
        type Case = fn() -> futures::future::BoxFuture<'static, u64>;
        let cases: [(&str, Case); 3] = [
            ("raw_relay_5_hops", || support::raw_relay(N, 5).boxed()),
            ("futures_combinators", || {
                pipeline::futures_pipeline(N).map(|s| s.values).boxed()
            }),
            ("streamz", || {
                pipeline::streamz_pipeline(N).map(|s| s.values).boxed()
            }),
        ];
        for (case, run) in cases {
            group.bench_function(BenchmarkId::new(case, rt_name), |b| {
                b.iter(|| black_box(rt.block_on(async { tokio::spawn(run()).await.unwrap() })))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, composed);
criterion_main!(benches);
