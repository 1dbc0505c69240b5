//! The HTTP probe against a real HTTP server on 127.0.0.1 that goes down
//! and comes back: the gate closes and reopens, the producer waits, and no
//! item is lost.
#![cfg(feature = "http")]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use streamz::{
    EdgeConfig, GateState, GateStatus, HealthCheck, HealthGate, HttpProbe, Pipeline, TrySendError,
};
use support::{assert_conserved, stage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A minimal HTTP/1.1 server: answers every request with `status` and
/// closes the connection. Dropping (aborting) the task closes the port.
async fn serve(addr: SocketAddr, status: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    (addr, task)
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

/// Waits for the gate to reach `state`, failing the test after 10 s.
async fn reached(status: &mut watch::Receiver<GateStatus>, state: GateState) -> GateStatus {
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.state == state),
    )
    .await
    .unwrap_or_else(|_| panic!("the gate did not become {state:?}"))
    .unwrap()
    .clone()
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
    let (_, server) = serve(addr, "200 OK").await;
    reached(&mut status, GateState::Open).await;
    producer.await.unwrap();
    let got: Vec<u32> = out.await.unwrap().into_iter().map(Result::unwrap).collect();
    assert_eq!(got, (0..300).collect::<Vec<_>>());
    let m = stage(&pipeline, "health_gate");
    assert_eq!((m.received, m.emitted), (300, 300));
    assert_conserved(&m);
    assert_eq!(handle.closings(), 1);
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
/// `https://` URL, anything else with 404. Counts the requests.
async fn serve_redirects() -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    let task = tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let request = String::from_utf8_lossy(&request);
                let path = request.split(' ').nth(1).unwrap_or("/").to_owned();
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
                    .map(|l| format!("location: {l}\r\n"))
                    .unwrap_or_default();
                let answer = format!(
                    "HTTP/1.1 {status}\r\n{location}content-length: 2\r\nconnection: close\r\n\r\nok"
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    (addr, requests, task)
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
    assert_eq!(
        requests.load(Ordering::SeqCst),
        1,
        "the target was not asked"
    );
    server.abort();
}

#[tokio::test]
async fn follow_redirects_follows_up_to_its_bound() {
    let (addr, requests, server) = serve_redirects().await;
    let mut probe = HttpProbe::new(&format!("http://{addr}/to/to/ok")).with_max_redirects(2);
    assert_eq!(check(&mut probe).await, streamz::Health::Healthy);
    assert_eq!(requests.load(Ordering::SeqCst), 3);

    // One hop more than the bound: the last 3xx is the answer.
    requests.store(0, Ordering::SeqCst);
    let mut probe = HttpProbe::new(&format!("http://{addr}/to/to/to/ok")).with_max_redirects(2);
    assert_eq!(
        check(&mut probe).await,
        streamz::Health::unhealthy(format!(
            "GET http://{addr}/to/to/to/ok answered 302 Found at http://{addr}/to/ok, a redirect to http://{addr}/ok (more than 2 redirects)"
        ))
    );
    assert_eq!(requests.load(Ordering::SeqCst), 3, "the bound was kept");
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
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    server.abort();
}

/// Captures what tracing prints, to check nothing secret reaches a log.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn credentials_and_query_values_in_a_probe_url_never_show() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // Down: nothing listens on the port.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://ops:s3cret@127.0.0.1:{port}/health?token=t0ken&x=1");
    let probe = HttpProbe::new(&url);
    assert_eq!(
        probe.url(),
        format!("http://***:***@127.0.0.1:{port}/health?token=***&x=***")
    );
    let gate = HealthGate::new(probe.clone()).with_failures_to_close(1);
    let handle = gate.handle();
    let pipeline = streamz::Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    let out = tokio::spawn(flow.pipe(gate.starting_open()).collect());
    let mut status = handle.subscribe();
    let closed = tokio::time::timeout(
        Duration::from_secs(10),
        reached(&mut status, GateState::Closed),
    )
    .await
    .expect("the gate closes on a server that is down");
    drop(tx);
    // A closed gate holds back the end of its input; a shutdown ends it.
    pipeline.shutdown();
    tokio::time::timeout(Duration::from_secs(10), out)
        .await
        .expect("shutdown ends a closed gate")
        .unwrap();

    let reason = closed.reason.unwrap();
    assert!(reason.contains("***"), "{reason}");
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    for shown in [
        reason.as_str(),
        &format!("{probe:?}"),
        &format!("{closed_status:?}", closed_status = handle.status()),
        &logs,
    ] {
        assert!(!shown.contains("s3cret"), "the password shows: {shown}");
        assert!(!shown.contains("t0ken"), "the token shows: {shown}");
    }
    assert!(
        logs.contains("health gate closes"),
        "the transition is logged: {logs}"
    );
}
