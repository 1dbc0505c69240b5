//! Tumbling, sliding and session windows on a paused clock: which values
//! land in which window, errors, flushing at the end and at a graceful
//! shutdown, aborts counted, bounded sessions, bad configuration.

mod support;

use std::time::Duration;

use streamz::{ErrorKind, Pipeline, Pusher, Session, Sliding, StreamError, Tumbling, Window};
use support::{assert_conserved, stage};
use tokio::task::JoinHandle;

const S: Duration = Duration::from_secs(1);

type Windows<T> = JoinHandle<Vec<streamz::Result<Window<T>>>>;

fn start<P>(window: P) -> (Pipeline, Pusher<u32>, Windows<u32>)
where
    P: streamz::Processor<u32, Window<u32>>,
{
    let pipeline = Pipeline::new();
    let (pusher, flow) = pipeline.channel::<u32>();
    let out = tokio::spawn(flow.pipe(window).collect());
    (pipeline, pusher, out)
}

/// (start, end) in seconds since `origin`, and the values, of each window.
fn shape(
    origin: tokio::time::Instant,
    out: Vec<streamz::Result<Window<u32>>>,
) -> Vec<((u64, u64), Vec<u32>, usize)> {
    out.into_iter()
        .map(|w| {
            let w = w.unwrap();
            let secs = |t: tokio::time::Instant| (t - origin).as_secs();
            ((secs(w.start), secs(w.end)), w.items, w.errors.len())
        })
        .collect()
}

fn error() -> StreamError {
    StreamError::new(ErrorKind::Failed, "upstream")
}

#[tokio::test(start_paused = true)]
async fn tumbling_windows_are_back_to_back_skip_empty_spans_and_flush_at_the_end() {
    let origin = tokio::time::Instant::now();
    let (pipeline, pusher, out) = start(Tumbling::new(10 * S));
    pusher.send(1).await.unwrap();
    tokio::time::sleep(3 * S).await;
    pusher.send(2).await.unwrap();
    pusher.send_result(Err(error())).await.unwrap();
    tokio::time::sleep(9 * S).await; // 12 s: the first window closed at 10 s
    pusher.send(3).await.unwrap();
    tokio::time::sleep(30 * S).await; // 42 s: [10, 20) closed; [20, 40) empty
    pusher.send(4).await.unwrap();
    drop(pusher); // [40, 50) is flushed at once
    let windows = shape(origin, out.await.unwrap());
    assert_eq!(
        windows,
        [
            ((0, 10), vec![1, 2], 1),
            ((10, 20), vec![3], 0),
            ((40, 50), vec![4], 0)
        ]
    );
    let m = stage(&pipeline, "tumbling_window");
    assert_eq!((m.received, m.emitted, m.errors_passed), (5, 4, 1));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn a_window_leaves_when_it_ends_not_when_the_next_value_comes() {
    let pipeline = Pipeline::new();
    let (pusher, flow) = pipeline.channel::<u32>();
    let (tx, mut windows) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(
        flow.pipe(Tumbling::new(10 * S))
            .for_each(move |w| tx.send((tokio::time::Instant::now(), w)).unwrap()),
    );
    let begin = tokio::time::Instant::now();
    pusher.send(1).await.unwrap();
    // Nothing more arrives, and the input stays open: the window still
    // leaves at 10 s.
    let (at, w) = windows.recv().await.unwrap();
    let w = w.unwrap();
    assert_eq!(
        (at - begin, w.items, w.end - begin),
        (10 * S, vec![1], 10 * S)
    );
    drop(pusher);
    assert!(windows.recv().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn sliding_windows_overlap_and_an_error_is_reported_once() {
    let origin = tokio::time::Instant::now();
    let (pipeline, pusher, out) = start(Sliding::new(10 * S, 5 * S));
    tokio::time::sleep(2 * S).await;
    pusher.send(1).await.unwrap(); // 2 s: in [0, 10) (windows start at 0)
    tokio::time::sleep(5 * S).await;
    pusher.send(2).await.unwrap(); // 7 s: [0,10) and [5,15)
    pusher.send_result(Err(error())).await.unwrap();
    tokio::time::sleep(6 * S).await;
    pusher.send(3).await.unwrap(); // 13 s: [5,15) and [10,20)
    drop(pusher);
    let windows = shape(origin, out.await.unwrap());
    assert_eq!(
        windows,
        [
            ((0, 10), vec![1, 2], 1),
            ((5, 15), vec![2, 3], 0),
            ((10, 20), vec![3], 0)
        ]
    );
    let m = stage(&pipeline, "sliding_window");
    // Counted once per value, however many windows it is in.
    assert_eq!((m.received, m.emitted, m.errors_passed), (4, 3, 1));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn sessions_close_after_the_gap_and_early_at_their_size_limit() {
    let origin = tokio::time::Instant::now();
    let session = Session::new(30 * S).with_max_items(3);
    let (pipeline, pusher, out) = start(session);
    pusher.send(1).await.unwrap();
    tokio::time::sleep(20 * S).await;
    pusher.send(2).await.unwrap(); // 20 s: within the gap
    tokio::time::sleep(40 * S).await; // closes at 50 s
    pusher.send(3).await.unwrap(); // 60 s: a new session
    pusher.send(4).await.unwrap();
    pusher.send(5).await.unwrap(); // three values: it closes at once
    pusher.send(6).await.unwrap();
    drop(pusher); // flushed at once
    let windows = shape(origin, out.await.unwrap());
    assert_eq!(
        windows,
        [
            ((0, 50), vec![1, 2], 0),
            ((60, 60), vec![3, 4, 5], 0),
            ((60, 90), vec![6], 0)
        ]
    );
    let m = stage(&pipeline, "session_window");
    assert_eq!((m.received, m.emitted), (6, 6));
    assert_conserved(&m);
}

#[tokio::test(start_paused = true)]
async fn open_windows_flush_on_graceful_shutdown_and_are_counted_on_abort() {
    for abort in [false, true] {
        let (pipeline, pusher, out) = start(Session::new(60 * S));
        pusher.send(1).await.unwrap();
        pusher.send(2).await.unwrap();
        // Returns once every task is idle (the session waits for 60 s).
        tokio::time::sleep(S).await;
        if abort {
            pipeline.abort();
        } else {
            pipeline.shutdown();
        }
        let out = out.await.unwrap();
        let m = stage(&pipeline, "session_window");
        if abort {
            assert!(out.is_empty());
            assert_eq!(m.aborted, 2);
        } else {
            assert_eq!(out.len(), 1);
            assert_eq!(m.emitted, 2);
        }
        assert_conserved(&m);
        drop(pusher);
    }
}

#[tokio::test]
async fn bad_window_settings_are_refused_by_name() {
    assert_eq!(
        support::refused::<u32, Window<u32>, _>(Tumbling::new(Duration::ZERO)).field(),
        "size"
    );
    assert_eq!(
        support::refused::<u32, Window<u32>, _>(Sliding::new(S, Duration::ZERO)).field(),
        "slide"
    );
    assert_eq!(
        support::refused::<u32, Window<u32>, _>(Sliding::new(S, 2 * S)).to_string(),
        "Sliding `sliding_window`: `slide` must not be longer than the window size"
    );
    assert_eq!(
        support::refused::<u32, Window<u32>, _>(Session::new(Duration::ZERO)).field(),
        "gap"
    );
    assert_eq!(
        support::refused::<u32, Window<u32>, _>(Session::new(S).with_max_items(0)).field(),
        "max_items"
    );
}

#[tokio::test(start_paused = true)]
async fn enormous_windows_and_gaps_never_close_by_time_but_flush_at_the_end() {
    let (_, pusher, out) = start(Tumbling::new(Duration::MAX));
    pusher.send(1).await.unwrap();
    drop(pusher);
    assert_eq!(out.await.unwrap().len(), 1);
    // A sliding window that never closes would hold its input back for
    // good once `max_items` arrivals wait in it: refused up front.
    let endless =
        support::refused::<u32, Window<u32>, _>(Sliding::new(Duration::MAX, Duration::MAX));
    assert_eq!(endless.field(), "size");
    let (_, pusher, out) = start(Session::new(Duration::MAX));
    pusher.send(1).await.unwrap();
    drop(pusher);
    assert_eq!(out.await.unwrap().len(), 1);
}

#[test]
fn tiny_windows_after_a_long_idle_time_do_not_spin() {
    // More than u32::MAX windows of 1 µs pass before the value: the window
    // index arithmetic must not stall. Run in a thread so a spinning stage
    // fails the test instead of hanging it.
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let windows = rt.block_on(async {
            let (_, pusher, out) = start(Tumbling::new(Duration::from_micros(1)));
            tokio::time::sleep(5_000 * S).await;
            pusher.send(7).await.unwrap();
            tokio::time::sleep(S).await;
            drop(pusher);
            out.await.unwrap()
        });
        let _ = done_tx.send(windows.len());
    });
    let n = done
        .recv_timeout(Duration::from_secs(60))
        .expect("the window stage is stuck");
    assert_eq!(n, 1);
}

#[tokio::test(start_paused = true)]
async fn an_aborted_sliding_window_counts_every_value_once() {
    let pipeline = Pipeline::with_edge(streamz::EdgeConfig::new(1, 1));
    let (pusher, flow) = pipeline.channel::<u32>();
    // Nobody reads the windows: the stage's one-window edge fills, and the
    // next window waits in the stage.
    let windows = flow.pipe(Sliding::new(10 * S, 5 * S));
    // The producer runs apart: once the stage is stuck sending, it waits.
    let producer = tokio::spawn(async move {
        for v in 1..=6 {
            if pusher.send(v).await.is_err() {
                return;
            }
            tokio::time::sleep(4 * S).await;
        }
    });
    tokio::time::sleep(60 * S).await;
    pipeline.abort();
    pipeline.join().await.unwrap();
    producer.await.unwrap();
    let m = stage(&pipeline, "sliding_window");
    assert!(m.received > 0);
    assert_conserved(&m);
    // Undelivered is counted in input items, like emitted.
    assert!(m.undelivered <= m.emitted + m.errors_passed, "{m:?}");
    assert!(m.undelivered > 0 && m.aborted > 0, "{m:?}");
    drop(windows);
}

#[tokio::test(start_paused = true)]
async fn a_tumbling_window_at_its_item_limit_leaves_at_once_and_its_span_goes_on() {
    let origin = tokio::time::Instant::now();
    let window = Tumbling::new(60 * S).with_max_items(3);
    let (pipeline, pusher, out) = start(window);
    for v in 1..=4 {
        pusher.send(v).await.unwrap();
    }
    tokio::time::sleep(10 * S).await;
    pusher.send(5).await.unwrap();
    drop(pusher);
    let windows = shape(origin, out.await.unwrap());
    assert_eq!(
        windows,
        [((0, 0), vec![1, 2, 3], 0), ((0, 60), vec![4, 5], 0)]
    );
    let m = stage(&pipeline, "tumbling_window");
    assert_eq!((m.received, m.emitted), (5, 5));
    assert_conserved(&m);
}
