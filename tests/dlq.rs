//! The dead-letter queue: routing, records, sinks, overflow policies, the
//! file sink's durability and replay.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use streamz::dlq::{self, DlqError, FileSink, FileSinkOptions, Fsync, Overflow, Replay, Unwritten};
use streamz::{
    AsyncMapper, ConfigError, DeadLetter, DeadLetterQueue, ErrorKind, Pipeline, Result, Retry,
    StageMetrics, StreamError,
};
use support::{settle, split, stage};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    cents: i64,
}

fn order(id: u64) -> Order {
    Order {
        id,
        customer: format!("customer-{id}"),
        cents: id as i64 * 100 - 250,
    }
}

/// `n` items where every `every`-th (from the first) is an error carrying
/// its order.
fn mixed(n: u64, every: u64) -> Vec<Result<Order>> {
    (0..n)
        .map(|i| {
            if i % every == 0 {
                Err(
                    StreamError::failed("validate", format!("order {i} is invalid"))
                        .with_item(order(i)),
                )
            } else {
                Ok(order(i))
            }
        })
        .collect()
}

/// The conservation law of a dead-letter queue stage.
fn assert_dlq_conserved(m: &StageMetrics) {
    assert_eq!(
        m.received,
        m.emitted + m.dead_lettered + m.failed + m.dropped + m.aborted,
        "conservation broken for {m:?}"
    );
}

/// Waits, without letting a paused clock move, until `done` holds. Blocking
/// file work runs on other threads, so the test task yields to them.
async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..1_000_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
        std::thread::yield_now();
    }
    panic!("condition not reached");
}

#[tokio::test]
async fn values_pass_and_errors_reach_the_channel_sink_as_records() {
    let (sink, letters) = dlq::channel::<Order>(64);
    let flow = streamz::try_stream(futures::stream::iter(mixed(20, 4)))
        .pipe(DeadLetterQueue::new(sink).named("to-dlq"));
    let pipeline = flow.pipeline().clone();
    let (values, errors) = split(flow.collect().await);
    assert!(errors.is_empty());
    assert_eq!(values.len(), 15);
    assert!(values.iter().all(|o| o.id % 4 != 0));

    let mut records = Vec::new();
    while let Ok(r) = letters.recv().await {
        records.push(r);
    }
    assert_eq!(records.len(), 5);
    for (n, r) in records.iter().enumerate() {
        assert_eq!(r.sequence, n as u64 + 1);
        assert_eq!(r.item, Some(order(n as u64 * 4)));
        assert_eq!(r.stage, "validate");
        assert_eq!(r.kind, ErrorKind::Failed);
        assert_eq!(r.message, format!("order {} is invalid", n * 4));
        assert_eq!(r.attempts, 1);
        assert_eq!(r.first_failure, r.last_failure);
        assert!(r.item_type.as_deref().unwrap().ends_with("Order"));
        assert_eq!(r.note, None);
    }
    let m = stage(&pipeline, "to-dlq");
    assert_eq!((m.received, m.emitted, m.dead_lettered), (20, 15, 5));
    assert_dlq_conserved(&m);
    pipeline.join().await.unwrap();
}

#[tokio::test]
async fn typed_items_round_trip_through_the_file_and_replay() {
    #[derive(Debug, thiserror::Error)]
    #[error("price service refused")]
    struct Refused(#[source] std::io::Error);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orders.dlq.jsonl");
    let input: Vec<Result<Order>> = (0..50)
        .map(|i| {
            Err(StreamError::failed(
                "price",
                Refused(std::io::Error::other(format!("quota exceeded for {i}"))),
            )
            .with_attempts(3)
            .with_item(order(i)))
        })
        .collect();
    streamz::try_stream(futures::stream::iter(input))
        .pipe(DeadLetterQueue::new(
            FileSink::<Order>::create(&path).await.unwrap(),
        ))
        .collect()
        .await;

    let replay = Replay::<Order>::open(&path).await.unwrap();
    let stats = replay.stats();
    let records: Vec<DeadLetter<Order>> = replay.map(|r| r.unwrap()).collect().await;
    assert_eq!(records.len(), 50);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.item, Some(order(i as u64)));
        assert_eq!(r.sequence, i as u64 + 1);
        assert_eq!(r.stage, "price");
        assert_eq!(r.kind, ErrorKind::Failed);
        assert_eq!(r.message, "price service refused");
        assert_eq!(r.causes, [format!("quota exceeded for {i}")]);
        assert_eq!(r.attempts, 3);
    }
    assert_eq!((stats.records(), stats.torn(), stats.corrupt()), (50, 0, 0));

    // The replayed items feed a pipeline again.
    let fixed: Vec<Order> = Replay::<Order>::open(&path)
        .await
        .unwrap()
        .into_flow()
        .try_map(|r: &DeadLetter<Order>| r.item.clone().ok_or("no item"))
        .collect()
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(fixed, (0..50).map(order).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_hundred_thousand_failures_make_a_hundred_thousand_records() {
    const N: u64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.jsonl");
    let sink = FileSink::<u64>::create(&path)
        .await
        .unwrap()
        .with_fsync(Fsync::EveryN(10_000));
    let stats = sink.stats();
    let input = (0..N).map(|i| Err::<u64, _>(StreamError::failed("s", "e").with_item(i)));
    let flow = streamz::try_stream(futures::stream::iter(input)).pipe(DeadLetterQueue::new(sink));
    let pipeline = flow.pipeline().clone();
    assert!(flow.collect().await.is_empty());

    let m = stage(&pipeline, "dead_letter_queue");
    assert_eq!((m.received, m.dead_lettered), (N, N));
    assert_dlq_conserved(&m);
    assert_eq!(stats.records(), N);
    assert!(stats.syncs() >= 10, "every 10,000 records, then at close");

    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count() as u64, N);
    let replay = Replay::<u64>::open(&path).await.unwrap();
    let mut next = 0;
    let mut replayed = replay;
    while let Some(r) = replayed.next().await {
        let r = r.unwrap();
        assert_eq!((r.sequence, r.item), (next + 1, Some(next)));
        next += 1;
    }
    assert_eq!(next, N);
}

/// Writes `n` records of orders to `path` and returns the file's bytes.
async fn write_records(path: &std::path::Path, n: u64) -> Vec<u8> {
    let input = (0..n).map(|i| Err::<Order, _>(StreamError::failed("s", "e").with_item(order(i))));
    streamz::try_stream(futures::stream::iter(input))
        .pipe(DeadLetterQueue::new(
            FileSink::<Order>::create(path).await.unwrap(),
        ))
        .collect()
        .await;
    std::fs::read(path).unwrap()
}

#[tokio::test]
async fn a_file_cut_anywhere_replays_every_complete_record() {
    let dir = tempfile::tempdir().unwrap();
    let full = write_records(&dir.path().join("full.jsonl"), 4).await;
    let cut_path = dir.path().join("cut.jsonl");
    // Cut the file at every byte: what a crash mid-write can leave.
    for len in 0..=full.len() {
        std::fs::write(&cut_path, &full[..len]).unwrap();
        let lines = full[..len].iter().filter(|b| **b == b'\n').count() as u64;
        // A record cut just before its newline is whole, and is read.
        let whole_without_newline = full.get(len) == Some(&b'\n') && full[len - 1] != b'\n';
        let complete = lines + u64::from(whole_without_newline);
        let replay = Replay::<Order>::open(&cut_path).await.unwrap();
        let stats = replay.stats();
        let records: Vec<_> = replay.collect().await;
        let ids: Vec<u64> = records
            .into_iter()
            .map(|r| r.unwrap().item.unwrap().id)
            .collect();
        assert_eq!(ids, (0..complete).collect::<Vec<_>>(), "cut at {len}");
        let torn = u64::from(len > 0 && full[len - 1] != b'\n' && !whole_without_newline);
        assert_eq!(stats.torn(), torn, "cut at {len}");
        assert_eq!(stats.corrupt(), 0);
    }
}

#[tokio::test]
async fn appending_after_a_torn_line_starts_a_new_line_and_replay_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.jsonl");
    let full = write_records(&path, 3).await;
    // A crash in the middle of the third record, then a second run.
    std::fs::write(&path, &full[..full.len() - 10]).unwrap();
    write_records(&path, 2).await;

    let replay = Replay::<Order>::open(&path).await.unwrap();
    let stats = replay.stats();
    let mut items: Vec<Result<DeadLetter<Order>>> = replay.collect().await;
    assert_eq!(items.len(), 5);
    let torn = items.remove(2).unwrap_err();
    assert_eq!(torn.kind(), ErrorKind::Rejected);
    assert!(torn.to_string().contains("line 3"), "{torn}");
    let ids: Vec<u64> = items
        .into_iter()
        .map(|r| r.unwrap().item.unwrap().id)
        .collect();
    assert_eq!(ids, [0, 1, 0, 1]);
    assert_eq!((stats.records(), stats.corrupt(), stats.torn()), (4, 1, 0));
}

#[tokio::test]
async fn a_corrupt_line_becomes_an_error_item_carrying_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.jsonl");
    let mut bytes = write_records(&path, 2).await;
    bytes.extend_from_slice(b"{\"not\": \"a record\"}\n");
    bytes.extend(write_records(&dir.path().join("more.jsonl"), 1).await);
    std::fs::write(&path, bytes).unwrap();

    let mut items: Vec<Result<DeadLetter<Order>>> =
        Replay::<Order>::open(&path).await.unwrap().collect().await;
    assert_eq!(items.len(), 4);
    let mut err = items.remove(2).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert_eq!(err.stage(), "replay");
    let source = err.cause().unwrap().downcast_ref::<DlqError>().unwrap();
    assert!(
        matches!(source, DlqError::Corrupt { line: 3, .. }),
        "{source}"
    );
    assert_eq!(
        err.take_item::<String>().as_deref(),
        Some(r#"{"not": "a record"}"#)
    );
    assert!(items.iter().all(Result::is_ok));
}

#[tokio::test]
async fn an_unwritable_path_fails_at_construction_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    // A directory that does not exist.
    let missing = dir.path().join("no-such-dir").join("dlq.jsonl");
    let err = FileSink::<u64>::create(&missing).await.unwrap_err();
    assert!(matches!(&err, DlqError::Open { path, .. } if *path == missing));
    let message = err.to_string();
    assert!(
        message.contains("cannot open the dead-letter file"),
        "{message}"
    );
    assert!(message.contains("no-such-dir"), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");

    // A "directory" that is a file.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let err = FileSink::<u64>::create(file.join("dlq.jsonl"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Not a directory"), "{err}");

    // A path that is a directory.
    let err = FileSink::<u64>::create(dir.path()).await.unwrap_err();
    assert!(err.to_string().contains("Is a directory"), "{err}");

    // Replay of a missing file.
    let err = Replay::<u64>::open(&missing).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot read the dead-letter file"),
        "{err}"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn a_read_only_directory_fails_at_construction_unless_running_as_root() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe = ro.join("probe");
    // Root ignores permissions; the other tests cover that case.
    if std::fs::write(&probe, b"").is_ok() {
        return;
    }
    let err = FileSink::<u64>::create(ro.join("dlq.jsonl"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Permission denied"), "{err}");
}

#[tokio::test]
async fn bad_configuration_is_refused_when_piped() {
    let field = |e: ConfigError| {
        assert_eq!(e.operator(), Some("DeadLetterQueue"), "{e}");
        e.field()
    };
    let (sink, _rx) = dlq::channel::<u8>(0);
    let queue = DeadLetterQueue::<u8, _, _>::new(sink);
    assert_eq!(field(support::refused::<u8, u8, _>(queue)), "sink.capacity");
    let (sink, _rx) = dlq::channel::<u8>(1);
    let queue = DeadLetterQueue::<u8, _, _>::new(sink).with_buffer(0);
    assert_eq!(field(support::refused::<u8, u8, _>(queue)), "buffer");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    type Set = fn(FileSink<u8>) -> FileSink<u8>;
    let settings: [(Set, &str); 4] = [
        (|s| s.with_fsync(Fsync::EveryN(0)), "sink.fsync.every_n"),
        (
            |s| s.with_fsync(Fsync::Interval(Duration::ZERO)),
            "sink.fsync.interval",
        ),
        (|s| s.with_rotation(0), "sink.rotation"),
        (|s| s.with_retention(0), "sink.retention"),
    ];
    for (set, name) in settings {
        let sink = set(FileSink::<u8>::create(&file).await.unwrap());
        assert_eq!(sink.validate().unwrap_err().field(), name);
        let queue = DeadLetterQueue::<u8, _, _>::new(sink);
        assert_eq!(field(support::refused::<u8, u8, _>(queue)), name);
    }
    // The options check before they create anything.
    let g = dir.path().join("g");
    for options in [
        FileSinkOptions::new().with_fsync(Fsync::EveryN(0)),
        FileSinkOptions::new().with_rotation(0),
        FileSinkOptions::new().with_retention(0),
    ] {
        let err = options.create::<u8>(&g).await.unwrap_err();
        assert!(matches!(&err, DlqError::Config(e) if e.is_zero()), "{err}");
    }
    assert!(!g.exists());
    // A zero line limit for replay.
    let replay = Replay::<u8>::open(dir.path().join("f")).await.unwrap();
    let out = replay.with_max_line(0).into_flow().collect().await;
    assert_eq!(out.len(), 1);
    let err = out[0].as_ref().unwrap_err();
    assert_eq!(err.kind(), streamz::ErrorKind::Config);
    let cause = err.cause().unwrap().downcast_ref::<ConfigError>().unwrap();
    assert_eq!(cause.field(), "max_line");
}

#[tokio::test]
async fn a_full_disk_sends_records_downstream_and_counts_the_failure() {
    // Writes to /dev/full fail with "no space left on device".
    let sink = FileSink::<Order>::create("/dev/full").await.unwrap();
    let stats = sink.stats();
    let flow =
        streamz::try_stream(futures::stream::iter(mixed(10, 2))).pipe(DeadLetterQueue::new(sink));
    let pipeline = flow.pipeline().clone();
    let (values, errors) = split(flow.collect().await);
    assert_eq!(values.len(), 5);
    assert_eq!(errors.len(), 5);
    for (n, mut e) in errors.into_iter().enumerate() {
        assert_eq!(
            (e.kind(), e.stage()),
            (ErrorKind::Failed, "dead_letter_queue")
        );
        let io = e.cause().unwrap().downcast_ref::<std::io::Error>().unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::StorageFull);
        let record = e.take_item::<DeadLetter<Order>>().unwrap();
        assert_eq!(record.item, Some(order(n as u64 * 2)));
    }
    assert!(stats.write_failures() >= 1);
    assert_eq!(stats.records(), 0);
    let m = stage(&pipeline, "dead_letter_queue");
    assert_eq!(
        (m.received, m.emitted, m.dead_lettered, m.failed),
        (10, 5, 0, 5)
    );
    assert_dlq_conserved(&m);
}

#[tokio::test]
async fn a_dropped_receiver_sends_records_downstream() {
    let (sink, letters) = dlq::channel::<Order>(4);
    drop(letters);
    let flow =
        streamz::try_stream(futures::stream::iter(mixed(6, 3))).pipe(DeadLetterQueue::new(sink));
    let pipeline = flow.pipeline().clone();
    let (values, errors) = split(flow.collect().await);
    assert_eq!((values.len(), errors.len()), (4, 2));
    assert!(errors.iter().all(|e| {
        e.to_string()
            .contains("the dead-letter receiver was dropped")
    }));
    assert_dlq_conserved(&stage(&pipeline, "dead_letter_queue"));
}

#[tokio::test]
async fn items_of_another_type_are_recorded_with_a_note() {
    let (sink, letters) = dlq::channel::<Order>(8);
    let input: Vec<Result<Order>> = vec![
        Err(StreamError::failed("parse", "not json").with_item(String::from("{oops"))),
        Err(StreamError::failed("source", "connection reset")),
    ];
    let out = streamz::try_stream(futures::stream::iter(input))
        .pipe(DeadLetterQueue::new(sink))
        .collect()
        .await;
    assert!(out.is_empty());
    let wrong = letters.recv().await.unwrap();
    assert_eq!(wrong.item, None);
    assert_eq!(wrong.item_type.as_deref(), Some("alloc::string::String"));
    assert!(
        wrong
            .note
            .unwrap()
            .contains("does not record (it records `dlq::Order`)")
    );
    assert_eq!(wrong.message, "not json");
    let none = letters.recv().await.unwrap();
    assert_eq!((none.item, none.item_type), (None, None));
    assert_eq!(none.note.as_deref(), Some("the error carried no item"));
}

#[tokio::test(start_paused = true)]
async fn retried_failures_record_attempts_and_both_failure_times() {
    let (sink, letters) = dlq::channel::<u32>(8);
    let mapper = AsyncMapper::new(|x: &u32| {
        let x = *x;
        async move { if x == 2 { Err("down") } else { Ok(x) } }
    })
    .with_retry(
        Retry::attempts(3).with_backoff(Duration::from_millis(10), Duration::from_millis(10)),
    );
    let out = streamz::iter([1u32, 2, 3])
        .pipe(mapper)
        .pipe(DeadLetterQueue::new(sink))
        .collect()
        .await;
    assert_eq!(out.len(), 2);
    let r = letters.recv().await.unwrap();
    assert_eq!(
        (r.item, r.attempts, r.stage.as_str()),
        (Some(2), 3, "async_mapper")
    );
    assert!(r.first_failure <= r.last_failure);
}

/// A dead-letter queue in front of a stalled dependency: its sink takes a
/// record only when `gate` has a permit, and lists the sequence numbers it
/// took in `seen`.
struct Stalled {
    gate: Arc<tokio::sync::Semaphore>,
    seen: Arc<std::sync::Mutex<Vec<u64>>>,
}

fn stalled_dlq(
    buffer: usize,
    overflow: Overflow,
) -> (
    DeadLetterQueue<u64, u64, impl dlq::DeadLetterSink<u64>>,
    Stalled,
) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = dlq::sink_fn({
        let (gate, seen) = (gate.clone(), seen.clone());
        move |r: DeadLetter<u64>| {
            let (gate, seen) = (gate.clone(), seen.clone());
            async move {
                gate.acquire().await.unwrap().forget();
                seen.lock().unwrap().push(r.sequence);
                Ok(())
            }
        }
    });
    let dlq = DeadLetterQueue::new(sink)
        .with_buffer(buffer)
        .with_overflow(overflow);
    (dlq, Stalled { gate, seen })
}

#[tokio::test(start_paused = true)]
async fn block_policy_holds_upstream_while_the_sink_stalls_and_loses_nothing() {
    let pipeline = Pipeline::with_edge(streamz::EdgeConfig::new(4, 4));
    let (tx, flow) = pipeline.channel::<u64>();
    let (dlq, Stalled { gate, seen }) = stalled_dlq(2, Overflow::Block);
    let out = tokio::spawn(flow.pipe(dlq).collect());

    // The producer pushes 100 failures; it must stall well before that.
    let pushed = Arc::new(AtomicUsize::new(0));
    let producer = tokio::spawn({
        let pushed = pushed.clone();
        async move {
            for i in 0..100u64 {
                tx.send_result(Err(StreamError::failed("s", "e").with_item(i)))
                    .await
                    .unwrap();
                pushed.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    settle().await;
    let stalled_at = pushed.load(Ordering::SeqCst);
    assert!(
        stalled_at < 20,
        "the producer felt no backpressure: {stalled_at}"
    );
    assert!(!producer.is_finished());
    let m = stage(&pipeline, "dead_letter_queue");
    assert_eq!((m.dropped, m.dead_lettered), (0, 0));

    // The dependency recovers: everything arrives, in order.
    gate.add_permits(100);
    producer.await.unwrap();
    let out = out.await.unwrap();
    assert!(out.is_empty());
    assert_eq!(*seen.lock().unwrap(), (1..=100).collect::<Vec<_>>());
    let m = stage(&pipeline, "dead_letter_queue");
    assert_eq!((m.received, m.dead_lettered, m.dropped), (100, 100, 0));
    assert_dlq_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn drop_policy_counts_what_it_drops_and_keeps_values_flowing() {
    let (dlq, Stalled { gate, seen }) = stalled_dlq(2, Overflow::DropAndCount);
    let input = (0..100u64).map(|i| {
        if i % 2 == 0 {
            Err(StreamError::failed("s", "e").with_item(i))
        } else {
            Ok(i)
        }
    });
    let flow = streamz::try_stream(futures::stream::iter(input)).pipe(dlq);
    let pipeline = flow.pipeline().clone();
    let mut flow = flow;
    // Every value arrives while the sink is stalled.
    let mut values = Vec::new();
    while values.len() < 50 {
        values.push(flow.next().await.unwrap().unwrap());
    }
    assert_eq!(values, (0..50).map(|i| i * 2 + 1).collect::<Vec<_>>());
    settle().await;
    let m = stage(&pipeline, "dead_letter_queue");
    assert!(m.dropped >= 40, "{m:?}");

    gate.add_permits(100);
    assert!(flow.next().await.is_none());
    let m = stage(&pipeline, "dead_letter_queue");
    let seen = seen.lock().unwrap();
    assert_eq!(m.dead_lettered, seen.len() as u64);
    assert_eq!(m.dropped + m.dead_lettered, 50);
    // Records keep their order; the missing sequence numbers are the drops.
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    assert!(seen.iter().all(|s| (1..=50).contains(s)));
    assert_dlq_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn fail_policy_ends_the_stream_with_the_record_that_did_not_fit() {
    let (dlq, Stalled { gate, seen }) = stalled_dlq(2, Overflow::Fail);
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u64>();
    let mut flow = flow.pipe(dlq);
    let fail = |i: u64| Err(StreamError::failed("s", "e").with_item(i));
    // The first record stalls in the sink, the second waits in the buffer.
    tx.send_result(fail(0)).await.unwrap();
    settle().await;
    tx.send_result(fail(1)).await.unwrap();
    tx.send(100).await.unwrap();
    assert_eq!(flow.next().await.unwrap().unwrap(), 100);
    // The third does not fit: the stream fails with it.
    tx.send_result(fail(2)).await.unwrap();
    let mut err = flow.next().await.unwrap().unwrap_err();
    assert_eq!(
        (err.kind(), err.stage()),
        (ErrorKind::Failed, "dead_letter_queue")
    );
    assert!(matches!(
        err.cause().unwrap().downcast_ref::<DlqError>(),
        Some(DlqError::Overflow { buffered: 2 })
    ));
    assert_eq!(err.take_item::<DeadLetter<u64>>().unwrap().item, Some(2));
    // The stage takes no more input.
    assert!(tx.send(7).await.is_err());
    // What was accepted is still written before the stream ends.
    gate.add_permits(10);
    assert!(flow.next().await.is_none());
    assert_eq!(*seen.lock().unwrap(), [1, 2]);
    let m = stage(&pipeline, "dead_letter_queue");
    assert_eq!(
        (m.received, m.emitted, m.dead_lettered, m.failed),
        (4, 1, 2, 1)
    );
    assert_dlq_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn interval_policy_syncs_after_the_interval_without_new_records() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FileSink::<u64>::create(dir.path().join("dlq.jsonl"))
        .await
        .unwrap()
        .with_fsync(Fsync::Interval(Duration::from_secs(5)));
    let stats = sink.stats();
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u64>();
    let out = tokio::spawn(flow.pipe(DeadLetterQueue::new(sink)).collect());
    tx.send_result(Err(StreamError::failed("s", "e").with_item(1)))
        .await
        .unwrap();
    until(|| stage(&pipeline, "dead_letter_queue").dead_lettered == 1).await;
    assert_eq!(stats.syncs(), 0);
    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(stats.syncs(), 0);
    tokio::time::advance(Duration::from_secs(1)).await;
    until(|| stats.syncs() == 1).await;
    drop(tx);
    assert!(out.await.unwrap().is_empty());
    // Nothing was left to sync at close.
    assert_eq!(stats.syncs(), 1);
}

#[tokio::test]
async fn every_n_policy_syncs_every_n_records_and_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FileSink::<u64>::create(dir.path().join("dlq.jsonl"))
        .await
        .unwrap()
        .with_fsync(Fsync::EveryN(4));
    let stats = sink.stats();
    // One record per write: a sink that waits for each.
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u64>();
    let dlq = DeadLetterQueue::new(sink).with_buffer(1);
    let out = tokio::spawn(flow.pipe(dlq).collect());
    for i in 0..10 {
        tx.send_result(Err(StreamError::failed("s", "e").with_item(i)))
            .await
            .unwrap();
        until(|| stage(&pipeline, "dead_letter_queue").dead_lettered == i + 1).await;
    }
    assert_eq!(stats.syncs(), 2);
    drop(tx);
    out.await.unwrap();
    assert_eq!(stats.syncs(), 3);
}

#[tokio::test]
async fn rotation_splits_files_by_size_and_replay_reads_them_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.jsonl");
    let sink = FileSink::<Order>::create(&path)
        .await
        .unwrap()
        .with_rotation(1000);
    let stats = sink.stats();
    let input = (0..40).map(|i| Err::<Order, _>(StreamError::failed("s", "e").with_item(order(i))));
    streamz::try_stream(futures::stream::iter(input))
        .pipe(DeadLetterQueue::new(sink))
        .collect()
        .await;
    assert!(stats.rotations() >= 5, "{}", stats.rotations());
    for n in 1..=stats.rotations() {
        let segment = dir.path().join(format!("dlq.jsonl.{n}"));
        let len = std::fs::metadata(&segment).unwrap().len();
        assert!(len <= 1000 && len > 500, "{segment:?}: {len}");
    }
    let ids: Vec<u64> = Replay::<Order>::open_rotated(&path)
        .await
        .unwrap()
        .map(|r| r.unwrap().item.unwrap().id)
        .collect()
        .await;
    assert_eq!(ids, (0..40).collect::<Vec<_>>());

    // A second run continues the numbering instead of overwriting.
    let before = stats.rotations();
    let sink = FileSink::<Order>::create(&path)
        .await
        .unwrap()
        .with_rotation(1000);
    let input =
        (40..80).map(|i| Err::<Order, _>(StreamError::failed("s", "e").with_item(order(i))));
    streamz::try_stream(futures::stream::iter(input))
        .pipe(DeadLetterQueue::new(sink))
        .collect()
        .await;
    assert!(
        dir.path()
            .join(format!("dlq.jsonl.{}", before + 1))
            .exists()
    );
    let ids: Vec<u64> = Replay::<Order>::open_rotated(&path)
        .await
        .unwrap()
        .map(|r| r.unwrap().item.unwrap().id)
        .collect()
        .await;
    assert_eq!(ids, (0..80).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_panicking_sink_turns_its_batch_into_error_items() {
    let calls = Arc::new(AtomicUsize::new(0));
    let sink = dlq::sink_fn({
        let calls = calls.clone();
        move |r: DeadLetter<u64>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 1 {
                    panic!("sink bug");
                }
                drop(r);
                Ok::<(), Unwritten<u64>>(())
            }
        }
    });
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u64>();
    let mut flow = flow.pipe(DeadLetterQueue::new(sink).with_buffer(1));
    let mut seen = Vec::new();
    for i in 0..3 {
        tx.send_result(Err(StreamError::failed("s", "e").with_item(i)))
            .await
            .unwrap();
        if i == 1 {
            seen.push(flow.next().await.unwrap());
        }
    }
    drop(tx);
    while let Some(item) = flow.next().await {
        seen.push(item);
    }
    assert_eq!(seen.len(), 1);
    let mut err = seen.pop().unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Panicked);
    assert!(err.to_string().contains("sink bug"), "{err}");
    // The record's context comes along; its item went with the panic.
    let husk = err.take_item::<DeadLetter<u64>>().unwrap();
    assert_eq!((husk.sequence, husk.item), (2, None));
    assert!(husk.note.unwrap().contains("panicked"));
    let m = stage(&pipeline, "dead_letter_queue");
    assert_eq!((m.received, m.dead_lettered, m.failed), (3, 2, 1));
    assert_dlq_conserved(&m);
    pipeline.join().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn abort_while_the_sink_stalls_counts_everything() {
    let pipeline = Pipeline::with_edge(streamz::EdgeConfig::new(8, 4));
    let (tx, flow) = pipeline.channel::<u64>();
    let (dlq, _stalled) = stalled_dlq(2, Overflow::Block);
    let out = tokio::spawn(flow.pipe(dlq).collect());
    let producer = tokio::spawn(async move {
        for i in 0..50u64 {
            let item = if i % 2 == 0 {
                Err(StreamError::failed("s", "e").with_item(i))
            } else {
                Ok(i)
            };
            if tx.send_result(item).await.is_err() {
                break;
            }
        }
    });
    settle().await;
    pipeline.abort();
    pipeline.join().await.unwrap();
    producer.await.unwrap();
    let out = out.await.unwrap();
    let m = stage(&pipeline, "dead_letter_queue");
    assert!(m.aborted > 0, "{m:?}");
    assert_eq!(m.dead_lettered, 0);
    assert_dlq_conserved(&m);
    assert!(out.len() as u64 <= m.emitted);
}

#[tokio::test]
async fn one_json_queue_records_the_items_of_every_stage_and_replays_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.jsonl");
    let sink = FileSink::<serde_json::Value>::create(&path).await.unwrap();
    let items = dlq::JsonItems::new().of::<String>().of::<Order>();
    let out = streamz::iter(["1", "x", "3", "4"].map(String::from))
        .try_map(|s: &String| s.parse::<u64>().map(order)) // fails on a String
        .try_map(|o: &Order| {
            // fails on an Order
            if o.id == 3 {
                Err("blocked customer")
            } else {
                Ok(o.id)
            }
        })
        .try_map(|id: &u64| if *id == 4 { Err("no stock") } else { Ok(*id) }) // fails on a u64
        .pipe(DeadLetterQueue::json(sink, items))
        .collect()
        .await;
    assert_eq!(split(out).0, [1]);

    let records: Vec<DeadLetter<serde_json::Value>> = Replay::open(&path)
        .await
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(records.len(), 3);
    assert_eq!(
        records[0].item_type.as_deref(),
        Some("alloc::string::String")
    );
    assert_eq!(records[0].item, Some(serde_json::json!("x")));
    // Each item reads back as its own type.
    assert_eq!(records[1].item_type.as_deref(), Some("dlq::Order"));
    let blocked: Order = serde_json::from_value(records[1].item.clone().unwrap()).unwrap();
    assert_eq!(blocked, order(3));
    // A type the queue was not told about is noted, with its context.
    assert_eq!(
        (records[2].item.as_ref(), records[2].message.as_str()),
        (None, "no stock")
    );
    let note = records[2].note.as_deref().unwrap();
    assert!(note.contains("`u64`"), "{note}");
    assert!(
        note.contains("`alloc::string::String`, `dlq::Order`"),
        "{note}"
    );
}

/// A sink whose `write` panics before returning its future on the second
/// call: sink code outside the future must not lose records either.
struct PanicsOnSecondCall(u32);

impl dlq::DeadLetterSink<u64> for PanicsOnSecondCall {
    #[allow(clippy::manual_async_fn)]
    fn write(
        &mut self,
        _records: Vec<DeadLetter<u64>>,
    ) -> impl std::future::Future<Output = std::result::Result<(), Vec<Unwritten<u64>>>> + Send
    {
        self.0 += 1;
        if self.0 == 2 {
            panic!("broken sink");
        }
        async { Ok(()) }
    }
}

#[tokio::test]
async fn a_sink_that_panics_outside_its_future_still_accounts_for_every_record() {
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u64>();
    let mut flow = flow.pipe(DeadLetterQueue::new(PanicsOnSecondCall(0)).with_buffer(1));
    let producer = tokio::spawn(async move {
        for i in 0..50 {
            tx.send_result(Err(StreamError::failed("s", "e").with_item(i)))
                .await
                .unwrap();
        }
    });
    let mut errors = Vec::new();
    while let Some(item) = flow.next().await {
        errors.push(item.unwrap_err());
    }
    producer.await.unwrap();
    let m = stage(&pipeline, "dead_letter_queue");
    assert_eq!(m.received, 50);
    assert_dlq_conserved(&m);
    assert_eq!(m.aborted, 0);
    assert_eq!(errors.len() as u64, m.failed);
    assert!(m.failed >= 1 && errors.iter().all(|e| e.kind() == ErrorKind::Panicked));
    pipeline.join().await.unwrap();
}

/// An item whose serialisation panics.
#[derive(Debug)]
struct Explosive(u64);

impl Serialize for Explosive {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.0 == 3 {
            panic!("cannot serialise 3");
        }
        s.serialize_u64(self.0)
    }
}

#[tokio::test]
async fn a_record_whose_serialisation_panics_comes_back_and_the_file_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.jsonl");
    let sink = FileSink::<Explosive>::create(&path).await.unwrap();
    let stats = sink.stats();
    let input =
        (0..6).map(|i| Err::<u64, _>(StreamError::failed("s", "e").with_item(Explosive(i))));
    let flow = streamz::try_stream(futures::stream::iter(input)).pipe(DeadLetterQueue::new(sink));
    let pipeline = flow.pipeline().clone();
    let mut errors = split(flow.collect().await).1;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].kind(), ErrorKind::Panicked);
    let record = errors[0].take_item::<DeadLetter<Explosive>>().unwrap();
    assert_eq!(record.item.map(|e| e.0), Some(3));
    assert_eq!(stats.records(), 5);
    let lines = std::fs::read_to_string(&path).unwrap();
    assert_eq!(lines.lines().count(), 5);
    let m = stage(&pipeline, "dead_letter_queue");
    assert_eq!((m.dead_lettered, m.failed), (5, 1));
    assert_dlq_conserved(&m);
}

/// A sink that takes 1 ms per write and wants a flush every 5 ms.
struct Flushing {
    writes: u64,
    flushes: Arc<AtomicUsize>,
    last_flush: tokio::time::Instant,
}

impl dlq::DeadLetterSink<u64> for Flushing {
    async fn write(
        &mut self,
        _records: Vec<DeadLetter<u64>>,
    ) -> std::result::Result<(), Vec<Unwritten<u64>>> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.writes += 1;
        Ok(())
    }

    fn flush_at(&self) -> Option<tokio::time::Instant> {
        Some(self.last_flush + Duration::from_millis(5))
    }

    async fn flush(&mut self) -> std::result::Result<(), streamz::BoxError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.last_flush = tokio::time::Instant::now();
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_due_flush_happens_even_while_records_keep_arriving() {
    let flushes = Arc::new(AtomicUsize::new(0));
    let sink = Flushing {
        writes: 0,
        flushes: flushes.clone(),
        last_flush: tokio::time::Instant::now(),
    };
    // The buffer never runs dry: 200 records, one per write.
    let input = (0..200u64).map(|i| Err::<u64, _>(StreamError::failed("s", "e").with_item(i)));
    let start = tokio::time::Instant::now();
    streamz::try_stream(futures::stream::iter(input))
        .pipe(DeadLetterQueue::new(sink).with_buffer(1))
        .collect()
        .await;
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(200));
    // One flush per 5 ms of writing (and one at close).
    let flushes = flushes.load(Ordering::SeqCst);
    assert!(flushes >= 35, "{flushes} flushes in {elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_output_while_the_sink_stalls_stops_the_stage_and_the_sink_finishes() {
    let pipeline = Pipeline::with_edge(streamz::EdgeConfig::new(4, 4));
    let (tx, flow) = pipeline.channel::<u64>();
    let (dlq, Stalled { gate, seen }) = stalled_dlq(2, Overflow::Block);
    let flow = flow.pipe(dlq);
    let producer = tokio::spawn(async move {
        for i in 0..100u64 {
            let item = Err(StreamError::failed("s", "e").with_item(i));
            if tx.send_result(item).await.is_err() {
                return i;
            }
        }
        100
    });
    settle().await;
    // The router waits for room in the buffer; nobody reads the output.
    drop(flow);
    let sent = producer.await.unwrap();
    assert!(sent < 100, "the producer was not stopped");
    // The sink recovers: what was buffered is written, then all tasks end.
    gate.add_permits(100);
    pipeline.join().await.unwrap();
    let m = stage(&pipeline, "dead_letter_queue");
    assert!(m.aborted > 0);
    assert_eq!(m.dead_lettered, seen.lock().unwrap().len() as u64);
    assert_dlq_conserved(&m);
}

// ---- Hardening: permissions, retention, bounded replay, typed open
// errors, no blocking at construction, `Duration::MAX`, the buffer bound.

/// Writes `ids` as failures through a file sink made by `options` at
/// `path`, and returns the sink's stats.
async fn write_orders(
    path: &std::path::Path,
    options: FileSinkOptions,
    ids: std::ops::Range<u64>,
) -> dlq::FileSinkStats {
    let sink = options.create::<Order>(path).await.unwrap();
    let stats = sink.stats();
    let input = ids.map(|i| Err::<Order, _>(StreamError::failed("s", "e").with_item(order(i))));
    streamz::try_stream(futures::stream::iter(input))
        .pipe(DeadLetterQueue::new(sink))
        .collect()
        .await;
    stats
}

#[cfg(unix)]
fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
#[tokio::test]
async fn dead_letter_files_are_private_by_default_and_rotation_keeps_the_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.jsonl");
    let sink = FileSink::<Order>::create(&path).await.unwrap();
    assert_eq!(mode_of(&path), 0o600);
    drop(sink);

    let stats = write_orders(&path, FileSinkOptions::new().with_rotation(1000), 0..40).await;
    assert!(stats.rotations() >= 3, "{}", stats.rotations());
    assert_eq!(mode_of(&path), 0o600);
    for n in 1..=stats.rotations() {
        assert_eq!(mode_of(&dir.path().join(format!("dlq.jsonl.{n}"))), 0o600);
    }
}

#[cfg(unix)]
#[tokio::test]
async fn the_mode_option_sets_the_mode_of_every_file_the_sink_creates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.jsonl");
    let options = FileSinkOptions::new().with_mode(0o640).with_rotation(1000);
    let stats = write_orders(&path, options, 0..40).await;
    assert!(stats.rotations() >= 3);
    assert_eq!(mode_of(&path), 0o640);
    for n in 1..=stats.rotations() {
        assert_eq!(mode_of(&dir.path().join(format!("dlq.jsonl.{n}"))), 0o640);
    }
    // A file that already exists keeps its permissions.
    let existing = dir.path().join("existing.jsonl");
    std::fs::write(&existing, b"").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o604)).unwrap();
    FileSink::<Order>::create(&existing).await.unwrap();
    assert_eq!(mode_of(&existing), 0o604);
}

#[cfg(unix)]
#[tokio::test]
async fn setuid_setgid_and_sticky_bits_are_dropped_from_the_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.jsonl");
    let sink: FileSink<Order> = FileSinkOptions::new()
        .with_mode(0o7640)
        .create(&path)
        .await
        .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o640);
    drop(sink);
}

#[tokio::test]
async fn retention_keeps_the_newest_rotated_segments_and_replay_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.jsonl");
    let options = FileSinkOptions::new().with_rotation(1000).with_retention(2);
    let stats = write_orders(&path, options, 0..40).await;
    let rotations = stats.rotations();
    assert!(rotations >= 5, "{rotations}");
    assert_eq!(stats.segments_deleted(), rotations - 2);
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    let mut expected = vec![
        "dlq.jsonl".to_owned(),
        format!("dlq.jsonl.{}", rotations - 1),
        format!("dlq.jsonl.{rotations}"),
    ];
    expected.sort();
    assert_eq!(left, expected);
    // The oldest records are gone; what is left reads in order, to the end.
    let ids: Vec<u64> = Replay::<Order>::open_rotated(&path)
        .await
        .unwrap()
        .map(|r| r.unwrap().item.unwrap().id)
        .collect()
        .await;
    assert_eq!(*ids.last().unwrap(), 39);
    assert!(ids.len() < 40);
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");

    // Without a retention limit nothing is deleted (the default).
    let other = dir.path().join("all.jsonl");
    let stats = write_orders(&other, FileSinkOptions::new().with_rotation(1000), 0..40).await;
    assert_eq!(stats.segments_deleted(), 0);
    for n in 1..=stats.rotations() {
        assert!(dir.path().join(format!("all.jsonl.{n}")).exists());
    }
}

#[tokio::test]
async fn a_line_over_the_limit_is_one_rejected_item_and_replay_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.jsonl");
    let mut bytes = write_records(&path, 2).await;
    // 100 KiB of one line: a record far over the limit set below.
    bytes.extend(std::iter::repeat_n(b'x', 100 << 10));
    bytes.push(b'\n');
    bytes.extend(write_records(&dir.path().join("more.jsonl"), 2).await);
    std::fs::write(&path, bytes).unwrap();

    let replay = Replay::<Order>::open(&path)
        .await
        .unwrap()
        .with_max_line(1000);
    let stats = replay.stats();
    let mut items: Vec<Result<DeadLetter<Order>>> = replay.collect().await;
    assert_eq!(items.len(), 5);
    let mut err = items.remove(2).unwrap_err();
    assert_eq!((err.kind(), err.stage()), (ErrorKind::Rejected, "replay"));
    let source = err.cause().unwrap().downcast_ref::<DlqError>().unwrap();
    assert!(
        matches!(
            source,
            DlqError::LineTooLong {
                line: 3,
                max: 1000,
                ..
            }
        ),
        "{source}"
    );
    // Its text was not kept.
    assert!(err.take_item::<String>().is_none());
    let ids: Vec<u64> = items
        .into_iter()
        .map(|r| r.unwrap().item.unwrap().id)
        .collect();
    assert_eq!(ids, [0, 1, 0, 1]);
    assert_eq!(
        (
            stats.records(),
            stats.too_long(),
            stats.corrupt(),
            stats.torn()
        ),
        (4, 1, 0, 0)
    );
}

#[tokio::test]
async fn replay_fails_at_open_on_a_directory_and_on_a_gap_in_the_rotated_set() {
    let dir = tempfile::tempdir().unwrap();
    // A directory.
    let err = Replay::<Order>::open(dir.path()).await.unwrap_err();
    assert!(matches!(&err, DlqError::IsADirectory { path } if path == dir.path()));
    assert!(err.to_string().contains("is a directory"), "{err}");
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let err = Replay::<Order>::open_rotated(&sub).await.unwrap_err();
    assert!(matches!(err, DlqError::IsADirectory { .. }), "{err}");

    // Nothing at all: neither the file nor a segment.
    let path = dir.path().join("dlq.jsonl");
    let err = Replay::<Order>::open_rotated(&path).await.unwrap_err();
    assert!(
        matches!(&err, DlqError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{err}"
    );

    // `.1` and `.3` but no `.2`: records would vanish without a trace.
    let segment = |n: u64| dir.path().join(format!("dlq.jsonl.{n}"));
    let one = write_records(&dir.path().join("one.jsonl"), 1).await;
    for n in [1, 3] {
        std::fs::write(segment(n), &one).unwrap();
    }
    let err = Replay::<Order>::open_rotated(&path).await.unwrap_err();
    assert!(
        matches!(
            err,
            DlqError::MissingSegment {
                missing: 2,
                first: 1,
                last: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("segment 2 is missing"), "{err}");

    // A set that starts above 1 is what a retention limit leaves: fine.
    std::fs::remove_file(segment(1)).unwrap();
    std::fs::write(segment(4), &one).unwrap();
    let n = Replay::<Order>::open_rotated(&path)
        .await
        .unwrap()
        .count()
        .await;
    assert_eq!(n, 2);

    // A segment that is a directory.
    std::fs::create_dir(segment(5)).unwrap();
    let err = Replay::<Order>::open_rotated(&path).await.unwrap_err();
    assert!(matches!(err, DlqError::IsADirectory { .. }), "{err}");
}

#[tokio::test]
async fn replay_opens_the_rotated_files_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlq.jsonl");
    let one = write_records(&dir.path().join("one.jsonl"), 1).await;
    for n in 1..=3 {
        std::fs::write(dir.path().join(format!("dlq.jsonl.{n}")), &one).unwrap();
    }
    std::fs::write(&path, &one).unwrap();
    let replay = Replay::<Order>::open_rotated(&path).await.unwrap();
    // Had every file been opened already, deleting one now would not
    // matter (an open file outlives its name); it is opened in its turn.
    std::fs::remove_file(dir.path().join("dlq.jsonl.2")).unwrap();
    let items: Vec<Result<DeadLetter<Order>>> = replay.collect().await;
    assert_eq!(items.len(), 4);
    assert!(items[0].is_ok() && items[2].is_ok() && items[3].is_ok());
    let err = items[1].as_ref().unwrap_err();
    let source = err.cause().unwrap().downcast_ref::<DlqError>().unwrap();
    assert!(
        matches!(source, DlqError::Read { path, source } if path.ends_with("dlq.jsonl.2") && source.kind() == std::io::ErrorKind::NotFound),
        "{source}"
    );
}

/// Opening a FIFO for reading blocks until a writer opens it. On a
/// current-thread runtime, a `Replay::open` that blocked its thread would
/// hang the runtime; on the blocking pool the runtime keeps running and
/// opens the writer side itself. A watchdog turns a hang into a failure.
#[cfg(unix)]
#[test]
fn replay_open_does_not_block_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if !matches!(made, Ok(s) if s.success()) {
        return; // no mkfifo here
    }
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let n = rt.block_on(async move {
            let opening = tokio::spawn(Replay::<u64>::open(fifo.clone()));
            // The runtime still runs tasks while the open waits.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let line = "{\"sequence\":1,\"stage\":\"s\",\"kind\":\"failed\",\"message\":\"e\",\"attempts\":1,\"first_failure\":\"2026-01-01T00:00:00Z\",\"last_failure\":\"2026-01-01T00:00:00Z\",\"item_type\":\"u64\",\"item\":7}\n";
            let writer = tokio::task::spawn_blocking(move || std::fs::write(fifo, line));
            let replay = opening.await.unwrap().unwrap();
            writer.await.unwrap().unwrap();
            replay.count().await
        });
        done.send(n).unwrap();
    });
    let n = finished
        .recv_timeout(Duration::from_secs(60))
        .expect("Replay::open blocked the runtime's only thread");
    assert_eq!(n, 1);
}

#[tokio::test(start_paused = true)]
async fn an_interval_of_duration_max_means_never_by_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = FileSink::<u64>::create(dir.path().join("dlq.jsonl"))
        .await
        .unwrap()
        .with_fsync(Fsync::Interval(Duration::MAX));
    let stats = sink.stats();
    use dlq::DeadLetterSink;
    let record = DeadLetter::<u64>::from_error(1, StreamError::failed("s", "e").with_item(1u64));
    sink.write(vec![record]).await.unwrap();
    // No deadline (and no overflow panic computing one).
    assert_eq!(sink.flush_at(), None);
    let finite = FileSink::<u64>::create(dir.path().join("other.jsonl"))
        .await
        .unwrap()
        .with_fsync(Fsync::Interval(Duration::from_secs(1)));
    assert_eq!(finite.flush_at(), None, "nothing written yet");

    // In a pipeline: a century passes without a sync; close syncs.
    let pipeline = Pipeline::new();
    let (tx, flow) = pipeline.channel::<u64>();
    let out = tokio::spawn(flow.pipe(DeadLetterQueue::new(sink)).collect());
    tx.send_result(Err(StreamError::failed("s", "e").with_item(2)))
        .await
        .unwrap();
    until(|| stage(&pipeline, "dead_letter_queue").dead_lettered == 1).await;
    tokio::time::advance(Duration::from_secs(86_400 * 365 * 100)).await;
    assert_eq!(stats.syncs(), 0);
    assert_eq!(stats.records(), 2);
    drop(tx);
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap()
        .unwrap();
    assert!(out.is_empty());
    assert_eq!(stats.syncs(), 1);
}

/// A sink that takes batches and never answers; counts what it was handed.
struct NeverAnswers(Arc<AtomicUsize>);

impl dlq::DeadLetterSink<u64> for NeverAnswers {
    async fn write(
        &mut self,
        records: Vec<DeadLetter<u64>>,
    ) -> std::result::Result<(), Vec<Unwritten<u64>>> {
        self.0.fetch_add(records.len(), Ordering::SeqCst);
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn the_buffer_bounds_every_record_between_the_router_and_the_sink() {
    for (buffer, overflow) in [
        (1, Overflow::Block),
        (4, Overflow::Block),
        (300, Overflow::Block),
        (4, Overflow::DropAndCount),
    ] {
        // One item per chunk and per edge slot, so the count is exact.
        let pipeline = Pipeline::with_edge(streamz::EdgeConfig::new(1, 1));
        let (tx, flow) = pipeline.channel::<u64>();
        let handed = Arc::new(AtomicUsize::new(0));
        let dlq = DeadLetterQueue::new(NeverAnswers(handed.clone()))
            .with_buffer(buffer)
            .with_overflow(overflow);
        let out = tokio::spawn(flow.pipe(dlq).collect());
        let pushed = Arc::new(AtomicUsize::new(0));
        let producer = tokio::spawn({
            let pushed = pushed.clone();
            async move {
                for i in 0..1000u64 {
                    let item = Err(StreamError::failed("s", "e").with_item(i));
                    if tx.send_result(item).await.is_err() {
                        break;
                    }
                    pushed.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        settle().await;
        let m = stage(&pipeline, "dead_letter_queue");
        // Queued or in the sink's unanswered write: at most `buffer`.
        let handed = handed.load(Ordering::SeqCst);
        assert!(handed >= 1 && handed <= buffer, "{buffer}: handed {handed}");
        if overflow == Overflow::Block {
            // The documented bound: `buffer` records between the router
            // and the sink, the one the router holds waiting for room,
            // and what waits on the input edge (here its capacity, 1).
            let pushed = pushed.load(Ordering::SeqCst);
            assert_eq!(pushed, buffer + 2, "{buffer}: pushed {pushed}, {m:?}");
            assert!(!producer.is_finished());
        } else {
            // Dropping keeps the stage going; nothing beyond the buffer
            // is held.
            assert_eq!(m.dropped + buffer as u64, m.received, "{m:?}");
        }
        pipeline.abort();
        tokio::time::timeout(Duration::from_secs(60), pipeline.join())
            .await
            .unwrap()
            .unwrap();
        producer.await.unwrap();
        out.await.unwrap();
        assert_dlq_conserved(&stage(&pipeline, "dead_letter_queue"));
    }
}

#[tokio::test(start_paused = true)]
async fn fail_policy_emits_no_value_after_the_overflow_error() {
    let (dlq, Stalled { gate, seen }) = stalled_dlq(2, Overflow::Fail);
    let fail = |i: u64| Err(StreamError::failed("s", "e").with_item(i));
    // One chunk: the third error overflows; 101 and 102 come after it.
    let input = vec![fail(0), fail(1), Ok(100), fail(2), Ok(101), Ok(102)];
    let flow = streamz::try_stream(futures::stream::iter(input)).pipe(dlq);
    let pipeline = flow.pipeline().clone();
    let mut flow = flow;
    let first = tokio::time::timeout(Duration::from_secs(60), flow.next())
        .await
        .unwrap();
    assert_eq!(first.unwrap().unwrap(), 100);
    let mut err = flow.next().await.unwrap().unwrap_err();
    assert!(matches!(
        err.cause().unwrap().downcast_ref::<DlqError>(),
        Some(DlqError::Overflow { buffered: 2 })
    ));
    assert_eq!(err.take_item::<DeadLetter<u64>>().unwrap().item, Some(2));
    // The sink recovers: the stream ends, and no value follows the error.
    gate.add_permits(10);
    let rest: Vec<Result<u64>> = tokio::time::timeout(Duration::from_secs(60), flow.collect())
        .await
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(*seen.lock().unwrap(), [1, 2]);
    let m = stage(&pipeline, "dead_letter_queue");
    assert_eq!(
        (m.received, m.emitted, m.dead_lettered, m.failed, m.aborted),
        (6, 1, 2, 1, 2)
    );
    assert_dlq_conserved(&m);
}

#[tokio::test]
async fn a_panic_while_making_a_record_is_reported_and_every_item_is_counted() {
    // `Explosive(3)` panics when serialised, here in the router itself
    // (JSON records are made before they reach the sink).
    let (sink, letters) = dlq::channel(16);
    let input = (0..6u64).map(|i| {
        if i % 2 == 1 {
            Err(StreamError::failed("s", "e").with_item(Explosive(i)))
        } else {
            Ok(i)
        }
    });
    let flow = streamz::try_stream(futures::stream::iter(input)).pipe(DeadLetterQueue::json(
        sink,
        dlq::JsonItems::new().of::<Explosive>(),
    ));
    let pipeline = flow.pipeline().clone();
    let out = flow.collect().await;
    // The stage's panic comes downstream as its last item and from `join`.
    let last = out.last().unwrap().as_ref().unwrap_err();
    assert_eq!(
        (last.kind(), last.stage()),
        (ErrorKind::Panicked, "dead_letter_queue")
    );
    assert!(pipeline.join().await.is_err());
    let mut records = 0;
    while letters.recv().await.is_ok() {
        records += 1;
    }
    let m = stage(&pipeline, "dead_letter_queue");
    assert_eq!(m.received, 6);
    assert!(m.aborted > 0, "{m:?}");
    assert_eq!(m.dead_lettered, records);
    assert_dlq_conserved(&m);
}

#[tokio::test]
async fn tagged_items_of_two_types_are_replayed_and_read_back_by_their_tags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.jsonl");
    let input: Vec<Result<Order>> = vec![
        Err(StreamError::failed("parse", "not json").with_item(String::from("{oops"))),
        Err(StreamError::failed("price", "refused").with_item(order(7))),
        Err(StreamError::failed("source", "reset")),
    ];
    let items = dlq::JsonItems::new()
        .with_tag::<Order>("order.v1")
        .with_tag::<String>("raw_line");
    streamz::try_stream(futures::stream::iter(input))
        .pipe(DeadLetterQueue::json(
            FileSink::<serde_json::Value>::create(&path).await.unwrap(),
            items,
        ))
        .collect()
        .await;

    let records: Vec<DeadLetter<serde_json::Value>> = Replay::open(&path)
        .await
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
        .await;
    let tags: Vec<Option<&str>> = records.iter().map(|r| r.item_type.as_deref()).collect();
    assert_eq!(tags, [Some("raw_line"), Some("order.v1"), None]);
    assert_eq!(records[0].item_as::<String>().unwrap().unwrap(), "{oops");
    assert_eq!(records[1].item_as::<Order>().unwrap().unwrap(), order(7));
    // Read as the wrong type: an error, not a panic nor a silent default.
    assert!(records[1].item_as::<String>().unwrap().is_err());
    assert!(records[2].item_as::<Order>().is_none());
}

#[tokio::test]
async fn a_typed_queue_names_its_items_with_its_tag() {
    let (sink, letters) = dlq::channel::<Order>(4);
    let input: Vec<Result<Order>> = vec![Err(
        StreamError::failed("price", "refused").with_item(order(1))
    )];
    streamz::try_stream(futures::stream::iter(input))
        .pipe(DeadLetterQueue::new(sink).with_item_tag("order.v1"))
        .collect()
        .await;
    let letter = letters.recv().await.unwrap();
    assert_eq!(letter.item_type.as_deref(), Some("order.v1"));
    assert_eq!(letter.item, Some(order(1)));
}

#[tokio::test]
async fn an_item_that_cannot_be_json_is_noted_with_its_tag() {
    use std::collections::HashMap;
    // serde_json writes map keys as strings only: this map has no JSON.
    let weird: HashMap<(u8, u8), u8> = HashMap::from([((1, 2), 3)]);
    let (sink, letters) = dlq::channel(4);
    let input: Vec<Result<u8>> = vec![Err(StreamError::failed("stage", "bad").with_item(weird))];
    let items = dlq::JsonItems::new().with_tag::<HashMap<(u8, u8), u8>>("weird.v1");
    let out = streamz::try_stream(futures::stream::iter(input))
        .pipe(DeadLetterQueue::json(sink, items))
        .collect()
        .await;
    assert!(out.is_empty());
    let letter: DeadLetter<serde_json::Value> = letters.recv().await.unwrap();
    assert_eq!(letter.item, None);
    let note = letter.note.unwrap();
    assert!(
        note.contains("(tagged `weird.v1`) could not be written as JSON"),
        "{note}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_record_names_its_pipeline_the_items_source_position_and_its_tag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orders.dlq.jsonl");
    let pipeline = Pipeline::builder().with_name("billing").build();
    // An application source that numbers its items (its own offsets).
    let (acks, _receipts): (Vec<streamz::Ack>, Vec<_>) = (0..6u64)
        .map(|i| streamz::Ack::at(streamz::SourcePosition::Sequence { sequence: 100 + i }))
        .unzip();
    let items = (0..6u64).map(order).zip(acks).map(|(o, a)| (Ok(o), a));
    let fails_twice = AsyncMapper::new(|o: &Order| {
        let id = o.id;
        std::future::ready(if id % 3 == 1 {
            Err(std::io::Error::other("price service refused"))
        } else {
            Ok(id)
        })
    })
    .with_retry(
        Retry::attempts(2).with_backoff(Duration::from_millis(10), Duration::from_millis(10)),
    );
    let out = pipeline
        .acked_stream(futures::stream::iter(items))
        .map(|o: &Order| o.clone()) // what fails is no longer the source's item: the position follows the ack
        .pipe(fails_twice)
        .pipe(
            DeadLetterQueue::new(FileSink::<Order>::create(&path).await.unwrap())
                .with_item_tag("order.v1"),
        )
        .collect()
        .await;
    assert_eq!(out.len(), 4);

    let records: Vec<DeadLetter<Order>> = Replay::<Order>::open(&path)
        .await
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
        .await;
    let ids: Vec<u64> = records
        .iter()
        .map(|r| r.item.as_ref().unwrap().id)
        .collect();
    assert_eq!(ids, [1, 4]);
    for r in &records {
        let id = r.item.as_ref().unwrap().id;
        assert_eq!(r.pipeline.as_deref(), Some("billing"));
        assert_eq!(
            r.source,
            Some(streamz::SourcePosition::Sequence { sequence: 100 + id })
        );
        assert_eq!(r.item_type.as_deref(), Some("order.v1"));
        assert_eq!(r.attempts, 2);
        assert!(r.last_failure >= r.first_failure);
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.lines()
            .next()
            .unwrap()
            .contains(r#""pipeline":"billing","source":{"kind":"sequence","sequence":101}"#),
        "{text}"
    );
}

#[tokio::test]
async fn replay_reads_records_written_before_pipeline_and_source_existed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.dlq.jsonl");
    // A record as the file sink wrote it before the two fields.
    let old = r#"{"sequence":1,"stage":"parse","kind":"failed","message":"bad digit","causes":[],"attempts":1,"first_failure":"2026-11-30T16:00:00.5Z","last_failure":"2026-11-30T16:00:00.5Z","item_type":"u32","item":7,"note":null}"#;
    let new = r#"{"sequence":2,"pipeline":"p","source":{"kind":"kafka","topic":"orders","partition":3,"offset":1207},"stage":"parse","kind":"failed","message":"bad digit","causes":[],"attempts":1,"first_failure":"2026-11-30T16:00:00.5Z","last_failure":"2026-11-30T16:00:00.5Z","item_type":"u32","item":8,"note":null}"#;
    // And one with a kind of position this version does not know.
    let later = new.replace(
        r#"{"kind":"kafka","topic":"orders","partition":3,"offset":1207}"#,
        r#"{"kind":"shard","shard":3}"#,
    );
    std::fs::write(&path, format!("{old}\n{new}\n{later}\n")).unwrap();
    let replay = Replay::<u32>::open(&path).await.unwrap();
    let stats = replay.stats();
    let records: Vec<DeadLetter<u32>> = replay.map(|r| r.unwrap()).collect().await;
    assert_eq!(
        (
            records[0].item,
            records[0].pipeline.as_deref(),
            &records[0].source
        ),
        (Some(7), None, &None)
    );
    assert_eq!(records[1].pipeline.as_deref(), Some("p"));
    assert_eq!(
        records[1].source,
        Some(streamz::SourcePosition::Kafka {
            topic: "orders".into(),
            partition: 3,
            offset: 1207
        })
    );
    assert_eq!(records[2].source, Some(streamz::SourcePosition::Unknown));
    assert_eq!(records[2].item, Some(8));
    assert_eq!((stats.records(), stats.corrupt()), (3, 0));
}

#[tokio::test(start_paused = true)]
async fn values_of_a_batch_are_not_given_the_position_of_its_one_acked_item() {
    // Items 0, 4, 8 come with a position; the others with no ack at all.
    let items = (0..12u64).map(|i| {
        let ack = if i % 4 == 0 {
            streamz::Ack::at(streamz::SourcePosition::Sequence { sequence: i }).0
        } else {
            streamz::Ack::none()
        };
        (Ok(i), ack)
    });
    let (sink, letters) = dlq::channel::<u64>(64);
    let out = Pipeline::new()
        .acked_stream(futures::stream::iter(items))
        .pipe(streamz::Batcher::new(4, Duration::from_secs(60)))
        .step("unbatch", streamz::Unbatch::new())
        .try_map(|i: &u64| {
            if i % 2 == 1 {
                Err(format!("odd {i}"))
            } else {
                Ok(*i)
            }
        })
        .pipe(DeadLetterQueue::new(sink))
        .collect()
        .await;
    assert_eq!(out.len(), 6);
    let mut positions = Vec::new();
    while let Ok(letter) = letters.try_recv() {
        positions.push((letter.item.unwrap(), letter.source));
    }
    // The odd items had no position; their batch's one acked item's must
    // not be put on them.
    assert_eq!(positions.len(), 6);
    assert!(positions.iter().all(|(_, p)| p.is_none()), "{positions:?}");
}
