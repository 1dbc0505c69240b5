//! Sources, sinks, `pipe`, custom processors, edges and ready-chunk forwarding.

mod support;

use futures::{SinkExt, StreamExt};
use streamz::{EdgeConfig, Flow, Map, Pipeline, Processor, Stage};
use support::{settle, stage, values};

#[tokio::test]
async fn sources_iter_stream_and_channel() {
    assert_eq!(
        values(streamz::iter(vec![1, 2, 3]).collect().await),
        [1, 2, 3]
    );
    let s = futures::stream::iter(0..5).then(|x| async move { x * 2 });
    assert_eq!(values(streamz::stream(s).collect().await), [0, 2, 4, 6, 8]);

    let (tx, flow) = streamz::channel::<&str>();
    let consumer = tokio::spawn(flow.collect());
    tx.send("a").await.unwrap();
    tx.clone().send("b").await.unwrap();
    drop(tx);
    assert_eq!(values(consumer.await.unwrap()), ["a", "b"]);
}

#[tokio::test]
async fn sinks_collect_for_each_and_forward() {
    let mut seen = Vec::new();
    streamz::iter(0..3)
        .for_each(|r| seen.push(r.unwrap()))
        .await;
    assert_eq!(seen, [0, 1, 2]);

    let (tx, rx) = futures::channel::mpsc::unbounded();
    streamz::iter(0..3)
        .forward(tx.sink_map_err(|_| "closed"))
        .await
        .unwrap();
    let got: Vec<_> = rx.map(Result::unwrap).collect().await;
    assert_eq!(got, [0, 1, 2]);
}

#[tokio::test]
async fn forward_counts_what_a_failing_sink_refused() {
    let (tx, rx) = futures::channel::mpsc::channel::<streamz::Result<u32>>(0);
    drop(rx);
    let flow = streamz::iter(0..10u32);
    let pipeline = flow.pipeline().clone();
    assert!(flow.forward(tx).await.is_err());
    let produced = stage(&pipeline, "iter").emitted;
    assert_eq!(
        pipeline.discarded(),
        produced,
        "every refused item is counted"
    );
}

/// A reusable processor built from other stages.
struct Normalise;

impl Processor<String, String> for Normalise {
    fn name(&self) -> &str {
        "normalise"
    }

    fn process(self, input: Flow<String>) -> Flow<String> {
        input
            .map(|s: &String| s.trim().to_lowercase())
            .filter(|s: &String| !s.is_empty())
            .async_boundary(self.name().to_owned())
    }
}

#[tokio::test]
async fn custom_processor_composes_with_pipe() {
    let input = [" Hello", "", "WORLD "].map(String::from);
    let flow = streamz::iter(input).pipe(Normalise);
    let pipeline = flow.pipeline().clone();
    assert_eq!(values(flow.collect().await), ["hello", "world"]);
    assert_eq!(stage(&pipeline, "normalise").emitted, 2);
    assert_eq!(stage(&pipeline, "filter").dropped, 1);
}

#[test]
fn zero_sizes_are_rejected_with_a_typed_error() {
    let err = EdgeConfig::new(0, 1).validate().unwrap_err();
    assert_eq!((err.field(), err.is_zero()), ("edge.capacity", true));
    let err = EdgeConfig::new(1, 0).validate().unwrap_err();
    assert_eq!(err.field(), "edge.max_chunk");
    let err = EdgeConfig::new(0, 0).validate().unwrap_err();
    assert_eq!(err.to_string(), "`edge.capacity` must be greater than zero");
    let ok = EdgeConfig::default().with_capacity(3);
    assert_eq!((ok.capacity(), ok.max_chunk()), (3, 256));
    assert!(ok.validate().is_ok());
}

#[tokio::test]
async fn chunks_respect_max_chunk() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(64, 7));
    let mut flow = pipeline
        .iter(0..100u32)
        .pipe(Stage::new("s", Map::new(|x: &u32| *x)));
    let mut total = 0;
    while let Some(chunk) = flow.next_chunk().await {
        assert!(chunk.len() <= 7, "chunk of {}", chunk.len());
        total += chunk.len();
    }
    assert_eq!(total, 100);
}

#[tokio::test(start_paused = true)]
async fn a_single_item_is_forwarded_without_waiting_for_a_full_chunk() {
    let pipeline = Pipeline::new(); // max_chunk 256
    let (tx, flow) = pipeline.channel::<u32>();
    let mut out = flow
        .pipe(Stage::new("a", Map::new(|x: &u32| x + 1)))
        .pipe(Stage::new("b", Map::new(|x: &u32| x + 1)));
    tx.send(1).await.unwrap();
    // No more input arrives: once the stages are idle the item must already
    // be readable, without waiting for a chunk to fill.
    settle().await;
    let got = futures::FutureExt::now_or_never(out.next());
    assert_eq!(got.flatten().map(|r| r.unwrap()), Some(3));
    drop(tx);
}

#[tokio::test]
async fn a_flow_read_partly_as_a_stream_can_still_be_piped() {
    let mut flow = streamz::iter(0..10u32);
    assert_eq!(flow.next().await.unwrap().unwrap(), 0);
    let rest = flow.pipe(Stage::new("rest", Map::new(|x: &u32| *x)));
    assert_eq!(values(rest.collect().await), (1..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_stage_can_have_its_own_edge() {
    let edge = EdgeConfig::new(2, 1);
    let mut flow =
        streamz::iter(0..10u32).pipe(Stage::new("narrow", Map::new(|x: &u32| *x)).with_edge(edge));
    while let Some(chunk) = flow.next_chunk().await {
        assert_eq!(chunk.len(), 1);
    }
}
