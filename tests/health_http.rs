//! The HTTP probe against a real HTTP server on 127.0.0.1 that goes down
//! and comes back: the gate closes and reopens, the producer waits, and no
//! item is lost.
#![cfg(feature = "http")]

mod support;

use std::net::SocketAddr;
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
    let probe = HttpProbe::new(&format!("http://{addr}/health"))
        .unwrap()
        .with_timeout(Duration::from_millis(500))
        .unwrap();
    let gate = HealthGate::new(probe)
        .with_interval(Duration::from_millis(20))
        .unwrap()
        .close_after(2)
        .unwrap();
    let handle = gate.handle();
    let mut status = handle.subscribe();
    let pipeline = Pipeline::with_edge(EdgeConfig::try_new(8, 8).unwrap());
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
    let mut probe = HttpProbe::new(&format!("http://{addr}/health")).unwrap();
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
    let mut probe = HttpProbe::new(&format!("http://{addr}/"))
        .unwrap()
        .with_timeout(Duration::from_millis(100))
        .unwrap();
    let health = probe.check().await;
    assert_eq!(
        health,
        streamz::Health::unhealthy(format!("GET http://{addr}/ had no answer within 100ms"))
    );
    drop(silent);
}
