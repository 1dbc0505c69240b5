//! Property: a dead-letter queue accounts for every item it receives,
//! whatever fails around it: user code that errors or panics upstream, a
//! sink that refuses records, panics or is slow, each overflow policy, a
//! slow consumer, and a consumer that stops early, a graceful shutdown or
//! an abort.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use proptest::prelude::*;
use streamz::dlq::{self, Overflow, Unwritten};
use streamz::{DeadLetter, DeadLetterQueue, EdgeConfig, ErrorKind, Pipeline, StageMetrics};

#[derive(Debug, Clone, Copy)]
enum End {
    /// Read everything.
    Complete,
    /// Drop the output after this many items.
    Drop(usize),
    /// Shut down gracefully after this many items, then read the rest.
    Shutdown(usize),
    /// Abort after this many items.
    Abort(usize),
}

#[derive(Debug, Clone)]
struct Case {
    input: Vec<u32>,
    /// User code fails on multiples of this.
    fail_mod: u32,
    /// User code panics on multiples of this.
    panic_mod: u32,
    /// The sink refuses items that are multiples of this.
    refuse_mod: u32,
    /// The sink panics on items that are multiples of this.
    sink_panic_mod: u32,
    /// The sink takes this long per record.
    sink_delay_ms: u64,
    /// The consumer takes this long per item.
    consumer_delay_ms: u64,
    overflow: Overflow,
    buffer: usize,
    capacity: usize,
    end: End,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(0u32..1000, 0..300),
        (2u32..8, 5u32..40, 3u32..30, 7u32..60),
        (0u64..3, 0u64..3),
        prop_oneof![
            Just(Overflow::Block),
            Just(Overflow::DropAndCount),
            Just(Overflow::Fail)
        ],
        (1usize..8, 1usize..64),
        prop_oneof![
            Just(End::Complete),
            (0usize..100).prop_map(End::Drop),
            (0usize..100).prop_map(End::Shutdown),
            (0usize..100).prop_map(End::Abort),
        ],
    )
        .prop_map(
            |(
                input,
                (fail_mod, panic_mod, refuse_mod, sink_panic_mod),
                delays,
                overflow,
                sizes,
                end,
            )| Case {
                input,
                fail_mod,
                panic_mod,
                refuse_mod,
                sink_panic_mod,
                sink_delay_ms: delays.0,
                consumer_delay_ms: delays.1,
                overflow,
                buffer: sizes.0,
                capacity: sizes.1,
                end,
            },
        )
}

/// What the run observed.
struct Outcome {
    dlq: StageMetrics,
    /// Items the sink accepted.
    accepted: Vec<u32>,
    values: Vec<u32>,
    errors: Vec<streamz::StreamError>,
}

async fn run(case: Case) -> Outcome {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(case.capacity, case.capacity.min(16)));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let sink = dlq::sink_fn({
        let accepted = accepted.clone();
        let c = case.clone();
        move |r: DeadLetter<u32>| {
            let accepted = accepted.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(c.sink_delay_ms)).await;
                let item = r.item.expect("user errors carry their item");
                if item % c.sink_panic_mod == 0 {
                    panic!("sink panics on {item}");
                }
                if item % c.refuse_mod == 0 {
                    return Err(Unwritten::new(r, "refused"));
                }
                accepted.lock().unwrap().push(item);
                Ok(())
            }
        }
    });
    let dlq = DeadLetterQueue::new(sink)
        .with_buffer(case.buffer)
        .with_overflow(case.overflow);
    let (fail_mod, panic_mod) = (case.fail_mod, case.panic_mod);
    let mut flow = pipeline
        .iter(case.input.clone())
        .try_map(move |x: &u32| {
            if x % panic_mod == 0 {
                panic!("user code panics on {x}");
            }
            if x % fail_mod == 0 {
                Err("user code fails")
            } else {
                Ok(*x)
            }
        })
        .pipe(dlq);
    let mut values = Vec::new();
    let mut errors = Vec::new();
    let mut read = 0;
    while let Some(item) = flow.next().await {
        match item {
            Ok(v) => values.push(v),
            Err(e) => errors.push(e),
        }
        read += 1;
        tokio::time::sleep(Duration::from_millis(case.consumer_delay_ms)).await;
        match case.end {
            End::Drop(n) if read == n => break,
            End::Shutdown(n) if read == n => pipeline.shutdown(),
            End::Abort(n) if read == n => pipeline.abort(),
            _ => {}
        }
    }
    drop(flow);
    pipeline.join().await.unwrap();
    let dlq = pipeline.stage_metrics("dead_letter_queue").unwrap();
    let accepted = accepted.lock().unwrap().clone();
    Outcome {
        dlq,
        accepted,
        values,
        errors,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_item_is_accounted_for(case in case()) {
        std::panic::set_hook(Box::new(|_| {})); // injected panics are expected
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let out = rt.block_on(run(case.clone()));
        let m = &out.dlq;
        // The law, under every policy and every way of ending.
        prop_assert_eq!(
            m.received,
            m.emitted + m.dead_lettered + m.failed + m.dropped + m.aborted,
            "{:?}", m
        );
        // The sink's count is the counter. An abort drops the batch the
        // sink is writing unconfirmed, counted aborted, though some of it
        // may have reached the sink.
        let accepted = out.accepted.len() as u64;
        if matches!(case.end, End::Abort(_)) {
            prop_assert!(accepted >= m.dead_lettered && accepted <= m.dead_lettered + m.aborted);
        } else {
            prop_assert_eq!(accepted, m.dead_lettered);
        }
        // What the consumer saw was produced and counted.
        prop_assert!(out.values.len() as u64 <= m.emitted);
        prop_assert!(out.errors.len() as u64 <= m.failed);
        // Every error downstream is this stage's and carries its record.
        for e in &out.errors {
            prop_assert_eq!(e.stage(), "dead_letter_queue");
            prop_assert!(e.item_type_name().unwrap().contains("DeadLetter"));
            prop_assert!(matches!(e.kind(), ErrorKind::Failed | ErrorKind::Panicked));
        }
        if !matches!(case.end, End::Complete) {
            return Ok(());
        }
        // A complete run delivers everything it produced.
        prop_assert_eq!(out.values.len() as u64, m.emitted);
        prop_assert_eq!(out.errors.len() as u64, m.failed);
        let fails = |x: &u32| x % case.panic_mod == 0 || x % case.fail_mod == 0;
        let expected_values: Vec<u32> = case.input.iter().copied().filter(|x| !fails(x)).collect();
        match case.overflow {
            Overflow::Block => {
                prop_assert_eq!(m.received, case.input.len() as u64);
                prop_assert_eq!((m.dropped, m.aborted), (0, 0));
                prop_assert_eq!(&out.values, &expected_values);
                // Every failed input is in the sink or downstream.
                let failed_inputs = case.input.iter().filter(|x| fails(x)).count() as u64;
                prop_assert_eq!(m.dead_lettered + m.failed, failed_inputs);
                let mut accepted_expected: Vec<u32> = case.input.iter().copied()
                    .filter(|x| fails(x) && x % case.sink_panic_mod != 0 && x % case.refuse_mod != 0)
                    .collect();
                let mut accepted = out.accepted.clone();
                accepted_expected.sort_unstable();
                accepted.sort_unstable();
                prop_assert_eq!(accepted, accepted_expected);
            }
            Overflow::DropAndCount => {
                prop_assert_eq!(m.received, case.input.len() as u64);
                prop_assert_eq!(m.aborted, 0);
                prop_assert_eq!(&out.values, &expected_values);
            }
            Overflow::Fail => {
                // Values before the failure arrive in order.
                prop_assert!(expected_values.starts_with(&out.values));
            }
            _ => unreachable!(),
        }
        let _ = std::panic::take_hook();
    }
}
