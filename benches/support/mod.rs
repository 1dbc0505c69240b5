//! What the benches share.

use tokio::runtime::{Builder, Runtime};

/// The two runtime flavours every bench runs on, built once, outside the
/// timed loop: two workers (the machine's cores) and a single thread.
pub fn runtimes() -> Vec<(&'static str, Runtime)> {
    vec![
        (
            "multi_thread_2",
            Builder::new_multi_thread()
                .worker_threads(2)
                .enable_time()
                .build()
                .unwrap(),
        ),
        (
            "current_thread",
            Builder::new_current_thread().enable_time().build().unwrap(),
        ),
    ]
}

/// The floor: `hops` tasks passing `Vec<u64>` chunks of up to 256 over
/// bounded tokio channels, each adding one (the core bench's relay).
#[allow(dead_code)] // not every bench has a relay baseline
pub async fn raw_relay(n: u64, hops: usize) -> u64 {
    const CHUNK: u64 = 256;
    let (first_tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u64>>(4);
    tokio::spawn(async move {
        let mut next = 0;
        while next < n {
            let end = (next + CHUNK).min(n);
            if first_tx.send((next..end).collect()).await.is_err() {
                return;
            }
            next = end;
        }
    });
    for _ in 0..hops {
        let (tx, next_rx) = tokio::sync::mpsc::channel::<Vec<u64>>(4);
        let mut input = rx;
        tokio::spawn(async move {
            while let Some(mut chunk) = input.recv().await {
                chunk.iter_mut().for_each(|x| *x += 1);
                if tx.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        rx = next_rx;
    }
    let mut sum = 0u64;
    while let Some(chunk) = rx.recv().await {
        sum = chunk.iter().fold(sum, |a, x| a.wrapping_add(*x));
    }
    sum
}
