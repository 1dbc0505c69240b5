//! What the `metrics` feature costs, in one run: the five-stage chain of
//! `benches/chain.rs` (1,000,000 `u64` through five `x + 1` stages, each
//! its own task) and the composed pipeline of `benches/pipeline.rs`
//! (200,000 records: map, an async call per record, dead letters, filter,
//! batches), first with no recorder installed, then with a Prometheus
//! recorder (`metrics-exporter-prometheus`, no HTTP listener) installed
//! for the rest of the process.
//!
//! What the feature costs with no recorder against no feature at all is
//! measured in instructions: `scripts/instruction-counts.sh` with and
//! without `FEATURES=metrics` (docs/performance.md).
//!
//! Run: `cargo bench --bench metrics --features metrics`.

mod support;

#[path = "support/pipeline.rs"]
#[allow(dead_code)]
mod pipeline;

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;
use streamz::{Map, Stage};

const N: u64 = 1_000_000;
const RECORDS: u64 = 200_000;
const STAGES: usize = 5;

async fn chain() -> u64 {
    let mut flow = streamz::iter(0..N);
    for _ in 0..STAGES {
        flow = flow.pipe(Stage::new("inc", Map::new(|x: &u64| x + 1)));
    }
    let mut sum = 0;
    while let Some(chunk) = flow.next_chunk().await {
        sum += chunk.values().iter().sum::<u64>();
    }
    sum
}

async fn composed() -> u64 {
    pipeline::streamz_pipeline(RECORDS).await.values
}

type Case = fn() -> futures::future::BoxFuture<'static, u64>;

fn bench(c: &mut Criterion) {
    let runtimes = support::runtimes();
    let cases: [(&str, u64, Case); 2] = [
        ("chain_5_stages_1M", N, || chain().boxed()),
        ("pipeline_200k", RECORDS, || composed().boxed()),
    ];
    for recorder in ["no_recorder", "prometheus_recorder"] {
        if recorder == "prometheus_recorder" {
            // From here on every stage reports to it.
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            metrics::set_global_recorder(recorder).expect("installed once");
        }
        for (name, n, run) in cases {
            let mut group = c.benchmark_group(name);
            group.throughput(Throughput::Elements(n));
            group.sample_size(10);
            for (rt_name, rt) in &runtimes {
                group.bench_function(BenchmarkId::new(recorder, rt_name), |b| {
                    b.iter(|| black_box(rt.block_on(async { tokio::spawn(run()).await.unwrap() })))
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
