//! The catalogue operators over 1,000,000 `u64`, each next to the streamz
//! transport alone (a flow with one `async_boundary`: the same number of
//! tasks and channels, no operator) and, where futures has the same
//! combinator, the futures version, in the same run.
//!
//! Run: `cargo bench --bench catalogue`.

mod support;

use std::collections::HashSet;
use std::future::ready;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use streamz::{
    Buffer, Debounce, Dedupe, Flow, Partition, Sample, Skip, Stage, Switch, Take, Tumbling, Unbatch,
};

const N: u64 = 1_000_000;

/// Counts the values of `flow` (windows and batches by their contents).
async fn count<T: Send + 'static>(mut flow: Flow<T>, size: impl Fn(&T) -> u64) -> u64 {
    let mut n = 0;
    while let Some(chunk) = flow.next_chunk().await {
        n += chunk.values().iter().map(&size).sum::<u64>();
    }
    n
}

fn one(_: &u64) -> u64 {
    1
}

type Case = (&'static str, fn() -> BoxFuture<'static, u64>);

fn cases() -> Vec<(&'static str, Vec<Case>)> {
    vec![
        (
            "relay",
            vec![("streamz_relay_only", || {
                count(streamz::iter(0..N).async_boundary("relay"), one).boxed()
            })],
        ),
        (
            "skip",
            vec![
                ("futures_skip", || {
                    futures::stream::iter(0..N)
                        .skip(1000)
                        .count()
                        .map(|n| n as u64)
                        .boxed()
                }),
                ("streamz_skip", || {
                    let flow = streamz::iter(0..N).pipe(Stage::new("skip", Skip::new(1000)));
                    count(flow, one).boxed()
                }),
            ],
        ),
        (
            "take",
            vec![
                ("futures_take", || {
                    futures::stream::iter(0u64..)
                        .take(N as usize)
                        .count()
                        .map(|n| n as u64)
                        .boxed()
                }),
                ("streamz_take", || {
                    count(streamz::iter(0u64..).pipe(Take::new(N)), one).boxed()
                }),
            ],
        ),
        (
            "sample",
            vec![
                ("futures_filter_rng", || {
                    let mut rng = fastrand::Rng::with_seed(1);
                    futures::stream::iter(0..N)
                        .filter(move |_| ready(rng.f64() < 0.5))
                        .count()
                        .map(|n| n as u64)
                        .boxed()
                }),
                ("streamz_sample", || {
                    let sample = Sample::new(0.5).with_seed(1);
                    count(streamz::iter(0..N).pipe(Stage::new("sample", sample)), one).boxed()
                }),
            ],
        ),
        (
            "unbatch_100",
            vec![
                ("futures_flat_map", || {
                    futures::stream::iter(
                        (0..N / 100).map(|b| (b * 100..b * 100 + 100).collect::<Vec<u64>>()),
                    )
                    .flat_map(futures::stream::iter)
                    .count()
                    .map(|n| n as u64)
                    .boxed()
                }),
                ("streamz_unbatch", || {
                    let batches =
                        (0..N / 100).map(|b| (b * 100..b * 100 + 100).collect::<Vec<u64>>());
                    let flow = streamz::iter(batches).pipe(Stage::new("unbatch", Unbatch::new()));
                    count(flow, one).boxed()
                }),
            ],
        ),
        (
            "dedupe_1k_keys",
            vec![
                ("futures_filter_hashset", || {
                    let mut seen = HashSet::new();
                    futures::stream::iter(0..N)
                        .filter(move |x| ready(seen.insert(x % 1000)))
                        .count()
                        .map(|n| n as u64)
                        .boxed()
                }),
                ("streamz_dedupe", || {
                    let dedupe = Dedupe::new(|x: &u64| x % 1000, 10_000, Duration::from_secs(3600));
                    count(streamz::iter(0..N).pipe(Stage::new("dedupe", dedupe)), one).boxed()
                }),
            ],
        ),
        (
            "buffer_100k",
            vec![("streamz_buffer", || {
                count(streamz::iter(0..N).pipe(Buffer::new(100_000)), one).boxed()
            })],
        ),
        (
            "debounce",
            vec![("streamz_debounce", || {
                // One burst: everything but the last value is replaced.
                let flow = streamz::iter(0..N).pipe(Debounce::new(Duration::from_millis(1)));
                count(flow, one).boxed()
            })],
        ),
        (
            "partition_4",
            vec![("streamz_partition_round_robin", || {
                async {
                    let flows = streamz::iter(0..N).partition(Partition::round_robin(4));
                    let counts =
                        futures::future::join_all(flows.into_iter().map(|f| count(f, one))).await;
                    counts.iter().sum()
                }
                .boxed()
            })],
        ),
        (
            "switch_2",
            vec![("streamz_switch", || {
                async {
                    let switch = Switch::new(|x: &u64| x % 2).route(0).route(1);
                    let mut routes = streamz::iter(0..N).switch(switch);
                    let (a, b) = (routes.take(&0).unwrap(), routes.take(&1).unwrap());
                    let (a, b) = tokio::join!(count(a, one), count(b, one));
                    a + b
                }
                .boxed()
            })],
        ),
        (
            "tumbling_window",
            vec![("streamz_tumbling", || {
                let flow = streamz::iter(0..N).pipe(Tumbling::new(Duration::from_secs(3600)));
                count(flow, |w| w.items.len() as u64).boxed()
            })],
        ),
    ]
}

fn catalogue(c: &mut Criterion) {
    let mut group = c.benchmark_group("catalogue_1M");
    group.throughput(Throughput::Elements(N));
    group.sample_size(10);
    for (rt_name, rt) in support::runtimes() {
        for (op, runs) in cases() {
            for (case, run) in runs {
                let once = || rt.block_on(async { tokio::spawn(run()).await.unwrap() });
                black_box(once());
                let id = BenchmarkId::new(format!("{op}/{case}"), rt_name);
                group.bench_function(id, |b| b.iter(|| black_box(once())));
            }
        }
    }
    group.finish();
}

criterion_group!(benches, catalogue);
criterion_main!(benches);
