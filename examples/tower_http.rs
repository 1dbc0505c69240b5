//! An HTTP client in a tower stack inside a pipeline: tower's layers shape
//! the calls (a shared rate limit, a timeout per request, a concurrency
//! limit), the `AsyncMapper` keeps order and retries what tower reports as
//! failed, and a dead-letter queue keeps what still fails, with its item.
//!
//! The example starts its own small HTTP service on 127.0.0.1 (a price
//! lookup that answers 503 for some ids and hangs on one), so it runs
//! anywhere.
//!
//! Run: `cargo run --example tower_http --features tower,http`

use std::net::SocketAddr;
use std::time::Duration;

use streamz::{AsyncMapper, DeadLetterQueue, Retry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::ServiceBuilder;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let addr = serve().await?;
    let client = reqwest::Client::new();

    // The dependency, as a tower service: GET /price/<id>, an error for
    // any answer that is not a success.
    let prices = ServiceBuilder::new()
        // Every call shares one rate limit: the buffer hands all clones the
        // same inner service (without it each clone would limit alone).
        .buffer(64)
        .rate_limit(200, Duration::from_secs(1))
        .concurrency_limit(8)
        // Long enough for a local answer on a loaded machine (at 300 ms
        // an ordinary id once timed out three times in CI); 77 never
        // answers and costs its three attempts this much each.
        .timeout(Duration::from_secs(1))
        .service_fn(move |id: u32| {
            let request = client.get(format!("http://{addr}/price/{id}"));
            async move {
                let answer = request.send().await?.error_for_status()?;
                let price: u64 = answer.text().await?.parse()?;
                Ok::<_, BoxError>((id, price))
            }
        });

    // Retry what failed (a 503 from a busy service, a timeout) twice with
    // a short backoff; keep the order of the input.
    let lookup = AsyncMapper::from_service(prices)
        .named("price_lookup")
        .with_concurrency(16)
        .with_retry(
            Retry::attempts(3).with_backoff(Duration::from_millis(10), Duration::from_millis(50)),
        );

    let (dead, letters) = streamz::dlq::channel::<u32>(64);
    let dead_letters = tokio::spawn(async move {
        let mut ids = Vec::new();
        while let Ok(letter) = letters.recv().await {
            println!(
                "dead letter: id {:?} after {} attempts: {}",
                letter.item, letter.attempts, letter.message
            );
            ids.extend(letter.item);
        }
        ids
    });

    let started = std::time::Instant::now();
    let flow = streamz::iter(1..=100u32)
        .pipe(lookup)
        .pipe(DeadLetterQueue::new(dead));
    let pipeline = flow.pipeline().clone();
    let priced = flow.collect().await;
    let dead_ids = dead_letters.await?;

    let total: u64 = priced
        .iter()
        .map(|r| r.as_ref().map_or(0, |(_, p)| *p))
        .sum();
    println!(
        "priced {} ids (total {total}) in {:.2?}; dead-lettered {:?}",
        priced.len(),
        started.elapsed(),
        dead_ids
    );
    for m in pipeline.metrics() {
        println!("{m:?}");
    }
    pipeline.join().await?;

    // Ids divisible by 10 always fail (503); 77 hangs past the timeout.
    let mut expected: Vec<u32> = (10..=100).step_by(10).collect();
    expected.push(77);
    expected.sort_unstable();
    let mut dead_ids = dead_ids;
    dead_ids.sort_unstable();
    assert_eq!(dead_ids, expected, "what failed for good is dead-lettered");
    assert_eq!(priced.len(), 100 - expected.len());
    Ok(())
}

/// A price service on 127.0.0.1: `/price/<id>` answers `id * 3`; ids that
/// are multiples of 10 get a 503, id 77 never gets an answer, and the
/// first request for an id that leaves 3 divided by 7 is a passing 503 (its
/// retry succeeds). Passing failures are counted per id, so which ids fail
/// for good does not depend on how requests interleave.
async fn serve() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let requests = std::sync::Arc::new(std::sync::Mutex::new(
        std::collections::HashMap::<u32, u32>::new(),
    ));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&request);
                let id: Option<u32> = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|path| path.strip_prefix("/price/"))
                    .and_then(|id| id.parse().ok());
                // The how-manyth request for this id (0 for the first).
                let n = id.map_or(0, |id| {
                    let mut seen = requests.lock().unwrap();
                    let n = seen.entry(id).or_insert(0);
                    *n += 1;
                    *n - 1
                });
                let (status, body) = match id {
                    None => ("404 Not Found", String::new()),
                    Some(77) => {
                        std::future::pending::<()>().await;
                        unreachable!()
                    }
                    Some(id) if id % 10 == 0 => ("503 Service Unavailable", String::new()),
                    Some(id) if id % 7 == 3 && n == 0 => ("503 Service Unavailable", String::new()),
                    Some(id) => ("200 OK", (u64::from(id) * 3).to_string()),
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}
