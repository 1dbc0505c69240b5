//! The Go catalogue's small operators: Skip, Take, Sample, Unbatch,
//! Dedupe, Buffer. Each: what it keeps, that errors are never lost, that
//! every drop is counted, and that bad configuration is refused by name.

mod support;

use std::time::Duration;

use streamz::{
    Batcher, Buffer, Debounce, Dedupe, ErrorKind, Flow, Partition, Pipeline, Sample, Skip, Stage,
    StreamError, Switch, Take, Unbatch,
};
use support::{assert_conserved, split, stage, values};

/// `0..n` with an error in place of every multiple of `every`.
fn with_errors(n: u32, every: u32) -> Vec<streamz::Result<u32>> {
    (0..n)
        .map(|i| {
            if i % every == every - 1 {
                Err(StreamError::new(ErrorKind::Failed, "upstream"))
            } else {
                Ok(i)
            }
        })
        .collect()
}

#[tokio::test]
async fn skip_drops_the_first_values_and_passes_every_error_in_place() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .try_stream(futures::stream::iter(with_errors(10, 3)))
        .pipe(Stage::new("skip", Skip::new(4)))
        .collect()
        .await;
    // 0 1 E 3 4 E 6 7 E 9: values 0 1 3 4 skipped, errors kept in order.
    let shape: Vec<Option<u32>> = out.iter().map(|r| r.as_ref().ok().copied()).collect();
    assert_eq!(shape, [None, None, Some(6), Some(7), None, Some(9)]);
    let m = stage(&pipeline, "skip");
    assert_eq!(
        (m.received, m.emitted, m.dropped, m.errors_passed),
        (10, 3, 4, 3)
    );
    assert_conserved(&m);
    let zero = streamz::iter(0..1u32).try_step("skip", Skip::new(0));
    assert_eq!(zero.unwrap_err().field(), "n");
}

#[tokio::test]
async fn take_ends_an_endless_stream_and_stops_its_input_counting_the_rest() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .stream(futures::stream::iter(0u64..))
        .map(|x: &u64| x * 2)
        .pipe(Take::new(1000))
        .collect()
        .await;
    assert_eq!(values(out), (0..1000).map(|x| x * 2).collect::<Vec<_>>());
    pipeline.join().await.unwrap();
    let m = stage(&pipeline, "take");
    assert_eq!(m.emitted, 1000);
    assert_conserved(&m);
    assert_eq!(m.received, m.emitted + m.dropped + m.aborted);
    // The endless source stopped (join returned), and everything the map
    // before the take produced is accounted for: received by the take, or
    // counted as undelivered where it was stuck.
    let before: u64 = pipeline
        .metrics()
        .iter()
        .filter(|m| m.name != "take")
        .map(|m| m.undelivered)
        .sum();
    assert_eq!(
        stage(&pipeline, "map").emitted,
        m.received + before,
        "{:?}",
        pipeline.metrics()
    );
    assert_eq!(support::refused::<u32, u32, _>(Take::new(0)).field(), "n");
}

#[tokio::test]
async fn take_passes_the_errors_before_its_last_value_and_a_short_input_just_ends() {
    let out = streamz::Pipeline::new()
        .try_stream(futures::stream::iter(with_errors(10, 3)))
        .pipe(Take::new(3))
        .collect()
        .await;
    let shape: Vec<Option<u32>> = out.iter().map(|r| r.as_ref().ok().copied()).collect();
    assert_eq!(shape, [Some(0), Some(1), None, Some(3)]);

    let pipeline = Pipeline::new();
    let out = pipeline.iter(0..5).pipe(Take::new(10)).collect().await;
    assert_eq!(values(out), [0, 1, 2, 3, 4]);
    let m = stage(&pipeline, "take");
    assert_eq!((m.received, m.emitted, m.dropped, m.aborted), (5, 5, 0, 0));
}

#[tokio::test]
async fn sample_is_repeatable_with_a_seed_counts_its_drops_and_passes_errors() {
    let run = |p: f64, seed: u64| async move {
        let pipeline = Pipeline::new();
        let out = pipeline
            .try_stream(futures::stream::iter(with_errors(10_000, 100)))
            .pipe(Stage::new("sample", Sample::new(p).with_seed(seed)))
            .collect()
            .await;
        (split(out), stage(&pipeline, "sample"))
    };
    let ((kept, errors), m) = run(0.25, 1).await;
    assert_eq!(errors.len(), 100, "every error passes");
    assert!((2200..2750).contains(&kept.len()), "{}", kept.len());
    assert_eq!(m.dropped, 9_900 - kept.len() as u64);
    assert_conserved(&m);
    let ((again, _), _) = run(0.25, 1).await;
    assert_eq!(kept, again, "the same seed keeps the same values");
    let ((other, _), _) = run(0.25, 2).await;
    assert_ne!(kept, other);

    let ((none, errors), _) = run(0.0, 3).await;
    assert!(none.is_empty());
    assert_eq!(errors.len(), 100);
    let ((all, _), _) = run(1.0, 3).await;
    assert_eq!(all.len(), 9_900);

    for p in [-0.1, 1.1, f64::NAN, f64::INFINITY] {
        let err = streamz::iter(0..1u32)
            .try_step("sample", Sample::new(p))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Sample `sample`: `p` must be a probability from 0 to 1"
        );
    }
}

#[tokio::test]
async fn unbatch_undoes_a_batcher_keeping_order_and_errors_in_place() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .try_stream(futures::stream::iter(with_errors(1000, 7)))
        .pipe(Batcher::new(10, Duration::from_secs(1)))
        .pipe(Stage::new("unbatch", Unbatch::new()))
        .collect()
        .await;
    let shape: Vec<Option<u32>> = out.iter().map(|r| r.as_ref().ok().copied()).collect();
    let (vals, errs) = split(out);
    let expected: Vec<u32> = (0..1000).filter(|i| i % 7 != 6).collect();
    assert_eq!(vals, expected);
    assert_eq!(errs.len(), 142);
    // Each error comes after the values that were before it upstream (the
    // batcher sends an error ahead of its partial batch; no value moves
    // past an error that came after it).
    let first_error = shape.iter().position(Option::is_none).unwrap();
    assert!(shape[..first_error].iter().all(|v| v.unwrap() < 6));
    let m = stage(&pipeline, "unbatch");
    assert_eq!(m.received, m.emitted + m.errors_passed);

    let out = streamz::iter([vec![], vec![1], vec![], vec![2, 3]])
        .step("unbatch", Unbatch::new())
        .collect()
        .await;
    assert_eq!(values(out), [1, 2, 3]);

    // Errors between batches of one chunk land between their values.
    let e = || Err(StreamError::new(ErrorKind::Failed, "upstream"));
    let input = vec![Ok(vec![1, 2]), e(), Ok(vec![]), e(), Ok(vec![3]), e()];
    let out = Pipeline::new()
        .try_stream(futures::stream::iter(input))
        .step("unbatch", Unbatch::new())
        .collect()
        .await;
    let shape: Vec<Option<u32>> = out.iter().map(|r| r.as_ref().ok().copied()).collect();
    assert_eq!(shape, [Some(1), Some(2), None, None, Some(3), None]);
}

#[tokio::test(start_paused = true)]
async fn dedupe_forgets_keys_after_their_ttl_and_beyond_its_capacity() {
    let dedupe = Dedupe::new(|s: &String| s.clone(), 3, Duration::from_secs(10));
    let pipeline = Pipeline::new();
    let (pusher, flow) = pipeline.channel::<String>();
    let collected = tokio::spawn(flow.step("dedupe", dedupe).collect());
    let send = |s: &str| {
        let pusher = &pusher;
        let s = s.to_owned();
        async move { pusher.send(s).await.unwrap() }
    };
    send("a").await;
    send("a").await; // a duplicate within the ttl
    tokio::time::advance(Duration::from_secs(5)).await;
    send("b").await;
    send("c").await;
    send("d").await; // capacity 3: "a" is pushed out
    send("a").await; // forgotten, so it passes
    send("d").await; // a duplicate
    tokio::time::advance(Duration::from_secs(11)).await;
    send("b").await; // its ttl passed
    drop(pusher);
    let out = values(collected.await.unwrap());
    assert_eq!(out, ["a", "b", "c", "d", "a", "b"]);
    let m = stage(&pipeline, "dedupe");
    assert_eq!((m.received, m.emitted, m.dropped), (8, 6, 2));
    assert_conserved(&m);
}

#[tokio::test]
async fn dedupe_turns_a_panicking_key_into_an_error_item_and_refuses_zeros() {
    let pipeline = Pipeline::new();
    let dedupe = Dedupe::new(
        |x: &u32| {
            assert!(*x != 3, "no key for 3");
            *x % 5
        },
        100,
        Duration::from_secs(60),
    );
    let out = pipeline
        .iter(0..10u32)
        .pipe(Stage::new("dedupe", dedupe))
        .collect()
        .await;
    let (vals, mut errs) = split(out);
    // Keys 0 1 2 (3 panics: no key remembered) 4, then 0 1 2 again
    // dropped, 8 has key 3, which was never remembered, 9 has key 4.
    assert_eq!(vals, [0, 1, 2, 4, 8]);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].kind(), ErrorKind::Panicked);
    assert_eq!(errs[0].take_item::<u32>(), Some(3));
    let m = stage(&pipeline, "dedupe");
    assert_eq!(m.dropped, 4);
    assert_conserved(&m);

    let key = |x: &u32| *x;
    let refused = |d| {
        streamz::iter(0..1u32)
            .try_step("dedupe", d)
            .unwrap_err()
            .field()
    };
    assert_eq!(
        refused(Dedupe::new(key, 0, Duration::from_secs(1))),
        "capacity"
    );
    assert_eq!(refused(Dedupe::new(key, 1, Duration::ZERO)), "ttl");
}

#[tokio::test(start_paused = true)]
async fn a_buffer_takes_a_burst_the_pipeline_edges_alone_would_not() {
    // Nobody reads: the producer fills what the edges hold, no more.
    let room = |buffer: Option<usize>| async move {
        let pipeline = Pipeline::new();
        let (pusher, flow) = pipeline.channel::<u32>();
        let flow = match buffer {
            Some(n) => flow.pipe(Buffer::new(n)),
            None => flow.async_boundary("relay"),
        };
        let mut accepted = 0;
        loop {
            let before = accepted;
            while pusher.try_send(accepted).is_ok() {
                accepted += 1;
            }
            // Let the stage tasks move what they can.
            support::settle().await;
            if accepted == before {
                break;
            }
        }
        drop(flow);
        accepted
    };
    let plain = room(None).await;
    let buffered = room(Some(20_000)).await;
    // The buffer's edge replaces the relay's (1,024): the rest of its
    // 20,000 is extra room, less at most one chunk of rounding.
    assert!(
        buffered - plain >= 20_000 - 1024 - 256,
        "{plain} vs {buffered}"
    );
    assert!(buffered - plain <= 20_000, "{plain} vs {buffered}");
    let refused = |b| support::refused::<u32, u32, _>(b);
    assert_eq!(refused(Buffer::new(0)).field(), "capacity");
    assert_eq!(
        refused(Buffer::new(usize::MAX)).to_string(),
        "Buffer `buffer`: `capacity` must be at most usize::MAX / 8"
    );
}

#[tokio::test(start_paused = true)]
async fn debounce_emits_the_last_of_a_burst_after_the_quiet_period_and_passes_errors_at_once() {
    let pipeline = Pipeline::new();
    let (pusher, flow) = pipeline.channel::<u32>();
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let quiet = Duration::from_millis(100);
    let out = flow.pipe(Debounce::new(quiet));
    tokio::spawn(out.for_each(move |r| {
        let _ = tx.send((tokio::time::Instant::now(), r.ok()));
    }));
    let start = tokio::time::Instant::now();
    for v in 1..=3 {
        pusher.send(v).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // 3 arrived at 80 ms: it leaves at 180 ms. An error meanwhile passes
    // at once and does not restart the wait.
    pusher
        .send_result(Err(StreamError::new(ErrorKind::Failed, "upstream")))
        .await
        .unwrap();
    let (at, error) = seen.recv().await.unwrap();
    assert_eq!((at - start, error), (Duration::from_millis(120), None));
    let (at, value) = seen.recv().await.unwrap();
    assert_eq!((at - start, value), (Duration::from_millis(180), Some(3)));
    // A value alone also waits for the quiet period.
    pusher.send(4).await.unwrap();
    let (at, value) = seen.recv().await.unwrap();
    assert_eq!((at - start, value), (Duration::from_millis(280), Some(4)));
    // The end of the input flushes the waiting value at once.
    pusher.send(5).await.unwrap();
    pusher.send(6).await.unwrap();
    drop(pusher);
    let (at, value) = seen.recv().await.unwrap();
    assert_eq!((at - start, value), (Duration::from_millis(280), Some(6)));
    assert!(seen.recv().await.is_none());
    let m = stage(&pipeline, "debounce");
    assert_eq!(
        (m.received, m.emitted, m.dropped, m.errors_passed),
        (7, 3, 3, 1)
    );
    assert_conserved(&m);
    let zero = support::refused::<u32, u32, _>(Debounce::new(Duration::ZERO));
    assert_eq!(zero.field(), "quiet");
}

#[tokio::test(start_paused = true)]
async fn debounce_flushes_on_graceful_shutdown_and_counts_its_value_on_abort() {
    for abort in [false, true] {
        let pipeline = Pipeline::new();
        let (pusher, flow) = pipeline.channel::<u32>();
        let out = tokio::spawn(flow.pipe(Debounce::new(Duration::from_secs(60))).collect());
        pusher.send(1).await.unwrap();
        pusher.send(2).await.unwrap();
        // On a paused clock this returns once every task is idle: the
        // debounce holds 2 and waits for its 60 s.
        tokio::time::sleep(Duration::from_secs(1)).await;
        if abort {
            pipeline.abort();
        } else {
            pipeline.shutdown();
        }
        let out = out.await.unwrap();
        let m = stage(&pipeline, "debounce");
        if abort {
            assert!(out.is_empty());
            assert_eq!((m.dropped, m.aborted), (1, 1));
        } else {
            assert_eq!(values(out), [2]);
            assert_eq!((m.dropped, m.emitted), (1, 1));
        }
        assert_conserved(&m);
        assert_eq!(tokio::time::Instant::now().elapsed(), Duration::ZERO);
        drop(pusher);
    }
}

/// Golden values: `by_key` promises the same output for a key in every run
/// and with every compiler, so a change of hash algorithm must fail here.
#[tokio::test]
async fn partition_by_key_sends_known_keys_to_known_outputs() {
    async fn outputs_of<K>(keys: Vec<K>) -> Vec<(K, usize)>
    where
        K: std::hash::Hash + Clone + Send + 'static,
    {
        let flows = streamz::iter(keys).partition(Partition::by_key(7, K::clone));
        let outs = futures::future::join_all(flows.into_iter().map(Flow::collect)).await;
        let mut got = Vec::new();
        for (i, out) in outs.into_iter().enumerate() {
            got.extend(values(out).into_iter().map(|k| (k, i)));
        }
        got
    }

    let mut ints = outputs_of((0..10u32).collect()).await;
    ints.sort_unstable();
    assert_eq!(
        ints,
        [
            (0, 3),
            (1, 5),
            (2, 5),
            (3, 1),
            (4, 1),
            (5, 0),
            (6, 4),
            (7, 0),
            (8, 5),
            (9, 4)
        ]
    );
    let mut names = outputs_of(vec!["alice", "bob", "carol", "dave", "erin"]).await;
    names.sort_unstable();
    assert_eq!(
        names,
        [
            ("alice", 4),
            ("bob", 4),
            ("carol", 6),
            ("dave", 3),
            ("erin", 3)
        ]
    );
}

#[tokio::test]
async fn partition_by_key_keeps_each_key_on_one_output_in_order() {
    let pipeline = Pipeline::new();
    let flows = pipeline
        .iter((0..3000u32).map(|i| (i % 10, i)))
        .partition(Partition::by_key(3, |(k, _): &(u32, u32)| *k));
    let outs = futures::future::join_all(flows.into_iter().map(Flow::collect)).await;
    let mut owner = std::collections::HashMap::new();
    for (i, out) in outs.into_iter().enumerate() {
        let vals = values(out);
        assert!(!vals.is_empty(), "output {i} is empty");
        for (k, _) in &vals {
            assert_eq!(*owner.entry(*k).or_insert(i), i, "key {k} on two outputs");
        }
        for k in 0..10 {
            let of_k: Vec<u32> = vals
                .iter()
                .filter(|(kk, _)| *kk == k)
                .map(|(_, v)| *v)
                .collect();
            assert!(of_k.windows(2).all(|w| w[0] < w[1]), "key {k} out of order");
        }
    }
    assert_eq!(owner.len(), 10);
    let m = stage(&pipeline, "partition");
    assert_eq!((m.received, m.emitted), (3000, 3000));
    assert_conserved(&m);
}

#[tokio::test]
async fn partition_errors_and_bad_choices_go_to_output_zero_as_error_items() {
    let pipeline = Pipeline::new();
    let choose = |x: &u32| match *x {
        5 => panic!("cannot place 5"),
        7 => 9,
        x => (x % 3) as usize,
    };
    let flows = pipeline
        .try_stream(futures::stream::iter(with_errors(10, 10)))
        .partition(Partition::custom(3, choose));
    let mut outs = futures::future::join_all(flows.into_iter().map(Flow::collect)).await;
    let (zero, mut errors) = split(outs.remove(0));
    assert_eq!(zero, [0, 3, 6]);
    assert_eq!(values(outs.remove(0)), [1, 4]);
    assert_eq!(values(outs.remove(0)), [2, 8]);
    // The upstream error (in place of 9), 7's out-of-range choice, 5's panic.
    assert_eq!(errors.len(), 3);
    let upstream = errors.iter().position(|e| e.stage() == "upstream").unwrap();
    errors.remove(upstream);
    let mut by_item: Vec<(u32, ErrorKind, String)> = errors
        .iter_mut()
        .map(|e| (e.take_item::<u32>().unwrap(), e.kind(), e.to_string()))
        .collect();
    by_item.sort_by_key(|(i, _, _)| *i);
    assert_eq!((by_item[0].0, by_item[0].1), (5, ErrorKind::Panicked));
    assert_eq!((by_item[1].0, by_item[1].1), (7, ErrorKind::Failed));
    assert!(
        by_item[1].2.contains("chose output 9 of 3"),
        "{}",
        by_item[1].2
    );
    let m = stage(&pipeline, "partition");
    assert_eq!(
        (m.received, m.emitted, m.failed, m.errors_passed),
        (10, 7, 2, 1)
    );
    assert_conserved(&m);

    let zero = streamz::iter(0..1u32).try_partition(Partition::round_robin(0));
    assert_eq!(zero.unwrap_err().field(), "n");
}

#[tokio::test]
async fn switch_routes_by_key_counts_the_unrouted_and_sends_errors_to_the_default() {
    // Without a default route, unrouted values are dropped and counted,
    // and errors go to the first route.
    let pipeline = Pipeline::new();
    let switch = Switch::new(|x: &u32| x % 4).route(0).route(1);
    let mut routes = pipeline
        .try_stream(futures::stream::iter(with_errors(12, 12)))
        .switch(switch);
    let (zero, one) = (routes.take(&0).unwrap(), routes.take(&1).unwrap());
    assert!(routes.take(&0).is_none() && routes.take_default().is_none());
    let (zero, one) = tokio::join!(zero.collect(), one.collect());
    let (zero, errors) = split(zero);
    assert_eq!(zero, [0, 4, 8]);
    assert_eq!(errors.len(), 1);
    assert_eq!(values(one), [1, 5, 9]);
    let m = stage(&pipeline, "switch");
    assert_eq!(
        (m.received, m.emitted, m.dropped, m.errors_passed),
        (12, 6, 5, 1)
    );
    assert_conserved(&m);

    // With a default route, the rest and the errors (also a panicking key
    // function's) go there.
    let pipeline = Pipeline::new();
    let key = |x: &u32| {
        assert!(*x != 6, "no key for 6");
        x % 4
    };
    let mut routes = pipeline
        .try_stream(futures::stream::iter(with_errors(12, 12)))
        .switch(Switch::new(key).route(0).otherwise());
    let (zero, rest) = (routes.take(&0).unwrap(), routes.take_default().unwrap());
    let (zero, rest) = tokio::join!(zero.collect(), rest.collect());
    assert_eq!(values(zero), [0, 4, 8]);
    let (rest, errors) = split(rest);
    assert_eq!(rest, [1, 2, 3, 5, 7, 9, 10]);
    let kinds: Vec<ErrorKind> = errors.iter().map(StreamError::kind).collect();
    assert_eq!(kinds, [ErrorKind::Panicked, ErrorKind::Failed]);
    assert_conserved(&stage(&pipeline, "switch"));

    // A route left in the Routes when it is dropped: its values are
    // counted as undelivered, and the other routes flow.
    let pipeline = Pipeline::new();
    let mut routes = pipeline
        .iter(0..10_000u32)
        .switch(Switch::new(|x: &u32| x % 2).route(0).route(1));
    let zero = routes.take(&0).unwrap();
    drop(routes);
    assert_eq!(values(zero.collect().await).len(), 5_000);
    pipeline.join().await.unwrap();
    assert_eq!(stage(&pipeline, "switch").undelivered, 5_000);

    let none = streamz::iter(0..1u32).try_switch(Switch::new(|x: &u32| *x));
    assert_eq!(none.unwrap_err().field(), "routes");
    let twice = streamz::iter(0..1u32).try_switch(Switch::new(|x: &u32| *x).route(1).route(1));
    assert_eq!(
        twice.unwrap_err().to_string(),
        "Switch `switch`: `routes` must name each key once (routes 0 and 1 name the same key)"
    );
}

#[tokio::test(start_paused = true)]
async fn debounce_with_an_enormous_quiet_period_still_flushes_at_the_end() {
    let (pusher, flow) = Pipeline::new().channel::<u32>();
    let out = tokio::spawn(flow.pipe(Debounce::new(Duration::MAX)).collect());
    pusher.send(1).await.unwrap();
    pusher.send(2).await.unwrap();
    drop(pusher);
    assert_eq!(values(out.await.unwrap()), [2]);
}
