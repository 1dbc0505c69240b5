//! Throttle accuracy on the real clock: the delivered rate with burst 1 at
//! 100/s, 1,000/s and 10,000/s, over 10 s each, on both runtimes.
//!
//! A paused clock in the tests cannot show timer lag (tokio's timer fires up
//! to about a millisecond late); this measures it. Each case feeds an
//! endless input through `Throttle::new(rate, 1 s)` and counts what a
//! consumer receives in the window; the figure is the delivered rate over
//! the configured one.
//!
//! Run: `cargo bench --bench throttle_rate` (about a minute).
//! `STREAMZ_RATE_SECS=2` shortens each case.

use std::time::{Duration, Instant};

use streamz::Throttle;

fn measure(rt: &tokio::runtime::Runtime, rate: u64, window: Duration) -> f64 {
    rt.block_on(async {
        let throttle = Throttle::new(rate, Duration::from_secs(1));
        let mut flow = streamz::iter(0u64..).pipe(throttle);
        // The first item passes at once (a full bucket); time from it.
        let _ = flow.next_chunk().await;
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < window {
            match flow.next_chunk().await {
                Some(chunk) => n += chunk.len() as u64,
                None => break,
            }
        }
        let secs = start.elapsed().as_secs_f64();
        flow.pipeline().abort();
        n as f64 / secs / rate as f64
    })
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let secs: u64 = std::env::var("STREAMZ_RATE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let window = Duration::from_secs(secs);
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("throttle_rate: delivered / configured rate, burst 1, {secs} s per case");
    println!("| rate | multi-thread (2 workers) | current-thread |");
    println!("|---|---|---|");
    for rate in [100, 1_000, 10_000] {
        let m = measure(&multi, rate, window);
        let c = measure(&current, rate, window);
        println!("| {rate}/s | {m:.4} | {c:.4} |");
    }
}
