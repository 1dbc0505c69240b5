//! What the `metrics` feature costs, in one run: the five-stage chain of
//! `benches/chain.rs` (1,000,000 `u64` through five `x + 1` stages, each
//! its own task) and the composed pipeline of `benches/pipeline.rs`
//! (200,000 records: map, an async call per record, dead letters, filter,
//! batches), with no recorder and with a Prometheus recorder
//! (`metrics-exporter-prometheus`, no HTTP listener).
//!
//! The two alternate, twice each (`no_recorder_1`, `recorder_1`,
//! `no_recorder_2`, `recorder_2`), so the drift of a noisy machine over the
//! run shows as the difference between the two runs of one case instead of
//! as a cost. A global recorder cannot be removed, so the one installed
//! hands out the Prometheus recorder's handles while switched on and no-op
//! handles while off; stages take their handles when they start, so each
//! run gets the handles of the state it starts in.
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

use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use streamz::{Map, Stage};

/// Whether [`Switch`] hands out the Prometheus recorder's handles.
static ON: AtomicBool = AtomicBool::new(false);

/// The Prometheus recorder, or nothing, by [`ON`].
struct Switch(PrometheusRecorder);

impl Recorder for Switch {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        match ON.load(Ordering::Relaxed) {
            true => self.0.register_counter(key, metadata),
            false => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        match ON.load(Ordering::Relaxed) {
            true => self.0.register_gauge(key, metadata),
            false => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        match ON.load(Ordering::Relaxed) {
            true => self.0.register_histogram(key, metadata),
            false => Histogram::noop(),
        }
    }
}

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
    metrics::set_global_recorder(Switch(PrometheusBuilder::new().build_recorder()))
        .expect("the only recorder");
    let runtimes = support::runtimes();
    let cases: [(&str, u64, Case); 2] = [
        ("chain_5_stages_1M", N, || chain().boxed()),
        ("pipeline_200k", RECORDS, || composed().boxed()),
    ];
    for (name, n, run) in cases {
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(n));
        group.sample_size(10);
        for (rt_name, rt) in &runtimes {
            for (case, on) in [
                ("no_recorder_1", false),
                ("recorder_1", true),
                ("no_recorder_2", false),
                ("recorder_2", true),
            ] {
                ON.store(on, Ordering::Relaxed);
                group.bench_function(BenchmarkId::new(case, rt_name), |b| {
                    b.iter(|| black_box(rt.block_on(async { tokio::spawn(run()).await.unwrap() })))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
