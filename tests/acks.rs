//! Acknowledgements through every operator: an item's ack is met when its
//! outcome is decided (handed to the reader, dropped on purpose and
//! counted, written by the dead-letter queue's sink) and never when it is
//! lost to an abort or left unprocessed.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use streamz::dlq;
use streamz::{
    Ack, AsyncMapper, Batcher, Buffer, DeadLetterQueue, Debounce, Dedupe, Flow, Partition,
    Pipeline, Receipt, Retry, Sample, Session, Skip, Sliding, Stage, Switch, Take, Throttle,
    Tumbling, Unbatch,
};
use streamz::{ClosedPolicy, HealthGate};

const N: u32 = 600;

/// A source of `0..n` (as `value(i)`), each item with its own ack.
fn acked<T: Send + 'static>(
    pipeline: &Pipeline,
    n: u32,
    value: impl Fn(u32) -> T + Send + 'static,
) -> (Flow<T>, Vec<Receipt>) {
    let (acks, receipts): (Vec<Ack>, Vec<Receipt>) = (0..n).map(|_| Ack::new()).unzip();
    let items = (0..n).zip(acks).map(move |(i, ack)| (Ok(value(i)), ack));
    (
        pipeline.acked_stream(futures::stream::iter(items)),
        receipts,
    )
}

fn unmet(receipts: &[Receipt]) -> Vec<usize> {
    receipts
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.is_acked())
        .map(|(i, _)| i)
        .collect()
}

type Run = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A named chain over the acknowledged source, read to the end.
type Case = (&'static str, fn(Flow<u32>) -> Run);

/// Reads every output of a fan-out to the end.
fn read_all<T: Send + 'static>(flows: Vec<Flow<T>>) -> Run {
    Box::pin(async move {
        futures::future::join_all(flows.into_iter().map(|f| f.collect())).await;
    })
}

fn read<T: Send + 'static>(flow: Flow<T>) -> Run {
    read_all(vec![flow])
}

fn boom(i: &u32) -> std::io::Error {
    std::io::Error::other(format!("item {i} failed"))
}

/// Every case: a chain over the acknowledged source, read to the end.
fn cases() -> Vec<Case> {
    vec![
        ("map", |f| read(f.map(|v| v + 1))),
        ("map to another type", |f| read(f.map(|v| u64::from(*v)))),
        ("map that panics", |f| {
            read(f.map(|v| {
                assert!(v % 7 != 0, "seven");
                *v
            }))
        }),
        ("try_map that fails", |f| {
            read(f.try_map(|v| if v % 5 == 0 { Err(boom(v)) } else { Ok(*v) }))
        }),
        ("filter", |f| read(f.filter(|v| v % 2 == 0))),
        ("filter that panics", |f| {
            read(f.filter(|v| {
                assert!(v % 9 != 0, "nine");
                v % 2 == 0
            }))
        }),
        ("tap", |f| read(f.tap(|_| {}))),
        ("skip", |f| read(f.step("skip", Skip::new(10)))),
        ("sample", |f| read(f.step("sample", Sample::new(0.5)))),
        ("dedupe", |f| {
            read(f.map(|v| v % 50).step(
                "dedupe",
                Dedupe::new(|v: &u32| *v, 1000, Duration::from_secs(60)),
            ))
        }),
        ("a stage", |f| {
            read(f.pipe(Stage::new(
                "even",
                streamz::Filter::new(|v: &u32| v % 2 == 0),
            )))
        }),
        ("async boundary", |f| read(f.async_boundary("relay"))),
        ("buffer", |f| read(f.pipe(Buffer::new(16)))),
        ("batcher", |f| {
            read(f.pipe(Batcher::new(7, Duration::from_millis(5))))
        }),
        ("batcher by weight", |f| {
            read(f.pipe(
                Batcher::new(100, Duration::from_millis(5)).with_weight(20, |v| u64::from(v % 4)),
            ))
        }),
        ("batch then unbatch", |f| {
            read(
                f.pipe(Batcher::new(7, Duration::from_millis(5)))
                    .step("unbatch", Unbatch::new()),
            )
        }),
        ("batch, resize, unbatch", |f| {
            read(
                f.pipe(Batcher::new(7, Duration::from_millis(5)))
                    .map(|b| b.iter().take(3).copied().collect::<Vec<u32>>())
                    .step("unbatch", Unbatch::new()),
            )
        }),
        ("unbatch with emptied batches", |f| {
            read(
                f.pipe(Batcher::new(7, Duration::from_millis(5)))
                    .map(|b| if b[0] % 2 == 0 { Vec::new() } else { b.clone() })
                    .step("unbatch", Unbatch::new()),
            )
        }),
        ("a step that recovers errors", |f| {
            read(
                f.try_map(|v| if v % 3 == 0 { Err(boom(v)) } else { Ok(*v) })
                    .step("recover", Recover),
            )
        }),
        ("throttle", |f| {
            read(f.pipe(Throttle::new(1000, Duration::from_secs(1))))
        }),
        ("throttle dropping", |f| {
            read(f.pipe(Throttle::new(10, Duration::from_secs(1)).dropping()))
        }),
        ("throttle with a cost", |f| {
            read(
                f.pipe(Throttle::new(1000, Duration::from_secs(1)).with_cost(|v| u64::from(v % 3))),
            )
        }),
        ("debounce", |f| {
            read(f.pipe(Debounce::new(Duration::from_millis(1))))
        }),
        ("tumbling", |f| {
            read(f.pipe(Tumbling::new(Duration::from_millis(3)).with_max_items(40)))
        }),
        ("sliding", |f| {
            read(f.pipe(Sliding::new(
                Duration::from_millis(4),
                Duration::from_millis(1),
            )))
        }),
        ("session", |f| {
            read(f.pipe(Session::new(Duration::from_millis(2))))
        }),
        ("partition", |f| {
            read_all(f.partition(Partition::round_robin(3)))
        }),
        ("switch with unrouted values", |f| {
            let mut routes = f.switch(Switch::new(|v: &u32| v % 4).route(0).route(1));
            read_all(vec![routes.take(&0).unwrap(), routes.take(&1).unwrap()])
        }),
        ("broadcast", |f| {
            let [a, b] = f.broadcast::<2>();
            read_all(vec![a, b])
        }),
        ("async mapper with failures", |f| {
            let mapper = AsyncMapper::new(|v: &u32| {
                let v = *v;
                async move { if v % 6 == 0 { Err(boom(&v)) } else { Ok(v * 2) } }
            })
            .with_concurrency(4)
            .with_retry(
                Retry::attempts(2).with_backoff(Duration::from_millis(1), Duration::from_millis(1)),
            );
            read(f.pipe(mapper))
        }),
        ("unordered async mapper", |f| {
            let mapper = AsyncMapper::new(|v: &u32| {
                let v = *v;
                async move {
                    tokio::time::sleep(Duration::from_millis(u64::from(v % 3))).await;
                    Ok::<_, std::io::Error>(v)
                }
            })
            .with_concurrency(8)
            .unordered();
            read(f.pipe(mapper))
        }),
        ("dead-letter queue", |f| {
            let (sink, letters) = dlq::channel::<u32>(1024);
            let chain = f
                .try_map(|v| if v % 4 == 0 { Err(boom(v)) } else { Ok(*v) })
                .pipe(DeadLetterQueue::new(sink));
            Box::pin(async move {
                let reader = tokio::spawn(async move { while letters.recv().await.is_ok() {} });
                chain.collect().await;
                reader.await.unwrap();
            })
        }),
        ("an open health gate", |f| {
            let up = streamz::health_fn(|| async { streamz::Health::Healthy });
            read(f.pipe(HealthGate::new(up).with_interval(Duration::from_millis(10))))
        }),
        ("a gate closed too long, rejecting", |f| {
            let down = streamz::health_fn(|| async { streamz::Health::unhealthy("down") });
            let gate = HealthGate::new(down)
                .with_interval(Duration::from_millis(10))
                .with_closed_limit(Duration::from_millis(50), ClosedPolicy::Reject);
            read(f.pipe(gate))
        }),
        ("merge", |f| {
            let [a, b] = f.broadcast::<2>();
            read(streamz::merge([a.map(|v| v + 1), b]))
        }),
    ]
}

#[tokio::test(start_paused = true)]
async fn every_operator_meets_the_acks_of_what_it_hands_over_or_drops() {
    for (name, run) in cases() {
        let pipeline = Pipeline::new();
        let (flow, receipts) = acked(&pipeline, N, |i| i);
        tokio::time::timeout(Duration::from_secs(600), run(flow))
            .await
            .unwrap_or_else(|_| panic!("{name}: hung"));
        let unmet = unmet(&receipts);
        assert!(unmet.is_empty(), "{name}: unacknowledged items {unmet:?}");
        pipeline.join().await.ok();
    }
}

/// Turns every error into the value 0 (taking the error).
struct Recover;

impl streamz::Step<u32, u32> for Recover {
    fn on_item(&mut self, item: streamz::Item<'_, u32>, out: &mut streamz::Emit<'_, u32>) {
        out.emit(*item);
    }

    fn on_error(
        &mut self,
        error: streamz::Item<'_, streamz::StreamError>,
        out: &mut streamz::Emit<'_, u32>,
    ) {
        drop(error.take());
        out.emit(0);
    }
}

/// A batch reordered before it is unbatched: the values no longer line up
/// with the items they came from, so no item is acknowledged until every
/// value of its batch is decided.
#[tokio::test(start_paused = true)]
async fn a_reordered_batch_acknowledges_no_item_before_its_whole_batch() {
    let pipeline = Pipeline::new();
    let (flow, receipts) = acked(&pipeline, 10, |i| i);
    let out = flow
        .pipe(Batcher::new(10, Duration::from_millis(5)))
        .map(|b| b.iter().rev().copied().collect::<Vec<u32>>())
        .step("unbatch", Unbatch::new())
        .pipe(Take::new(1))
        .collect()
        .await;
    assert_eq!(support::values(out), [9]);
    assert_eq!(unmet(&receipts), (0..10).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn an_abort_acknowledges_nothing_in_flight() {
    let pipeline = Pipeline::new();
    let (flow, receipts) = acked(&pipeline, 100, |i| i);
    let mapper = AsyncMapper::new(|v: &u32| {
        let v = *v;
        async move {
            tokio::time::sleep(Duration::from_secs(if v < 10 { 0 } else { 3600 })).await;
            Ok::<_, std::io::Error>(v)
        }
    })
    .with_concurrency(4);
    let mut out = flow.pipe(mapper);
    let mut got = 0;
    while got < 10 {
        got += out.next_chunk().await.expect("items").len();
    }
    pipeline.abort();
    while out.next_chunk().await.is_some() {}
    assert_eq!(unmet(&receipts), (10..100).collect::<Vec<_>>());
}

#[tokio::test]
async fn take_leaves_what_it_did_not_take_unacknowledged() {
    let pipeline = Pipeline::new();
    let (flow, receipts) = acked(&pipeline, 100, |i| i);
    let out = flow.pipe(Take::new(30)).collect().await;
    assert_eq!(out.len(), 30);
    assert_eq!(unmet(&receipts), (30..100).collect::<Vec<_>>());
}

#[tokio::test]
async fn for_each_acked_meets_only_what_the_reader_wrote() {
    let pipeline = Pipeline::new();
    let (flow, receipts) = acked(&pipeline, 20, |i| i);
    let result = flow
        .for_each_acked(|item| {
            let v = item.unwrap();
            async move {
                if v == 12 {
                    Err(format!("could not write {v}"))
                } else {
                    Ok(())
                }
            }
        })
        .await;
    assert_eq!(result.unwrap_err(), "could not write 12");
    assert_eq!(unmet(&receipts), (12..20).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_error_item_is_acknowledged_when_handed_over() {
    let pipeline = Pipeline::new();
    let (flow, receipts) = acked(&pipeline, 10, |i| i);
    let mut flow = flow.try_map(|v| if *v == 3 { Err(boom(v)) } else { Ok(*v) });
    let mut seen = 0;
    while let Some(item) = flow.next().await {
        seen += 1;
        // Handed over one at a time: everything read so far is met.
        assert!(receipts[..seen].iter().all(Receipt::is_acked), "{item:?}");
    }
    assert_eq!(seen, 10);
}

#[tokio::test]
async fn a_chunk_read_with_its_acks_is_met_only_by_the_reader() {
    let pipeline = Pipeline::new();
    let (mut flow, receipts) = acked(&pipeline, 10, |i| i);
    let mut chunk = flow.next_acked_chunk().await.unwrap();
    assert_eq!(chunk.len(), 10);
    assert!(chunk.has_acks());
    let acks = chunk.take_acks();
    assert_eq!(unmet(&receipts).len(), 10);
    acks.into_iter().for_each(Ack::ack);
    assert!(unmet(&receipts).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_is_acknowledged_once_its_sink_wrote_it() {
    let pipeline = Pipeline::new();
    let (flow, receipts) = acked(&pipeline, 4, |i| i);
    let (sink, letters) = dlq::channel::<u32>(1);
    let mut out = flow
        .try_map(|v| {
            if *v == 1 || *v == 2 {
                Err(boom(v))
            } else {
                Ok(*v)
            }
        })
        .pipe(DeadLetterQueue::new(sink).with_buffer(4));
    // Values 0 and 3 reach the reader; the channel sink takes one record
    // and waits for room for the second.
    let mut values = Vec::new();
    while values.len() < 2 {
        let item = out.next().await.expect("values");
        values.push(item.unwrap());
    }
    support::settle().await;
    assert!(receipts[0].is_acked() && receipts[3].is_acked());
    assert!(!receipts[1].is_acked() && !receipts[2].is_acked());
    letters.recv().await.expect("first record");
    letters.recv().await.expect("second record");
    assert!(out.next().await.is_none());
    assert!(unmet(&receipts).is_empty());
}

#[tokio::test]
async fn forward_meets_acks_once_the_sink_flushed() {
    let pipeline = Pipeline::new();
    let (flow, receipts) = acked(&pipeline, 50, |i| i);
    let (tx, rx) = futures::channel::mpsc::channel(100);
    let sink = futures::SinkExt::sink_map_err(tx, |_| "receiver gone");
    flow.forward(sink).await.unwrap();
    assert_eq!(rx.count().await, 50);
    assert!(unmet(&receipts).is_empty());
}

#[tokio::test]
async fn items_of_an_ordinary_source_carry_no_acks() {
    let mut flow = streamz::iter(0..10).map(|v| v + 1);
    let chunk = flow.next_acked_chunk().await.unwrap();
    assert!(!chunk.has_acks());
}

/// `for_each` decides an item once its closure returned: a panic in the
/// closure leaves that item and the rest of its chunk undecided.
#[tokio::test]
async fn for_each_that_panics_leaves_the_rest_unacknowledged() {
    let pipeline = Pipeline::new();
    let (flow, receipts) = acked(&pipeline, 10, |i| i);
    let run = tokio::spawn(flow.for_each(|item| assert!(item.unwrap() != 4, "four")));
    assert!(run.await.unwrap_err().is_panic());
    assert_eq!(unmet(&receipts), (4..10).collect::<Vec<_>>());
}
