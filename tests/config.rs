//! The API convention: constructors and `with_*` setters never fail; an
//! invalid setting is found when its stage is piped. `try_pipe` returns the
//! `ConfigError`; `pipe` starts nothing, yields one `ErrorKind::Config`
//! item and makes `join` fail; the stage before counts what it could not
//! deliver.

mod support;

use std::time::Duration;

use streamz::{
    Batcher, Buffer, ConfigError, Debounce, Dedupe, EdgeConfig, ErrorKind, Flow, Partition,
    Pipeline, PipelineError, Processor, Sample, Session, Skip, Sliding, Switch, Take, Throttle,
    Tumbling,
};

/// The error `try_pipe` gives for `op` on a fresh flow of numbers.
fn refused<P: Processor<u32, U>, U: Send + 'static>(op: P) -> ConfigError {
    match streamz::iter(0..10u32).try_pipe(op) {
        Ok(_) => panic!("the invalid setting was accepted"),
        Err(e) => e,
    }
}

fn check(e: ConfigError, operator: &str, stage: &str, field: &str) {
    assert_eq!(e.operator(), Some(operator), "{e}");
    assert_eq!(e.stage(), Some(stage), "{e}");
    assert_eq!(e.field(), field, "{e}");
    assert!(e.to_string().contains(field), "{e}");
}

#[tokio::test]
async fn every_operator_names_itself_its_stage_and_the_field() {
    let ms = Duration::from_millis;
    check(
        refused(Batcher::new(0, ms(1))),
        "Batcher",
        "batcher",
        "max_size",
    );
    check(
        refused(Batcher::new(1, Duration::ZERO)),
        "Batcher",
        "batcher",
        "max_latency",
    );
    check(
        refused(
            Batcher::new(9, ms(1))
                .with_weight(0, |_: &u32| 1)
                .named("b"),
        ),
        "Batcher",
        "b",
        "max_weight",
    );
    check(
        refused(Batcher::new(9, ms(1)).with_edge(EdgeConfig::new(0, 1))),
        "Batcher",
        "batcher",
        "edge.capacity",
    );
    check(
        refused(Throttle::new(0, ms(1))),
        "Throttle",
        "throttle",
        "rate",
    );
    check(
        refused(Throttle::new(1, Duration::ZERO)),
        "Throttle",
        "throttle",
        "period",
    );
    check(
        refused(Throttle::new(1, Duration::MAX)),
        "Throttle",
        "throttle",
        "period",
    );
    check(
        refused(Throttle::new(1, ms(1)).with_burst(0)),
        "Throttle",
        "throttle",
        "burst",
    );
    check(
        refused(Debounce::new(Duration::ZERO)),
        "Debounce",
        "debounce",
        "quiet",
    );
    check(refused(Take::new(0)), "Take", "take", "n");
    check(refused(Buffer::new(0)), "Buffer", "buffer", "capacity");
    check(
        refused(Tumbling::new(Duration::ZERO)),
        "Tumbling",
        "tumbling_window",
        "size",
    );
    check(
        refused(Tumbling::new(ms(5)).with_max_items(0)),
        "Tumbling",
        "tumbling_window",
        "max_items",
    );
    check(
        refused(Sliding::new(ms(5), ms(6))),
        "Sliding",
        "sliding_window",
        "slide",
    );
    check(
        refused(Sliding::new(Duration::MAX, ms(6))),
        "Sliding",
        "sliding_window",
        "size",
    );
    check(
        refused(Session::new(Duration::ZERO)),
        "Session",
        "session_window",
        "gap",
    );
    check(
        refused(streamz::Stage::new("skipper", Skip::new(0))),
        "Skip",
        "skipper",
        "n",
    );
}

#[tokio::test]
async fn steps_are_checked_when_fused() {
    let e = streamz::iter(0..3u32)
        .try_step("s", Sample::new(f64::NAN))
        .unwrap_err();
    check(e, "Sample", "s", "p");
    let e = streamz::iter(0..3u32)
        .try_step("d", Dedupe::new(|x: &u32| *x, 0, Duration::from_secs(1)))
        .unwrap_err();
    check(e, "Dedupe", "d", "capacity");

    // `step` itself: one Config item, and the join says why.
    let pipeline = Pipeline::new();
    let out = pipeline
        .iter(0..3u32)
        .step("skip", Skip::new(0))
        .collect()
        .await;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].as_ref().unwrap_err().kind(), ErrorKind::Config);
    assert!(matches!(pipeline.join().await, Err(PipelineError::Config(e)) if e.field() == "n"));
}

#[tokio::test]
async fn pipe_yields_one_config_item_starts_nothing_and_join_fails() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .iter(0..1000u32)
        .pipe(Batcher::new(0, Duration::from_secs(1)).named("batches"))
        .collect()
        .await;
    assert_eq!(out.len(), 1);
    let err = out[0].as_ref().unwrap_err();
    assert_eq!((err.kind(), err.stage()), (ErrorKind::Config, "batches"));
    assert!(!err.has_item());
    let cause = err.cause().unwrap().downcast_ref::<ConfigError>().unwrap();
    assert_eq!(cause.field(), "max_size");
    assert!(
        pipeline.stage_metrics("batches").is_none(),
        "nothing started"
    );
    match pipeline.join().await {
        Err(PipelineError::Config(e)) => {
            assert_eq!(e.stage(), Some("batches"));
            assert!(e.to_string().starts_with("Batcher `batches`:"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn the_stage_before_counts_what_it_could_not_deliver() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .iter(0..10_000u32)
        .pipe(Buffer::new(16).named("relay"))
        .pipe(Take::new(0))
        .collect()
        .await;
    assert_eq!(out.len(), 1);
    tokio::time::timeout(Duration::from_secs(5), pipeline.join())
        .await
        .expect("the relay ends")
        .unwrap_err();
    let relay = support::stage(&pipeline, "relay");
    support::assert_conserved(&relay);
    assert!(relay.received < 10_000, "the relay stopped: {relay:?}");
    // Whatever it emitted was either refused by the closed channel
    // (undelivered) or sat in the channel when its reader was dropped.
    assert_eq!(
        relay.undelivered + pipeline.discarded(),
        relay.emitted,
        "{relay:?}, discarded {}",
        pipeline.discarded()
    );
}

#[tokio::test]
async fn an_invalid_pipeline_edge_refuses_every_stage() {
    let pipeline = Pipeline::builder()
        .with_name("orders")
        .with_edge(EdgeConfig::new(64, 0))
        .build();
    assert_eq!(pipeline.edge().max_chunk(), 1, "shown raised to 1");
    let e = pipeline.iter(0..3u32).try_pipe(Take::new(1)).unwrap_err();
    check(e, "Pipeline", "orders", "edge.max_chunk");
}

#[tokio::test]
async fn fan_outs_refuse_with_their_shape_kept() {
    let pipeline = Pipeline::new();
    let outs = pipeline
        .iter(0..9u32)
        .partition(Partition::round_robin(3).with_edge(EdgeConfig::new(0, 4)));
    assert_eq!(outs.len(), 3, "the caller's shape holds");
    for flow in outs {
        let items = flow.collect().await;
        assert_eq!(items.len(), 1, "each output holds the error");
        assert_eq!(items[0].as_ref().unwrap_err().kind(), ErrorKind::Config);
    }
    assert!(pipeline.join().await.is_err());

    let e = streamz::iter(0..9u32)
        .try_partition(Partition::round_robin(0))
        .unwrap_err();
    check(e, "Partition", "partition", "n");

    let e = streamz::iter(0..9u32)
        .try_switch(Switch::new(|x: &u32| x % 2).route(0).route(0))
        .unwrap_err();
    assert_eq!((e.operator(), e.field()), (Some("Switch"), "routes"));
    let mut routes = streamz::iter(0..9u32).switch(Switch::new(|x: &u32| x % 2).route(1).route(1));
    let first: Vec<_> = routes.take(&1).unwrap().collect().await;
    assert_eq!(first[0].as_ref().unwrap_err().kind(), ErrorKind::Config);
}

#[tokio::test]
async fn valid_settings_at_their_limits_are_accepted() {
    let ms = Duration::from_millis;
    let ok = |f: Result<Flow<Vec<u32>>, ConfigError>| assert!(f.is_ok());
    ok(streamz::iter(0..3u32).try_pipe(Batcher::new(usize::MAX, Duration::MAX)));
    assert!(
        streamz::iter(0..3u32)
            .try_pipe(Throttle::new(u64::MAX, ms(1)).with_burst(u64::MAX))
            .is_ok()
    );
    assert!(streamz::iter(0..3u32).try_pipe(Take::new(u64::MAX)).is_ok());
    assert!(
        streamz::iter(0..3u32)
            .try_pipe(Tumbling::new(Duration::MAX))
            .is_ok()
    );
    assert!(
        streamz::iter(0..3u32)
            .try_step("p", Sample::new(1.0))
            .is_ok()
    );
}

/// Settings that once panicked or aborted the process (a preallocated
/// channel, a semaphore's permit limit, a vector of outputs) are refused
/// by name, and the refused fan-outs allocate nothing for them.
#[tokio::test]
async fn huge_sizes_are_refused_not_allocated() {
    use streamz::DeadLetterQueue;
    for capacity in [usize::MAX, 1 << 40] {
        let (sink, _letters) = streamz::dlq::channel::<u64>(capacity);
        let e = support::refused::<u64, u64, _>(DeadLetterQueue::new(sink));
        check(e, "DeadLetterQueue", "dead_letter_queue", "sink.capacity");
    }
    let (sink, _letters) = streamz::dlq::channel::<u32>(16);
    let e = refused(DeadLetterQueue::new(sink).with_buffer(usize::MAX));
    check(e, "DeadLetterQueue", "dead_letter_queue", "buffer");

    let e = streamz::iter(0..3u32)
        .try_partition(Partition::round_robin(usize::MAX))
        .unwrap_err();
    check(e, "Partition", "partition", "n");
    let outs = streamz::iter(0..3u32).partition(Partition::round_robin(usize::MAX));
    assert_eq!(outs.len(), 1, "one output holds the error");
    let outs = streamz::iter(0..3u32).broadcast_to(usize::MAX);
    assert_eq!(outs.len(), 1);

    let e = refused(Sliding::new(
        Duration::from_millis(20),
        Duration::from_nanos(1),
    ));
    check(e, "Sliding", "sliding_window", "slide");
    // A day's window sliding every second is fine.
    let day = Sliding::new(Duration::from_secs(86_400), Duration::from_secs(1));
    assert!(streamz::iter(0..3u32).try_pipe(day).is_ok());
}

#[tokio::test]
async fn the_config_item_reads_as_one_sentence() {
    let out = streamz::iter(0..3u32)
        .pipe(Take::new(0).named("first"))
        .collect()
        .await;
    let err = out[0].as_ref().unwrap_err();
    assert_eq!(
        err.to_string(),
        "Take `first` not started: `n` must be greater than zero"
    );
}
