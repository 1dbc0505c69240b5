//! Property: for random chains of map / filter / fallible map stages, fused
//! or on their own tasks, over random input with random failures and
//! panics, every input item is accounted for and every error carries the
//! item that failed.

mod support;

use proptest::prelude::*;
use streamz::{EdgeConfig, Filter, Flow, Map, Pipeline, Stage, TryMap};
use support::assert_conserved;

#[derive(Debug, Clone)]
enum Op {
    /// `x + add`, panicking when `x % modulus == 0`.
    Map { add: u32, modulus: u32 },
    /// keeps `x` unless `x % modulus == 0`.
    Filter { modulus: u32 },
    /// `x + 1`, failing when `x % modulus == 0`.
    TryMap { modulus: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..5, 2u32..40).prop_map(|(add, modulus)| Op::Map { add, modulus }),
        (2u32..10).prop_map(|modulus| Op::Filter { modulus }),
        (2u32..20).prop_map(|modulus| Op::TryMap { modulus }),
    ]
}

/// What the chain should produce for one input: a value, an error from
/// stage `i` carrying `item`, or nothing (filtered at some stage).
#[derive(Debug, PartialEq)]
enum Expect {
    Value(u32),
    Error { stage: String, item: u32 },
}

fn model(ops: &[Op], input: &[u32]) -> (Vec<Expect>, u64) {
    let mut out = Vec::new();
    let mut dropped = 0;
    'items: for &x in input {
        let mut v = x;
        for (i, op) in ops.iter().enumerate() {
            let stage = format!("s{i}");
            match *op {
                Op::Map { add, modulus } => {
                    if v % modulus == 0 {
                        out.push(Expect::Error { stage, item: v });
                        continue 'items;
                    }
                    v = v.wrapping_add(add);
                }
                Op::Filter { modulus } => {
                    if v % modulus == 0 {
                        dropped += 1;
                        continue 'items;
                    }
                }
                Op::TryMap { modulus } => {
                    if v % modulus == 0 {
                        out.push(Expect::Error { stage, item: v });
                        continue 'items;
                    }
                    v = v.wrapping_add(1);
                }
            }
        }
        out.push(Expect::Value(v));
    }
    (out, dropped)
}

fn build(flow: Flow<u32>, ops: &[Op], staged: &[bool]) -> Flow<u32> {
    let mut flow = flow;
    for (i, op) in ops.iter().enumerate() {
        let name = format!("s{i}");
        let staged = staged[i % staged.len()];
        flow = match *op {
            Op::Map { add, modulus } => {
                let f = move |x: &u32| {
                    assert!(x % modulus != 0, "injected panic");
                    x.wrapping_add(add)
                };
                if staged {
                    flow.pipe(Stage::new(name, Map::new(f)))
                } else {
                    flow.step(name, Map::new(f))
                }
            }
            Op::Filter { modulus } => {
                let f = move |x: &u32| x % modulus != 0;
                if staged {
                    flow.pipe(Stage::new(name, Filter::new(f)))
                } else {
                    flow.step(name, Filter::new(f))
                }
            }
            Op::TryMap { modulus } => {
                let f = move |x: &u32| {
                    if x % modulus == 0 {
                        Err("injected failure")
                    } else {
                        Ok(x.wrapping_add(1))
                    }
                };
                if staged {
                    flow.pipe(Stage::new(name, TryMap::new(f)))
                } else {
                    flow.step(name, TryMap::new(f))
                }
            }
        };
    }
    flow
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn every_item_is_accounted_for(
        input in prop::collection::vec(0u32..1000, 0..600),
        ops in prop::collection::vec(op(), 1..6),
        staged in prop::collection::vec(any::<bool>(), 1..6),
        capacity in 1usize..40,
        max_chunk in 1usize..70,
    ) {
        std::panic::set_hook(Box::new(|_| {})); // injected panics are expected
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (expected, expected_dropped) = model(&ops, &input);
        let pipeline = Pipeline::with_edge(EdgeConfig::new(capacity, max_chunk));
        let out = rt.block_on(async {
            build(pipeline.iter(input.clone()), &ops, &staged).collect().await
        });

        let mut errors = 0u64;
        let actual: Vec<Expect> = out
            .into_iter()
            .map(|r| match r {
                Ok(v) => Expect::Value(v),
                Err(mut e) => {
                    errors += 1;
                    let item = e.take_item::<u32>().expect("every error carries its item");
                    Expect::Error { stage: e.stage().to_owned(), item }
                }
            })
            .collect();
        prop_assert_eq!(&actual, &expected);

        let metrics = pipeline.metrics();
        let dropped: u64 = metrics.iter().map(|m| m.dropped).sum();
        let failed: u64 = metrics.iter().map(|m| m.failed).sum();
        let aborted: u64 = metrics.iter().map(|m| m.aborted + m.undelivered).sum();
        prop_assert_eq!(dropped, expected_dropped);
        prop_assert_eq!(failed, errors);
        prop_assert_eq!(aborted, 0);
        prop_assert_eq!(input.len() as u64, actual.len() as u64 + dropped);
        for m in metrics.iter().filter(|m| m.name.starts_with('s')) {
            assert_conserved(m);
        }
        let _ = std::panic::take_hook();
    }
}
