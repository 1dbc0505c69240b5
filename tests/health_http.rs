//! The HTTP probe against a real HTTP server on 127.0.0.1 that goes down
//! and comes back: the gate closes and reopens, the producer waits, and no
//! item is lost.
#![cfg(feature = "http")]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use streamz::{EdgeConfig, GateState, HealthCheck, HealthGate, HttpProbe, Pipeline, TrySendError};
use support::{assert_conserved, reached, stage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A minimal HTTP/1.1 server on `addr`: answers each request with what
/// `answer` gives for its path (status line with headers, and body), and
/// closes the connection. Aborting the task closes the port.
async fn serve_with(
    addr: SocketAddr,
    answer: impl Fn(SocketAddr, &str) -> (String, String) + Send + Sync + 'static,
) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    let task = tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let request = String::from_utf8_lossy(&request);
                let path = request.split(' ').nth(1).unwrap_or("/");
                let (head, body) = answer(addr, path);
                let reply = format!(
                    "HTTP/1.1 {head}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    (addr, task)
}

/// A server answering every request with `status`.
async fn serve(addr: SocketAddr, status: &'static str) -> (SocketAddr, JoinHandle<()>) {
    serve_with(addr, move |_, _| (status.to_owned(), "ok".to_owned())).await
}

#[tokio::test]
async fn a_probe_without_a_time_limit_takes_duration_max() {
    let (addr, server) = serve("127.0.0.1:0".parse().unwrap(), "200 OK").await;
    let mut probe = HttpProbe::new(&format!("http://{addr}/")).with_timeout(Duration::MAX);
    let health = tokio::time::timeout(Duration::from_secs(10), probe.check())
        .await
        .expect("hung");
    assert_eq!(health, streamz::Health::Healthy);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_follows_a_server_that_goes_down_and_comes_back_and_loses_nothing() {
    let (addr, server) = serve("127.0.0.1:0".parse().unwrap(), "200 OK").await;
    let probe =
        HttpProbe::new(&format!("http://{addr}/health")).with_timeout(Duration::from_millis(500));
    let gate = HealthGate::new(probe)
        .with_interval(Duration::from_millis(20))
        .with_failures_to_close(2);
    let handle = gate.handle();
    let mut status = handle.subscribe();
    let pipeline = Pipeline::with_edge(EdgeConfig::new(8, 8));
    let (tx, flow) = pipeline.channel::<u32>();
    let out = tokio::spawn(flow.pipe(gate).collect());

    reached(&mut status, GateState::Open).await;
    for i in 0..50 {
        tx.send(i).await.unwrap();
    }

    // The server goes away: connections are refused, the gate closes.
    server.abort();
    let _ = server.await;
    let closed = reached(&mut status, GateState::Closed).await;
    let reason = closed.reason.unwrap();
    assert!(
        reason.starts_with(&format!("GET http://{addr}/health failed")),
        "{reason}"
    );

    // The producer fills what the edges hold, then has to wait.
    let mut next = 50;
    loop {
        match tx.try_send(next) {
            Ok(()) => next += 1,
            Err(TrySendError::Full(_)) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    let producer = tokio::spawn(async move {
        for i in next..300 {
            tx.send(i).await.unwrap();
        }
    });

    // It comes back on the same port: the gate opens, everything flows.
    // (Not waited for on the status: once the producer is done the gate
    // and its checker end, and on a loaded machine a probe that times out
    // may close the gate again before this task looks.)
    let (_, server) = serve(addr, "200 OK").await;
    tokio::time::timeout(Duration::from_secs(30), producer)
        .await
        .expect("the gate reopened and took the rest")
        .unwrap();
    let got: Vec<u32> = out.await.unwrap().into_iter().map(Result::unwrap).collect();
    assert_eq!(got, (0..300).collect::<Vec<_>>());
    let m = stage(&pipeline, "health_gate");
    assert_eq!((m.received, m.emitted), (300, 300));
    assert_conserved(&m);
    assert!(handle.closings() >= 1);
    server.abort();
}

#[tokio::test]
async fn non_2xx_and_silence_are_unhealthy_with_a_reason() {
    let (addr, server) = serve("127.0.0.1:0".parse().unwrap(), "503 Service Unavailable").await;
    let mut probe = HttpProbe::new(&format!("http://{addr}/health"));
    let health = probe.check().await;
    assert_eq!(
        health,
        streamz::Health::unhealthy(format!(
            "GET http://{addr}/health answered 503 Service Unavailable"
        ))
    );
    server.abort();

    // A server that accepts but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let mut probe =
        HttpProbe::new(&format!("http://{addr}/")).with_timeout(Duration::from_millis(100));
    let health = probe.check().await;
    assert_eq!(
        health,
        streamz::Health::unhealthy(format!("GET http://{addr}/ had no answer within 100ms"))
    );
    drop(silent);
}

/// A server that answers by path: `/ok` with 200, `/to/<path>` with a 302
/// to `<path>` (so `/to/to/ok` redirects twice), `/away` with a 302 to an
/// `https://` URL, anything else with 404. Records the paths asked for
/// (a set: the HTTP client may send a request again on a connection the
/// server closed, which a loaded machine makes likely).
async fn serve_redirects() -> (SocketAddr, Asked, JoinHandle<()>) {
    let requests = Asked::default();
    let asked = requests.clone();
    let (addr, task) = serve_with("127.0.0.1:0".parse().unwrap(), move |addr, path| {
        asked.lock().unwrap().insert(path.to_owned());
        let (status, location) = if path == "/ok" {
            ("200 OK", None)
        } else if let Some(rest) = path.strip_prefix("/to") {
            ("302 Found", Some(rest.to_owned()))
        } else if path == "/away" {
            ("302 Found", Some(format!("https://{addr}/ok")))
        } else {
            ("404 Not Found", None)
        };
        let location = location
            .map(|l| format!("\r\nlocation: {l}"))
            .unwrap_or_default();
        (format!("{status}{location}"), "ok".to_owned())
    })
    .await;
    (addr, requests, task)
}

/// The paths a server was asked for.
type Asked = Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>;

fn asked(requests: &Asked) -> Vec<String> {
    requests.lock().unwrap().iter().cloned().collect()
}

/// One check, failing the test if it hangs.
async fn check(probe: &mut HttpProbe) -> streamz::Health {
    tokio::time::timeout(Duration::from_secs(10), probe.check())
        .await
        .expect("the check hangs")
}

#[tokio::test]
async fn a_redirect_is_unhealthy_and_not_followed_by_default() {
    let (addr, requests, server) = serve_redirects().await;
    let mut probe = HttpProbe::new(&format!("http://{addr}/to/ok"));
    assert_eq!(
        check(&mut probe).await,
        streamz::Health::unhealthy(format!(
            "GET http://{addr}/to/ok answered 302 Found, a redirect to http://{addr}/ok (redirects are not followed)"
        ))
    );
    assert_eq!(asked(&requests), ["/to/ok"], "the target was not asked");
    server.abort();
}

#[tokio::test]
async fn a_fragment_is_redacted_and_does_not_make_the_answer_look_elsewhere() {
    let (addr, _requests, server) = serve_redirects().await;
    let mut probe = HttpProbe::new(&format!("http://{addr}/to/ok?sk_live_ABC#tok_SECRET"));
    assert_eq!(
        check(&mut probe).await,
        streamz::Health::unhealthy(format!(
            "GET http://{addr}/to/ok?***=***#*** answered 302 Found, a redirect to http://{addr}/ok?***=*** (redirects are not followed)"
        ))
    );
    server.abort();
}

#[tokio::test]
async fn follow_redirects_follows_up_to_its_bound() {
    let (addr, requests, server) = serve_redirects().await;
    let mut probe = HttpProbe::new(&format!("http://{addr}/to/to/ok")).with_max_redirects(2);
    assert_eq!(check(&mut probe).await, streamz::Health::Healthy);
    assert_eq!(asked(&requests), ["/ok", "/to/ok", "/to/to/ok"]);

    // One hop more than the bound: the last 3xx is the answer.
    requests.lock().unwrap().clear();
    let mut probe = HttpProbe::new(&format!("http://{addr}/to/to/to/ok")).with_max_redirects(2);
    assert_eq!(
        check(&mut probe).await,
        streamz::Health::unhealthy(format!(
            "GET http://{addr}/to/to/to/ok answered 302 Found at http://{addr}/to/ok, a redirect to http://{addr}/ok (more than 2 redirects)"
        ))
    );
    assert_eq!(
        asked(&requests),
        ["/to/ok", "/to/to/ok", "/to/to/to/ok"],
        "the bound was kept: /ok was not asked"
    );
    server.abort();
}

#[tokio::test]
async fn a_redirect_to_https_is_not_followed() {
    let (addr, requests, server) = serve_redirects().await;
    let mut probe = HttpProbe::new(&format!("http://{addr}/away")).with_max_redirects(5);
    assert_eq!(
        check(&mut probe).await,
        streamz::Health::unhealthy(format!(
            "GET http://{addr}/away answered 302 Found, a redirect to https://{addr}/ok (only http:// redirects are followed)"
        ))
    );
    assert_eq!(asked(&requests), ["/away"]);
    server.abort();
}

/// A service on `addr`: `/health` answers 200, `/work/<n>` answers 200
/// with `n` as the body and records `n`. Aborting the task closes the
/// port (the service is down: connections are refused).
async fn serve_work(
    addr: SocketAddr,
    served: Arc<std::sync::Mutex<Vec<u32>>>,
) -> (SocketAddr, JoinHandle<()>) {
    serve_with(addr, move |_, path| {
        let body = match path.strip_prefix("/work/").map(str::parse::<u32>) {
            Some(Ok(n)) => {
                served.lock().unwrap().push(n);
                n.to_string()
            }
            _ => "ok".to_owned(),
        };
        ("200 OK".to_owned(), body)
    })
    .await
}

/// A real client and a real service that is down for 2 s in the middle of
/// a stream: the gate at the ingress notices, and the mapper past it holds
/// its calls and retries on the gate's state instead of spending them.
/// No attempt starts while the gate is closed, nothing is dead-lettered
/// for the outage, and every item arrives, in order, once the service is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_held_by_the_gate_lose_nothing_to_a_two_second_outage() {
    let served = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (addr, server) = serve_work("127.0.0.1:0".parse().unwrap(), served.clone()).await;
    let probe =
        HttpProbe::new(&format!("http://{addr}/health")).with_timeout(Duration::from_millis(200));
    let gate = HealthGate::new(probe)
        .with_interval(Duration::from_millis(20))
        .with_failures_to_close(2);
    let handle = gate.handle();
    let mut status = handle.subscribe();

    let client = reqwest::Client::new();
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = attempts.clone();
    let call = move |n: &u32| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let request = client.get(format!("http://{addr}/work/{n}")).send();
        async move {
            let body = request.await?.error_for_status()?.text().await?;
            Ok::<u32, streamz::BoxError>(body.parse()?)
        }
    };
    let lookup = streamz::AsyncMapper::new(call)
        .with_concurrency(4)
        .with_retry(
            streamz::Retry::attempts(3)
                .with_backoff(Duration::from_millis(300), Duration::from_secs(1))
                .with_jitter(streamz::Jitter::None),
        )
        .hold_while_down(&handle);
    let (dead, letters) = streamz::dlq::channel::<u32>(1024);
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let out = tokio::spawn(
        flow.pipe(gate)
            .pipe(lookup)
            .pipe(streamz::DeadLetterQueue::new(dead))
            .collect(),
    );
    reached(&mut status, GateState::Open).await;

    // One item every 5 ms: 400 items over 2 s, the outage in the middle.
    let producer = tokio::spawn(async move {
        for i in 0..400u32 {
            tx.send(i).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.abort();
    let _ = server.await;
    reached(&mut status, GateState::Closed).await;
    // (A call may start on another worker in the instant the gate closes.)
    tokio::time::sleep(Duration::from_millis(20)).await;
    let closed_at = attempts.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        attempts.load(std::sync::atomic::Ordering::SeqCst),
        closed_at,
        "no attempt while the service is down and the gate knows it"
    );
    let (_, server) = serve_work(addr, served.clone()).await;

    tokio::time::timeout(Duration::from_secs(30), producer)
        .await
        .expect("the producer got through")
        .unwrap();
    let got: Vec<u32> = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("the pipeline ended")
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, (0..400).collect::<Vec<_>>(), "every item, in order");
    assert!(letters.try_recv().is_err(), "nothing dead-lettered");
    assert!(handle.closings() >= 1);
    let mut seen = served.lock().unwrap().clone();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 400, "the service answered every item");
    let m = stage(&pipeline, "async_mapper");
    assert_eq!((m.emitted, m.failed), (400, 0));
    assert_conserved(&m);
    server.abort();
}
