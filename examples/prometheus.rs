//! Exports a pipeline's metrics to Prometheus: every stage reports through
//! the `metrics` facade (feature `metrics`), and `metrics-exporter-prometheus`
//! serves them as Prometheus text on 127.0.0.1.
//!
//! The example runs a small pipeline (parse, a call with a latency, batches),
//! then fetches its own `/metrics` page the way Prometheus would and prints
//! the streamz series. With `--serve` it keeps serving until Ctrl-C, for a
//! Prometheus (or `curl`) to scrape.
//!
//! Run: `cargo run --example prometheus --features metrics,http [-- --serve]`

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use streamz::{AsyncMapper, Batcher, Pipeline};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The recorder is installed before the pipeline is built: stages take
    // their handles on the series when they start.
    let addr = free_local_port()?;
    PrometheusBuilder::new()
        .with_http_listener(addr)
        // Buckets make latencies histograms (without them: summaries).
        .set_buckets(&[0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0])?
        .set_buckets_for_metric(
            Matcher::Suffix("_items".into()),
            &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0],
        )?
        .install()?;

    let pipeline = Pipeline::builder().with_name("orders").build();
    let batches = pipeline
        .iter((1..=100).map(|n| n.to_string()))
        // Every tenth line does not parse.
        .try_map(|line: &String| {
            let n: u32 = line.parse()?;
            if n % 10 == 0 {
                return Err(format!("order {n} is malformed").into());
            }
            Ok::<u32, BoxError>(n)
        })
        .named("parse")
        .pipe(
            AsyncMapper::new(|n: &u32| {
                let n = *n;
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok::<_, std::io::Error>(n * 3)
                }
            })
            .named("price")
            .with_concurrency(8),
        )
        .pipe(Batcher::new(10, Duration::from_millis(50)).named("batch"))
        .collect()
        .await;
    let (values, errors): (Vec<_>, Vec<_>) = batches.into_iter().partition(|b| b.is_ok());
    println!("{} batches, {} errors", values.len(), errors.len());
    pipeline.join().await?;

    // What Prometheus would scrape.
    let url = format!("http://{addr}/metrics");
    let page = reqwest::get(&url).await?.error_for_status()?.text().await?;
    println!("GET {url}:");
    for line in page.lines().filter(|l| l.contains("streamz_")) {
        println!("  {line}");
    }

    if std::env::args().any(|a| a == "--serve") {
        println!("serving {url}; Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}

/// A port on 127.0.0.1 that is free now (the exporter binds it itself).
fn free_local_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}
