//! map, try_map, filter, tap, custom steps: values, errors, panics, counters.

mod support;

use streamz::{
    Emit, ErrorKind, Filter, Item, Map, PanicError, Pipeline, Stage, Step, StreamError, Tap, TryMap,
};
use support::{assert_conserved, split, stage, values};

#[tokio::test]
async fn fused_and_staged_maps_agree() {
    let fused = streamz::iter(0..1000u64)
        .map(|x| x * 3)
        .filter(|x| x % 2 == 0)
        .tap(|_| {})
        .collect()
        .await;
    let staged = streamz::iter(0..1000u64)
        .pipe(Stage::new("map", Map::new(|x: &u64| x * 3)))
        .pipe(Stage::new("filter", Filter::new(|x: &u64| x % 2 == 0)))
        .pipe(Stage::new("tap", Tap::new(|_: &u64| {})))
        .collect()
        .await;
    let expected: Vec<u64> = (0..1000).map(|x| x * 3).filter(|x| x % 2 == 0).collect();
    assert_eq!(values(fused), expected);
    assert_eq!(values(staged), expected);
}

#[tokio::test]
async fn a_panicking_closure_yields_an_error_with_the_item_in_place() {
    for staged in [false, true] {
        let pipeline = Pipeline::new();
        let f = |x: &u32| {
            assert!(x % 10 != 3, "bad item {x}");
            x + 100
        };
        let src = pipeline.iter(0..25u32);
        let flow = if staged {
            src.pipe(Stage::new("m", Map::new(f)))
        } else {
            src.step("m", Map::new(f))
        };
        let out = flow.collect().await;
        assert_eq!(out.len(), 25);
        for (i, item) in out.into_iter().enumerate() {
            let i = i as u32;
            match item {
                Ok(v) => assert_eq!(v, i + 100),
                Err(mut e) => {
                    assert_eq!(i % 10, 3, "only items 3, 13, 23 panic");
                    assert_eq!(e.kind(), ErrorKind::Panicked);
                    assert_eq!(e.stage(), "m");
                    let msg = e.cause().unwrap().downcast_ref::<PanicError>().unwrap();
                    assert_eq!(msg.message(), format!("bad item {i}"));
                    assert_eq!(e.take_item::<u32>(), Some(i));
                }
            }
        }
        let m = stage(&pipeline, "m");
        assert_eq!((m.received, m.emitted, m.failed), (25, 22, 3));
        assert_conserved(&m);
    }
}

#[tokio::test]
async fn panics_at_the_edges_of_a_chunk_and_in_filters_and_taps() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .iter(0..256u32) // one full chunk: first and last item panic
        .filter(|x| {
            assert!(*x != 0 && *x != 255);
            x % 2 == 0
        })
        .tap(|x| assert!(*x != 100))
        .collect()
        .await;
    let (oks, mut errs) = split(out);
    let expected: Vec<u32> = (2..255).filter(|x| x % 2 == 0 && *x != 100).collect();
    assert_eq!(oks, expected);
    let items: Vec<u32> = errs
        .iter_mut()
        .map(|e| e.take_item::<u32>().unwrap())
        .collect();
    assert_eq!(items, [0, 100, 255]);
    let filter = stage(&pipeline, "filter");
    assert_eq!(
        (filter.failed, filter.dropped, filter.emitted),
        (2, 127, 127)
    );
    assert_conserved(&filter);
    let tap = stage(&pipeline, "tap");
    assert_eq!((tap.received, tap.failed, tap.errors_passed), (129, 1, 2));
    assert_conserved(&tap);
}

#[tokio::test]
async fn try_map_failures_carry_item_and_source() {
    #[derive(Debug, thiserror::Error)]
    #[error("not a number: {0}")]
    struct NotNumber(String);

    let pipeline = Pipeline::new();
    let out = pipeline
        .iter(["1", "x", "3"].map(String::from))
        .pipe(Stage::new(
            "parse",
            TryMap::new(|s: &String| s.parse::<u32>().map_err(|_| NotNumber(s.clone()))),
        ))
        .collect()
        .await;
    let (oks, mut errs) = split(out);
    assert_eq!(oks, [1, 3]);
    let e = &mut errs[0];
    assert_eq!(e.kind(), ErrorKind::Failed);
    assert_eq!(e.to_string(), "stage `parse` failed: not a number: x");
    assert!(e.cause().unwrap().downcast_ref::<NotNumber>().is_some());
    assert_eq!(e.take_item::<String>().as_deref(), Some("x"));
    assert_conserved(&stage(&pipeline, "parse"));
}

#[tokio::test]
async fn errors_pass_later_stages_unchanged_and_keep_their_position() {
    let items = vec![
        Ok(1),
        Err(StreamError::failed("upstream", "first").with_item(String::from("raw-a"))),
        Ok(2),
        Ok(3),
        Err(StreamError::failed("upstream", "second").with_attempts(3)),
    ];
    let pipeline = Pipeline::new();
    let out = pipeline
        .try_stream(futures::stream::iter(items))
        .map(|x: &i32| x * 10)
        .filter(|x| *x != 20)
        .pipe(Stage::new("after", Map::new(|x: &i32| x + 1)))
        .collect()
        .await;
    let rendered: Vec<String> = out
        .into_iter()
        .map(|r| match r {
            Ok(v) => v.to_string(),
            Err(mut e) => {
                assert_eq!(e.stage(), "upstream", "not re-stamped");
                let item = e.take_item::<String>().unwrap_or_default();
                format!("{}/{}/{}", e.cause().unwrap(), e.attempts(), item)
            }
        })
        .collect();
    assert_eq!(rendered, ["11", "first/1/raw-a", "31", "second/3/"]);
    let after = stage(&pipeline, "after");
    assert_eq!(after.errors_passed, 2);
    assert_conserved(&after);
    assert_conserved(&stage(&pipeline, "filter"));
}

/// A custom step in about ten lines: splits sentences into words and
/// rejects empty input.
struct Words;

impl Step<String, String> for Words {
    fn on_item(&mut self, line: Item<'_, String>, out: &mut Emit<'_, String>) {
        if line.trim().is_empty() {
            return out.fail(line, "empty line");
        }
        for word in line.split_whitespace() {
            out.emit(word.to_owned());
        }
    }
}

#[tokio::test]
async fn a_custom_step_runs_fused_and_as_a_stage() {
    let lines = || ["a b", " ", "c"].map(String::from);
    for staged in [false, true] {
        let pipeline = Pipeline::new();
        let src = pipeline.iter(lines());
        let flow = if staged {
            src.pipe(Stage::new("words", Words))
        } else {
            src.step("words", Words)
        };
        let (oks, mut errs) = split(flow.collect().await);
        assert_eq!(oks, ["a", "b", "c"]);
        assert_eq!(errs[0].stage(), "words");
        assert_eq!(errs[0].take_item::<String>().as_deref(), Some(" "));
        let m = stage(&pipeline, "words");
        assert_eq!((m.received, m.emitted, m.failed), (3, 3, 1));
    }
}

/// A step that keeps state and flushes it at the end, and drops silently
/// only what it counts.
struct PairUp(Option<u32>);

impl Step<u32, (u32, u32)> for PairUp {
    fn on_item(&mut self, item: Item<'_, u32>, out: &mut Emit<'_, (u32, u32)>) {
        match self.0.take() {
            Some(first) => out.emit((first, item.take())),
            None => self.0 = Some(item.take()),
        }
    }

    fn on_end(&mut self, out: &mut Emit<'_, (u32, u32)>) {
        if let Some(last) = self.0.take() {
            out.emit((last, last));
        }
    }
}

#[tokio::test]
async fn on_end_flushes_state() {
    let out = streamz::iter(1..=5u32)
        .step("pairs", PairUp(None))
        .collect()
        .await;
    assert_eq!(values(out), [(1, 2), (3, 4), (5, 5)]);
}

/// A step that panics after taking the item: the error has no item, and
/// the partial output of that item is withdrawn.
struct TakesThenPanics;

impl Step<u32, u32> for TakesThenPanics {
    fn on_item(&mut self, item: Item<'_, u32>, out: &mut Emit<'_, u32>) {
        let v = item.take();
        out.emit(v);
        assert!(v != 2, "boom");
        out.emit(v);
    }
}

#[tokio::test]
async fn a_panic_after_take_withdraws_partial_output() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .iter(1..=3u32)
        .step("s", TakesThenPanics)
        .collect()
        .await;
    let rendered: Vec<String> = out
        .into_iter()
        .map(|r| match r {
            Ok(v) => v.to_string(),
            Err(e) => format!("{}:{}", e.kind(), e.has_item()),
        })
        .collect();
    assert_eq!(rendered, ["1", "1", "panicked:false", "3", "3"]);
    let m = stage(&pipeline, "s");
    assert_eq!((m.received, m.emitted, m.failed), (3, 4, 1));
}

/// A step whose `on_error` reports a new error and then panics.
struct BadOnError;

impl Step<u32, u32> for BadOnError {
    fn on_item(&mut self, item: Item<'_, u32>, out: &mut Emit<'_, u32>) {
        out.emit(item.take());
    }

    fn on_error(&mut self, _error: Item<'_, StreamError>, out: &mut Emit<'_, u32>) {
        out.error(StreamError::failed("bad", "extra"));
        panic!("on_error broke");
    }
}

#[tokio::test]
async fn an_upstream_error_survives_a_panicking_on_error() {
    let items = vec![
        Ok(1),
        Err(StreamError::failed("src", "e").with_item(7u8)),
        Ok(2),
    ];
    let pipeline = Pipeline::new();
    let out = pipeline
        .try_stream(futures::stream::iter(items))
        .step("bad", BadOnError)
        .collect()
        .await;
    let (oks, mut errs) = split(out);
    assert_eq!(oks, [1, 2]);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].stage(), "src", "passed on unchanged");
    assert_eq!(errs[0].take_item::<u8>(), Some(7));
    let m = stage(&pipeline, "bad");
    assert_eq!(
        (m.received, m.emitted, m.failed, m.errors_passed),
        (3, 2, 0, 1)
    );
    assert_conserved(&m);
}

/// A step that reports a failure carrying the item, then panics.
struct FailThenPanic;

impl Step<u32, u32> for FailThenPanic {
    fn on_item(&mut self, item: Item<'_, u32>, out: &mut Emit<'_, u32>) {
        out.fail(item, "first");
        panic!("then broke");
    }
}

#[tokio::test]
async fn a_panic_after_fail_keeps_the_item() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .iter([5u32])
        .step("s", FailThenPanic)
        .collect()
        .await;
    let (_, mut errs) = split(out);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].kind(), ErrorKind::Panicked);
    assert_eq!(errs[0].take_item::<u32>(), Some(5));
    let m = stage(&pipeline, "s");
    assert_eq!((m.received, m.failed), (1, 1));
    assert_conserved(&m);
}

#[tokio::test]
async fn a_map_to_another_type_also_hands_back_panicked_items() {
    // u32 -> String takes the allocating path; u32 -> u32 maps in place.
    let pipeline = Pipeline::new();
    let out = pipeline
        .iter(0..300u32)
        .map(|x: &u32| {
            assert!(x % 100 != 7, "bad {x}");
            x.to_string()
        })
        .collect()
        .await;
    assert_eq!(out.len(), 300);
    for (i, item) in out.into_iter().enumerate() {
        match item {
            Ok(s) => assert_eq!(s, i.to_string()),
            Err(mut e) => {
                assert_eq!(i % 100, 7);
                assert_eq!(e.take_item::<u32>(), Some(i as u32));
            }
        }
    }
    let m = stage(&pipeline, "map");
    assert_eq!((m.emitted, m.failed), (297, 3));
    assert_conserved(&m);
}

/// A step that holds every value and hands them out at the end; with
/// `panic_after`, `on_end` panics after emitting that many.
struct Hoard {
    held: Vec<u32>,
    panic_after: Option<usize>,
    ended: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Hoard {
    fn new(panic_after: Option<usize>) -> Self {
        Hoard {
            held: Vec::new(),
            panic_after,
            ended: Default::default(),
        }
    }
}

impl Step<u32, u32> for Hoard {
    fn on_item(&mut self, item: Item<'_, u32>, _out: &mut Emit<'_, u32>) {
        self.held.push(item.take());
    }

    fn on_end(&mut self, out: &mut Emit<'_, u32>) {
        self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut emitted = 0;
        while let Some(v) = self.held.pop() {
            assert!(Some(emitted) != self.panic_after, "on_end failed");
            out.emit(v);
            emitted += 1;
        }
    }

    fn held(&self) -> u64 {
        self.held.len() as u64
    }
}

#[tokio::test]
async fn a_panic_in_on_end_keeps_what_it_emitted_and_counts_what_it_held() {
    let pipeline = Pipeline::new();
    let out = pipeline
        .iter(1..=5u32)
        .step("hoard", Hoard::new(Some(2)))
        .collect()
        .await;
    let (oks, errs) = split(out);
    assert_eq!(oks, [5, 4], "what on_end emitted before the panic goes on");
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].kind(), ErrorKind::Panicked);
    let m = stage(&pipeline, "hoard");
    assert_eq!((m.received, m.emitted, m.failed, m.aborted), (5, 2, 0, 3));
    // The panic came after the third value left `held`: it is counted too.
    assert_conserved(&m);
}

#[tokio::test]
async fn a_stage_that_stops_early_counts_what_its_step_holds() {
    let pipeline = Pipeline::new();
    let (pusher, flow) = pipeline.channel::<u32>();
    let out = flow.pipe(Stage::new("hoard", Hoard::new(None)));
    for i in 0..10 {
        pusher.send(i).await.unwrap();
    }
    // Wait until the stage has taken all ten, then drop its output.
    while stage(&pipeline, "hoard").received < 10 {
        tokio::task::yield_now().await;
    }
    drop(out);
    tokio::time::timeout(std::time::Duration::from_secs(10), pipeline.join())
        .await
        .expect("the stage stops when its output is dropped")
        .unwrap();
    let m = stage(&pipeline, "hoard");
    assert_eq!((m.received, m.emitted, m.aborted), (10, 0, 10));
    assert_conserved(&m);
}

#[tokio::test]
async fn on_end_is_not_called_on_abort() {
    let pipeline = Pipeline::new();
    let (pusher, flow) = pipeline.channel::<u32>();
    let hoard = Hoard::new(None);
    let ended = hoard.ended.clone();
    let out = tokio::spawn(
        flow.step("hoard", hoard)
            .async_boundary("boundary")
            .collect(),
    );
    for i in 0..4 {
        pusher.send(i).await.unwrap();
    }
    while stage(&pipeline, "hoard").received < 4 {
        tokio::task::yield_now().await;
    }
    pipeline.abort();
    let out = tokio::time::timeout(std::time::Duration::from_secs(10), out)
        .await
        .expect("an abort ends the flow")
        .unwrap();
    assert!(out.is_empty());
    assert!(
        !ended.load(std::sync::atomic::Ordering::SeqCst),
        "on_end ran after an abort"
    );
    let m = stage(&pipeline, "hoard");
    assert_eq!((m.received, m.aborted), (4, 4));
    assert_conserved(&m);
}
