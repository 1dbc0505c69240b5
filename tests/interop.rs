//! The ecosystem's seams: a `Pusher` as a `futures::Sink`, tokio-stream's
//! wrappers as sources, a `Flow` as a `FusedStream`, the dead-letter
//! channel read from a plain thread, and the pipeline builder.

mod support;

use std::time::Duration;

use futures::stream::FusedStream;
use futures::{SinkExt, StreamExt};
use streamz::{DeadLetterQueue, EdgeConfig, Pipeline, PusherClosed, StreamError};
use support::{assert_conserved, settle, values};
use tokio_util::sync::CancellationToken;

/// Fails the test instead of hanging it.
async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("hung")
}

#[tokio::test]
async fn a_pusher_is_a_sink_for_send_all() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(4, 2));
    let (mut tx, flow) = pipeline.channel::<u32>();
    // More items than the channel holds: send_all must wait for room.
    let producer = tokio::spawn(async move {
        let mut items = futures::stream::iter(0..100u32).map(Ok);
        tx.send_all(&mut items).await?;
        tx.close().await
    });
    let out = within(flow.map(|x| x + 1).collect()).await;
    within(producer).await.unwrap().unwrap();
    assert_eq!(values(out), (1..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_full_pusher_sink_refuses_at_shutdown_though_nothing_reads() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(1, 1));
    let (mut tx, _flow) = pipeline.channel::<u32>();
    tx.send(1).await.unwrap(); // fills the channel; nothing reads it
    let blocked = tokio::spawn(async move { SinkExt::send(&mut tx, 2).await });
    tokio::task::yield_now().await;
    assert!(!blocked.is_finished(), "the second send waits for room");
    pipeline.shutdown();
    assert_eq!(within(blocked).await.unwrap(), Err(PusherClosed));
}

#[tokio::test]
async fn a_pusher_sink_refuses_once_the_flow_is_dropped() {
    let (mut tx, flow) = streamz::channel::<u32>();
    drop(flow);
    assert_eq!(within(SinkExt::send(&mut tx, 1)).await, Err(PusherClosed));
}

#[tokio::test]
async fn tokio_stream_receiver_and_watch_wrappers_are_sources() {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let producer = tokio::spawn(async move {
        for i in 0..20u32 {
            tx.send(i).await.unwrap();
        }
    });
    let out = streamz::stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .map(|x| x * 2)
        .collect();
    let out = within(out).await;
    producer.await.unwrap();
    assert_eq!(values(out), (0..20).map(|x| x * 2).collect::<Vec<_>>());

    // A watch stream yields the current value, then each change.
    let (state, watched) = tokio::sync::watch::channel("starting");
    let mut flow = streamz::stream(tokio_stream::wrappers::WatchStream::new(watched));
    assert_eq!(within(flow.next()).await.unwrap().unwrap(), "starting");
    state.send("ready").unwrap();
    assert_eq!(within(flow.next()).await.unwrap().unwrap(), "ready");
    drop(state);
    assert!(within(flow.next()).await.is_none());
}

#[tokio::test]
async fn a_broadcast_wrapper_reports_lag_as_an_error_item() {
    let (tx, rx) = tokio::sync::broadcast::channel(2);
    // Five values into a channel of two before anyone reads: three are lost
    // to this receiver, which the wrapper reports once.
    for i in 0..5u32 {
        tx.send(i).unwrap();
    }
    drop(tx);
    let source = tokio_stream::wrappers::BroadcastStream::new(rx)
        .map(|r| r.map_err(|lagged| StreamError::failed("broadcast", lagged)));
    let out = within(streamz::try_stream(source).collect()).await;
    let (ok, err): (Vec<_>, Vec<_>) = out.into_iter().partition(Result::is_ok);
    assert_eq!(values(ok), [3, 4]);
    assert_eq!(err.len(), 1);
    let err = err.into_iter().next().unwrap().unwrap_err();
    assert!(err.to_string().contains("lagged"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn an_interval_stream_is_a_source_on_the_paused_clock() {
    let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(
        Duration::from_millis(100),
    ))
    .take(5);
    let start = tokio::time::Instant::now();
    let out = within(streamz::stream(ticks).collect()).await;
    assert_eq!(out.len(), 5);
    // The first tick is immediate, then one per period.
    assert_eq!(start.elapsed(), Duration::from_millis(400));
}

#[tokio::test]
async fn a_flow_is_a_fused_stream() {
    let mut flow = streamz::iter([1u32, 2]);
    assert!(!flow.is_terminated());
    let mut seen = Vec::new();
    // `select!` needs fused streams; a flow is one as it is.
    loop {
        futures::select! {
            item = flow.next() => match item {
                Some(item) => seen.push(item.unwrap()),
                None => break,
            },
        }
    }
    assert_eq!(seen, [1, 2]);
    assert!(flow.is_terminated());
    assert!(flow.next().await.is_none(), "stays ended");
}

#[tokio::test]
async fn dead_letters_are_read_on_a_plain_thread_and_by_several_readers() {
    let (sink, letters) = streamz::dlq::channel::<i32>(4);
    // A synchronous writer (say, a database client) on its own thread.
    let second = letters.clone();
    let sync_reader = std::thread::spawn(move || {
        let mut items = Vec::new();
        while let Ok(letter) = letters.recv_blocking() {
            items.push(letter.item.unwrap());
        }
        items
    });
    let async_reader = tokio::spawn(async move {
        let mut items = Vec::new();
        while let Ok(letter) = second.recv().await {
            items.push(letter.item.unwrap());
        }
        items
    });
    let out = streamz::iter(-50..50)
        .try_map(|x: &i32| if *x < 0 { Err("negative") } else { Ok(*x) })
        .pipe(DeadLetterQueue::new(sink))
        .collect();
    let out = within(out).await;
    assert_eq!(out.len(), 50);
    let mut dead = within(async_reader).await.unwrap();
    dead.extend(sync_reader.join().unwrap());
    dead.sort_unstable();
    // Each record went to exactly one reader.
    assert_eq!(dead, (-50..0).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_built_pipeline_has_its_name_edge_and_token() {
    let token = CancellationToken::new();
    let pipeline = Pipeline::builder()
        .with_name("orders")
        .with_edge(EdgeConfig::new(8, 4))
        .with_shutdown_token(token.clone())
        .build();
    assert_eq!(pipeline.name(), Some("orders"));
    assert_eq!(pipeline.edge().capacity(), 8);
    let (tx, flow) = pipeline.channel::<u32>();
    tx.send(1).await.unwrap();
    token.cancel();
    assert!(tx.is_closed());
    let out = within(flow.async_boundary("relay").collect()).await;
    assert_eq!(values(out), [1]);
    assert_eq!(Pipeline::new().name(), None);
}

#[tokio::test]
async fn stage_names_are_unique_in_a_pipeline() {
    let flow = streamz::iter(0..10u32)
        .async_boundary("hop")
        .async_boundary("hop")
        .async_boundary("hop");
    let pipeline = flow.pipeline().clone();
    assert_eq!(within(flow.collect()).await.len(), 10);
    let names: Vec<String> = pipeline.metrics().into_iter().map(|m| m.name).collect();
    assert_eq!(names, ["iter", "hop", "hop#2", "hop#3"]);
    assert_eq!(pipeline.stage_metrics("hop#3").unwrap().emitted, 10);
}

#[tokio::test]
async fn fused_steps_and_sources_take_a_name_and_errors_carry_it() {
    let flow = streamz::iter(["1", "x", "3", "y"])
        .named("lines")
        .try_map(|s: &&str| s.parse::<u32>())
        .named("parse")
        .map(|x| x * 10)
        // Taken already: made unique.
        .named("parse")
        .filter(|x: &u32| *x > 10);
    let pipeline = flow.pipeline().clone();
    let out = within(flow.collect()).await;
    let stages: Vec<&str> = out
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(StreamError::stage)
        .collect();
    assert_eq!(stages, ["parse", "parse"]);
    let names: Vec<String> = pipeline.metrics().into_iter().map(|m| m.name).collect();
    assert_eq!(names, ["lines", "parse", "parse#2", "filter"]);
    let parse = pipeline.stage_metrics("parse").unwrap();
    assert_eq!((parse.received, parse.emitted, parse.failed), (4, 2, 2));
}

#[tokio::test]
async fn a_stage_with_its_own_task_keeps_the_name_it_was_made_with() {
    let flow = streamz::iter(0..3u32)
        .async_boundary("hop")
        .named("renamed")
        .map(|x| x + 1)
        .named("plus_one")
        .named("again");
    let pipeline = flow.pipeline().clone();
    assert_eq!(within(flow.collect()).await.len(), 3);
    let names: Vec<String> = pipeline.metrics().into_iter().map(|m| m.name).collect();
    // The boundary's task runs as "hop"; the step kept its first name.
    assert_eq!(names, ["iter", "hop", "plus_one"]);
}

#[tokio::test]
async fn shutdown_within_is_graceful_when_the_output_is_read() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    for i in 0..10 {
        tx.send(i).await.unwrap();
    }
    let reader = tokio::spawn(flow.async_boundary("relay").collect());
    let report = within(pipeline.shutdown_within(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(report.graceful());
    assert_eq!(report.aborted(), 0);
    assert_eq!(reader.await.unwrap().len(), 10);
}

#[tokio::test(start_paused = true)]
async fn shutdown_within_aborts_what_cannot_drain_and_counts_it() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(1, 1));
    let (tx, flow) = pipeline.channel::<u32>();
    let flow = flow.async_boundary("relay");
    let producer = tokio::spawn(async move {
        let mut sent = 0;
        while tx.send(sent).await.is_ok() {
            sent += 1;
        }
        sent
    });
    // Nobody reads `flow`: the relay fills its output and blocks.
    settle().await;
    let report = within(pipeline.shutdown_within(Duration::from_millis(500)))
        .await
        .unwrap();
    assert!(!report.graceful());
    let sent = producer.await.unwrap();
    let m = pipeline.stage_metrics("relay").unwrap();
    // What the relay took and could not deliver is counted, and reported.
    assert!(m.undelivered + m.aborted >= 1, "{m:?}");
    assert_eq!(report.aborted(), m.undelivered + m.aborted);
    assert_conserved(&m);
    // Conservation: every accepted item is in the channel left unread,
    // counted by the relay, or was still waiting at its input.
    assert!(m.received <= u64::from(sent), "{m:?} of {sent}");
    drop(flow);
}

#[tokio::test(start_paused = true)]
async fn shutdown_within_max_waits_for_as_long_as_it_takes() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    for i in 0..5 {
        tx.send(i).await.unwrap();
    }
    let flow = flow.async_boundary("relay");
    // A slow reader: the graceful shutdown waits for it, however long.
    let reader = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        flow.collect().await
    });
    let report = within(pipeline.shutdown_within(Duration::MAX)).await;
    assert!(report.unwrap().graceful());
    assert_eq!(reader.await.unwrap().len(), 5);
}

#[cfg(feature = "tower")]
mod tower_service {
    use super::*;
    use streamz::AsyncMapper;
    use tower::ServiceBuilder;

    #[tokio::test(start_paused = true)]
    async fn a_tower_stack_runs_inside_an_async_mapper() {
        // A rate limit shared by every call (behind a buffer), a timeout
        // per call, and a dependency that hangs on 13.
        let service = ServiceBuilder::new()
            .buffer(16)
            .rate_limit(10, Duration::from_secs(1))
            .timeout(Duration::from_millis(200))
            .service_fn(|id: u32| async move {
                if id == 13 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, std::io::Error>(id * 2)
            });
        let mapper = AsyncMapper::from_service(service).with_concurrency(4);
        let start = tokio::time::Instant::now();
        let out = within(streamz::iter(0..30u32).pipe(mapper).collect()).await;
        let (ok, err): (Vec<_>, Vec<_>) = out.into_iter().partition(Result::is_ok);
        let mut ok = values(ok);
        ok.sort_unstable();
        assert_eq!(
            ok,
            (0..30)
                .filter(|&x| x != 13)
                .map(|x| x * 2)
                .collect::<Vec<_>>()
        );
        // The hanging call is an error item carrying its item, with tower's
        // timeout as its source.
        let mut err = err.into_iter().map(Result::unwrap_err);
        let mut e = err.next().unwrap();
        assert!(err.next().is_none());
        assert_eq!(e.take_item::<u32>(), Some(13));
        assert!(e.to_string().contains("request timed out"), "{e}");
        // 30 calls at 10 per second: the rate limit held across clones.
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
}

#[tokio::test]
async fn shutdown_within_is_not_graceful_when_someone_else_aborts() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(1, 1));
    let flow = pipeline.iter(0..10u32).async_boundary("relay");
    tokio::task::yield_now().await; // the relay fills its output and blocks
    let other = pipeline.clone();
    let aborter = tokio::spawn(async move { other.abort() });
    let report = within(pipeline.shutdown_within(Duration::MAX))
        .await
        .unwrap();
    aborter.await.unwrap();
    assert!(!report.graceful(), "{report:?}");
    drop(flow);
}

#[tokio::test]
async fn a_source_counts_the_errors_it_gives_apart_from_its_values() {
    let items: Vec<streamz::Result<u32>> = vec![
        Err(StreamError::failed("upstream", "bad")),
        Ok(1),
        Err(StreamError::failed("upstream", "worse")),
    ];
    let flow = streamz::try_stream(futures::stream::iter(items));
    let pipeline = flow.pipeline().clone();
    assert_eq!(within(flow.collect()).await.len(), 3);
    let m = pipeline.stage_metrics("stream").unwrap();
    assert_eq!((m.emitted, m.errors_passed), (1, 2), "{m}");

    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u32>();
    tx.send_result(Err(StreamError::failed("producer", "bad")))
        .await
        .unwrap();
    tx.send(2).await.unwrap();
    drop(tx);
    assert_eq!(within(flow.collect()).await.len(), 2);
    let m = pipeline.stage_metrics("channel").unwrap();
    assert_eq!((m.emitted, m.errors_passed), (1, 1), "{m}");
}
