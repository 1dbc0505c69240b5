//! Work that leaves the runtime's worker threads keeps its stage's span:
//! a `ParMap` function on rayon's pool and a dead-letter file's writes on
//! tokio's blocking pool log with the pipeline's and the stage's names,
//! like work on the stage's own task. Its own test binary, with one test:
//! the pools' threads see only a global subscriber, and tracing caches
//! callsite interest per process.

mod support;

use std::time::Duration;

use streamz::dlq::FileSink;
use streamz::{DeadLetterQueue, ParMap, Pipeline, StreamError};
use support::Captured;

#[test]
fn work_on_other_threads_logs_inside_its_stage_span() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_thread_names(true)
            .finish(),
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("runtime-worker")
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            // 1. A function slow enough to go to rayon's pool.
            let pipeline = Pipeline::builder().with_name("traced").build();
            let out = pipeline
                .iter(0..200u32)
                .pipe(
                    ParMap::new(|n: &u32| {
                        std::thread::sleep(Duration::from_micros(200));
                        tracing::info!(n, "hashing");
                        *n
                    })
                    .named("hash")
                    .with_workers(2),
                )
                .collect()
                .await;
            assert_eq!(out.len(), 200);
            pipeline.join().await.unwrap();

            // 2. A dead-letter file that cannot be written (/dev/full).
            let dlq = DeadLetterQueue::new(FileSink::<u32>::create("/dev/full").await.unwrap());
            let pipeline = Pipeline::builder().with_name("traced").build();
            let out = pipeline
                .try_stream(futures::stream::iter([Err::<u32, _>(
                    StreamError::failed("parse", "bad").with_item(7u32),
                )]))
                .pipe(dlq.named("dlq"))
                .collect()
                .await;
            assert_eq!(out.len(), 1, "the refused dead letter goes downstream");
            pipeline.join().await.unwrap();
        })
        .await
        .expect("the pipelines end");
    });
    let text = captured.text();

    let hashing: Vec<&str> = text.lines().filter(|l| l.contains("hashing")).collect();
    assert_eq!(hashing.len(), 200, "{text}");
    assert!(
        hashing.iter().any(|l| !l.contains("runtime-worker")),
        "some calls ran on rayon's pool: {text}"
    );
    for line in hashing {
        assert!(line.contains("stage{pipeline=traced name=hash}"), "{line}");
    }

    let append: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("cannot append to the dead-letter file"))
        .collect();
    assert!(!append.is_empty(), "{text}");
    for line in append {
        assert!(line.contains("stage{pipeline=traced name=dlq"), "{line}");
    }
}
