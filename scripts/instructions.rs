//! One workload per run, for instruction counts under cachegrind: see
//! scripts/instruction-counts.sh, which copies this file into a tree's
//! examples/ to build it (it is not an example of its own: it needs an
//! argument).
#[path = "../benches/support/pipeline.rs"] // copied into examples/ by scripts/instruction-counts.sh
#[allow(dead_code)]
mod pipeline;

use std::convert::Infallible;
use std::future::ready;
use std::time::Duration;
use streamz::{AsyncMapper, Batcher, Map, Stage};

const N: u64 = 1_000_000;

async fn sum(mut flow: streamz::Flow<u64>) -> u64 {
    let mut s = 0u64;
    while let Some(c) = flow.next_chunk().await {
        s = c.values().iter().fold(s, |a, x| a.wrapping_add(*x));
    }
    s
}

async fn work(which: &str) -> u64 {
    match which {
        "mapper_c2" => {
            let m = AsyncMapper::new(|x: &u64| ready(Ok::<u64, Infallible>(x + 1))).with_concurrency(2);
            sum(streamz::iter(0..N).pipe(m)).await
        }
        "mapper_c8_unordered" => {
            let m = AsyncMapper::new(|x: &u64| ready(Ok::<u64, Infallible>(x + 1))).with_concurrency(8).unordered();
            sum(streamz::iter(0..N).pipe(m)).await
        }
        "pipeline" => pipeline::streamz_pipeline(N).await.values,
        "stages" => {
            let mut f = streamz::iter(0..N);
            for _ in 0..5 { f = f.pipe(Stage::new("inc", Map::new(|x: &u64| x + 1))); }
            sum(f).await
        }
        "fused" => {
            let mut f = streamz::iter(0..N);
            for _ in 0..5 { f = f.map(|x: &u64| x + 1); }
            sum(f).await
        }
        "batcher" => {
            let mut flow = streamz::iter(0..N).pipe(Batcher::new(100, Duration::from_millis(10)));
            let mut n = 0;
            while let Some(c) = flow.next_chunk().await { n += c.values().iter().map(|b| b.len() as u64).sum::<u64>(); }
            n
        }
        // Needs the `circuit-breaker` feature: FEATURES=circuit-breaker.
        #[cfg(feature = "circuit-breaker")]
        "breaker" => {
            use streamz::breaker::{Breaker, BreakerConfig, CircuitBreaker};
            let b = Breaker::new("b", BreakerConfig::default());
            let m = CircuitBreaker::new(b, |x: &u64| ready(Ok::<u64, Infallible>(x + 1))).with_concurrency(4);
            sum(streamz::iter(0..N).pipe(m)).await
        }
        _ => panic!("which?"),
    }
}

fn main() {
    let which = std::env::args().nth(1).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let w = which.clone();
    let r = rt.block_on(async move { tokio::spawn(async move { work(&w).await }).await.unwrap() });
    println!("{which}: {r}");
}
