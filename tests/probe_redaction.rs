//! Probe URLs with credentials never show in reasons, `Debug` output or
//! log lines. Its own test binary: a scoped tracing subscriber
//! (`set_default`) misses events when other tests in the same process hit
//! the same callsites first (tracing caches callsite interest per process).
#![cfg(feature = "http")]

mod support;

use std::time::Duration;

use streamz::{GateState, HealthGate, HttpProbe};
use support::{Captured, reached};
use tokio::net::TcpListener;

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
    // Also a query key with no value (itself a token) and a fragment.
    let url = format!(
        "http://ops:s3cret@127.0.0.1:{port}/health?token=t0ken&x=1&sk_live_ABC#frag_SECRET"
    );
    let probe = HttpProbe::new(&url);
    assert_eq!(
        probe.url(),
        format!("http://***:***@127.0.0.1:{port}/health?token=***&x=***&***=***#***")
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
    let logs = logs.text();
    for shown in [
        reason.as_str(),
        &format!("{probe:?}"),
        &format!("{closed_status:?}", closed_status = handle.status()),
        &logs,
    ] {
        assert!(!shown.contains("s3cret"), "the password shows: {shown}");
        assert!(!shown.contains("t0ken"), "the token shows: {shown}");
        assert!(
            !shown.contains("sk_live_ABC"),
            "the bare key shows: {shown}"
        );
        assert!(
            !shown.contains("frag_SECRET"),
            "the fragment shows: {shown}"
        );
    }
    assert!(
        logs.contains("health gate closes"),
        "the transition is logged: {logs}"
    );
}
