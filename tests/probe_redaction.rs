//! Probe URLs with credentials never show in reasons, `Debug` output or
//! log lines. Its own test binary: a scoped tracing subscriber
//! (`set_default`) misses events when other tests in the same process hit
//! the same callsites first (tracing caches callsite interest per process).
#![cfg(feature = "http")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use streamz::{GateState, HealthGate, HttpProbe};
use support::reached;
use tokio::net::TcpListener;

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
