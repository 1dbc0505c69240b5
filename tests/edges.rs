//! Every operator task at the edges: `Duration::MAX` and extreme settings,
//! input chunks far larger than the edge's `max_chunk`, panics in user
//! hooks, and every way a run can end (input end, graceful shutdown, abort,
//! the consumer dropping its flow). Each run checks that no output chunk is
//! larger than the edge's `max_chunk`, that the run ends, and the
//! conservation law of the stage under test (with `dead_lettered`, which is
//! zero for every stage but a dead-letter queue).
//!
//! The table runs on a paused clock: a stage that waits for "never" makes
//! the runtime idle, the clock jumps, and the time limit fails the run. A
//! stage that spins would keep the clock from moving, so the whole table
//! also runs under a real-time limit on its own thread.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use streamz::dlq::{self, Overflow, Unwritten};
use streamz::{
    AsyncMapper, Batcher, DeadLetter, DeadLetterQueue, Debounce, EdgeConfig, Flow, HealthGate,
    Partition, Pipeline, Retry, Session, Sliding, StageMetrics, Take, Throttle, Tumbling, Unbatch,
};

/// The edge every case runs on: chunks of at most 4 items.
const MAX_CHUNK: usize = 4;
/// Values in; every 7th becomes an error before the stage under test.
const N: u64 = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Read everything.
    Complete,
    /// Graceful shutdown after the first chunk: everything accepted drains.
    Shutdown,
    /// Abort after the first chunk.
    Abort,
    /// Drop the output after the first chunk.
    DropOutput,
}

const ENDS: [End; 4] = [End::Complete, End::Shutdown, End::Abort, End::DropOutput];

type Run = Pin<Box<dyn Future<Output = Report>>>;

/// What one run saw.
#[derive(Debug)]
struct Report {
    largest_chunk: usize,
    stage: StageMetrics,
}

/// Input whose chunks are far larger than `MAX_CHUNK` (`Unbatch` of
/// 50-value vectors), with every 7th value made an error upstream.
fn input() -> Flow<u64> {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(16, MAX_CHUNK));
    let batches: Vec<Vec<u64>> = (0..N)
        .collect::<Vec<_>>()
        .chunks(50)
        .map(<[u64]>::to_vec)
        .collect();
    pipeline
        .iter(batches)
        .step("unbatch", Unbatch::new())
        .try_map(|x: &u64| if x % 7 == 3 { Err("seven") } else { Ok(*x) })
}

/// Drains `flow` the way `end` says and reports on the stage named `op`.
fn drive<U: Send + 'static>(flow: Flow<U>, end: End) -> Run {
    drive_all(vec![flow], end, "op")
}

/// Drains every output of a stage named `stage` at once, each the way
/// `end` says (the first output's first chunk triggers a shutdown or
/// abort; a dropped output is dropped after its own first chunk).
fn drive_all<U: Send + 'static>(flows: Vec<Flow<U>>, end: End, stage: &'static str) -> Run {
    Box::pin(async move {
        let pipeline = flows[0].pipeline().clone();
        let drains = flows.into_iter().enumerate().map(|(i, flow)| {
            let pipeline = pipeline.clone();
            async move {
                let mut flow = Some(flow);
                let mut largest = 0;
                // The run ends its way after the first chunk, or after a
                // while if no chunk comes (a stage that retries forever).
                let mut acted = false;
                let act = |flow: &mut Option<Flow<U>>| match end {
                    End::Complete => {}
                    End::Shutdown if i == 0 => pipeline.shutdown(),
                    End::Abort if i == 0 => pipeline.abort(),
                    End::Shutdown | End::Abort => {}
                    End::DropOutput => *flow = None,
                };
                let patience = tokio::time::sleep(Duration::from_secs(10));
                tokio::pin!(patience);
                while let Some(f) = flow.as_mut() {
                    tokio::select! {
                        chunk = f.next_chunk() => {
                            let Some(chunk) = chunk else { break };
                            largest = largest.max(chunk.len());
                            if !acted {
                                acted = true;
                                act(&mut flow);
                            }
                        }
                        () = &mut patience, if !acted => {
                            acted = true;
                            act(&mut flow);
                        }
                    }
                }
                largest
            }
        });
        let largest = futures::future::join_all(drains)
            .await
            .into_iter()
            .max()
            .unwrap_or(0);
        // An operator task that panicked on purpose is reported here; the
        // counts are what this test checks.
        let _ = pipeline.join().await;
        Report {
            largest_chunk: largest,
            stage: support::stage(&pipeline, stage),
        }
    })
}

struct Case {
    name: &'static str,
    run: fn(End) -> Run,
    /// The input never ends on its own account (a call retried forever):
    /// only shutdown, abort and a dropped output end the run.
    endless: bool,
    /// Whether a graceful shutdown may count items as aborted (a stage that
    /// ends its input on purpose).
    drops_on_shutdown: bool,
}

fn healthy_gate() -> HealthGate<streamz::HealthFn<impl FnMut() -> std::future::Ready<bool> + Send>>
{
    HealthGate::new(streamz::health_fn(|| std::future::ready(true)))
}

/// A dead-letter queue with a buffer of one record in front of a channel
/// of one record, whose receiver a task of its own drains (it ends when the
/// queue closes its sink, however the run ends).
fn channel_dlq(overflow: Overflow) -> DeadLetterQueue<u64, u64, dlq::ChannelSink<u64>> {
    let (sink, letters) = dlq::channel::<u64>(1);
    tokio::spawn(async move { while letters.recv().await.is_ok() {} });
    DeadLetterQueue::new(sink)
        .with_buffer(1)
        .with_overflow(overflow)
        .named("op")
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "batcher",
            run: |e| {
                drive(
                    input().pipe(Batcher::new(5, Duration::from_millis(10)).named("op")),
                    e,
                )
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "batcher without limits",
            run: |e| {
                drive(
                    input().pipe(Batcher::new(usize::MAX, Duration::MAX).named("op")),
                    e,
                )
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "batcher by weight, panicking weight",
            run: |e| {
                let b = Batcher::new(usize::MAX, Duration::MAX)
                    .with_weight(
                        10,
                        |x: &u64| if *x == 50 { panic!("weight") } else { x % 13 },
                    )
                    .named("op");
                drive(input().pipe(b), e)
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "throttle",
            run: |e| {
                drive(
                    input().pipe(Throttle::new(1000, Duration::from_secs(1)).named("op")),
                    e,
                )
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "throttle without limits",
            run: |e| {
                let t = Throttle::new(u64::MAX, Duration::from_secs(1))
                    .with_burst(u64::MAX)
                    .named("op");
                drive(input().pipe(t), e)
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "throttle with a huge period, panicking cost",
            run: |e| {
                let t = Throttle::new(1, Duration::from_secs(86_400 * 365 * 500))
                    .with_burst(u64::MAX)
                    .with_cost(|x: &u64| if *x == 50 { panic!("cost") } else { 1 })
                    .named("op");
                drive(input().pipe(t), e)
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "dropping throttle",
            run: |e| {
                let t = Throttle::new(
                    1,
                    Duration::MAX.min(Duration::from_secs(86_400 * 365 * 500)),
                )
                .dropping()
                .named("op");
                drive(input().pipe(t), e)
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "debounce",
            run: |e| {
                drive(
                    input().pipe(Debounce::new(Duration::from_millis(1)).named("op")),
                    e,
                )
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "debounce forever",
            run: |e| drive(input().pipe(Debounce::new(Duration::MAX).named("op")), e),
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "take",
            run: |e| drive(input().pipe(Take::new(30).named("op")), e),
            drops_on_shutdown: true,
            endless: false,
        },
        Case {
            name: "take everything",
            run: |e| drive(input().pipe(Take::new(u64::MAX).named("op")), e),
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "tumbling",
            run: |e| {
                drive(
                    input().pipe(Tumbling::new(Duration::from_millis(10)).named("op")),
                    e,
                )
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "tumbling forever, tiny limit",
            run: |e| {
                let w = Tumbling::new(Duration::MAX).with_max_items(1).named("op");
                drive(input().pipe(w), e)
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "sliding",
            run: |e| {
                let w =
                    Sliding::new(Duration::from_millis(10), Duration::from_millis(5)).named("op");
                drive(input().pipe(w), e)
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "sliding, tiny limit",
            run: |e| {
                let w = Sliding::new(Duration::from_millis(10), Duration::from_millis(5))
                    .with_max_items(1)
                    .named("op");
                drive(input().pipe(w), e)
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "session forever",
            run: |e| drive(input().pipe(Session::new(Duration::MAX).named("op")), e),
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "partition, round robin",
            run: |e| drive_all(input().partition(Partition::round_robin(3)), e, "partition"),
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "partition, panicking chooser",
            run: |e| {
                let choose = |x: &u64| {
                    if *x == 50 {
                        panic!("choose")
                    } else {
                        (*x % 2) as usize
                    }
                };
                drive_all(
                    input().partition(Partition::custom(2, choose)),
                    e,
                    "partition",
                )
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "broadcast to three",
            run: |e| drive_all(input().broadcast_to(3), e, "broadcast"),
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "async mapper, no limits",
            run: |e| {
                let m = AsyncMapper::new(|x: &u64| {
                    let x = *x;
                    async move {
                        tokio::time::sleep(Duration::from_millis(x % 5)).await;
                        Ok::<_, std::io::Error>(x + 1)
                    }
                })
                .with_concurrency(3)
                .with_timeout(Duration::MAX)
                .with_retry(Retry::attempts(3).with_deadline(Duration::MAX))
                .named("op");
                drive(input().pipe(m), e)
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "async mapper, unordered, panicking call",
            run: |e| {
                let m = AsyncMapper::new(|x: &u64| {
                    assert!(*x != 50, "call");
                    let x = *x;
                    async move { Ok::<_, std::io::Error>(x) }
                })
                .unordered()
                .named("op");
                drive(input().pipe(m), e)
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "async mapper retrying a dead dependency forever",
            run: |e| {
                let retry =
                    Retry::attempts(u32::MAX).with_backoff(Duration::from_secs(1), Duration::MAX);
                let m = AsyncMapper::new(|_: &u64| async { Err::<u64, _>("down") })
                    .with_retry(retry)
                    .named("op");
                drive(input().pipe(m), e)
            },
            drops_on_shutdown: false,
            endless: true,
        },
        Case {
            name: "health gate",
            run: |e| drive(input().pipe(healthy_gate().named("op")), e),
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "health gate, checks and limits of Duration::MAX",
            run: |e| {
                let gate = healthy_gate()
                    .with_interval(Duration::MAX)
                    .with_check_timeout(Duration::MAX)
                    .with_closed_limit(Duration::MAX, streamz::ClosedPolicy::Fail)
                    .named("op");
                drive(input().pipe(gate), e)
            },
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "dlq, a channel of 1 and a buffer of 1, blocking",
            run: |e| drive(input().pipe(channel_dlq(Overflow::Block)), e),
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "dlq, a channel of 1 and a buffer of 1, dropping",
            run: |e| drive(input().pipe(channel_dlq(Overflow::DropAndCount)), e),
            drops_on_shutdown: false,
            endless: false,
        },
        Case {
            name: "dlq, a sink that refuses every record",
            run: |e| {
                let sink = dlq::sink_fn(|r: DeadLetter<u64>| {
                    std::future::ready(Err(Unwritten::new(r, "refused")))
                });
                drive(input().pipe(DeadLetterQueue::new(sink).named("op")), e)
            },
            drops_on_shutdown: false,
            endless: false,
        },
    ]
}

fn check(case: &Case, end: End, r: &Report) {
    let m = &r.stage;
    let what = format!("{} / {end:?}: {m:?}", case.name);
    assert!(
        r.largest_chunk <= MAX_CHUNK,
        "{what}: a chunk of {}",
        r.largest_chunk
    );
    assert_eq!(
        m.received,
        m.emitted + m.dead_lettered + m.failed + m.errors_passed + m.dropped + m.aborted,
        "{what}: conservation"
    );
    assert!(m.received > 0, "{what}: nothing reached the stage");
    match end {
        End::Complete => assert_eq!((m.aborted, m.undelivered), (0, 0), "{what}"),
        End::Shutdown if !case.drops_on_shutdown => {
            assert_eq!(
                (m.aborted, m.undelivered),
                (0, 0),
                "{what}: a graceful shutdown loses nothing"
            )
        }
        _ => {}
    }
}

#[test]
fn every_operator_at_the_edges_keeps_its_bounds_and_counts() {
    let (done, finished) = std::sync::mpsc::channel();
    let failed = Arc::new(AtomicBool::new(false));
    let flag = failed.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async {
                for case in cases() {
                    for end in ENDS {
                        if case.endless && end == End::Complete {
                            continue;
                        }
                        let limit = Duration::from_secs(86_400 * 365);
                        let report = tokio::time::timeout(limit, (case.run)(end))
                            .await
                            .unwrap_or_else(|_| {
                                panic!("{} / {end:?}: the run never ended", case.name)
                            });
                        check(&case, end, &report);
                    }
                }
            })
        }));
        if result.is_err() {
            flag.store(true, Ordering::SeqCst);
        }
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(120))
        .expect("the table did not finish within 120 s of real time: a stage spins");
    assert!(
        !failed.load(Ordering::SeqCst),
        "a case failed (see its panic above)"
    );
}
