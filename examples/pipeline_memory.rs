//! Runs the composed pipeline of `benches/pipeline.rs` over N records
//! (default 1,000,000) and prints what it produced, so its peak memory can
//! be measured for different N:
//!
//! ```sh
//! cargo build --release --example pipeline_memory
//! /usr/bin/time -v target/release/examples/pipeline_memory 1000000  2>&1 | grep Maximum
//! /usr/bin/time -v target/release/examples/pipeline_memory 10000000 2>&1 | grep Maximum
//! ```

#[path = "../benches/support/pipeline.rs"]
#[allow(dead_code)]
mod pipeline;

#[tokio::main(worker_threads = 2)]
async fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N must be a number of records"))
        .unwrap_or(1_000_000);
    let s = pipeline::streamz_pipeline(n).await;
    println!(
        "{n} records: {} values in {} batches, {} dead letters (checksum {})",
        s.values, s.batches, s.dead_letters, s.checksum
    );
    assert_eq!(s.dead_letters, n / 100);
}
