//! Items stay out of logs (docs/errors-and-dlq.md, section 8): failing
//! items with a secret field go through `try_map`, an `AsyncMapper` with
//! retries and a timeout, a health gate, a circuit breaker (feature
//! `circuit-breaker`) and a dead-letter file. Every tracing event is
//! captured at TRACE; the secret shows in none, nor in any `Display` or
//! `Debug` of the errors and records. With a redaction hook the secret is
//! not in the dead-letter file either, and replay reads the redacted
//! records. Its own test binary, with one test: tracing caches callsite
//! interest per process, so a subscriber must be the only one from the
//! start.

mod support;

use std::time::Duration;

use streamz::dlq::{DeadLetter, FileSink, Replay};
use streamz::{AsyncMapper, DeadLetterQueue, ErrorKind, HealthGate, Retry, StreamError};
use support::Captured;

const CARD: &str = "4111111111111111";
const TOKEN: &str = "tok_live_S3CRET";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Payment {
    id: u32,
    card: String,
    token: String,
}

fn payment(id: u32) -> Payment {
    Payment {
        id,
        card: CARD.to_owned(),
        token: TOKEN.to_owned(),
    }
}

fn assert_clean(what: &str, text: &str) {
    assert!(!text.contains(CARD), "{what} shows the card: {text}");
    assert!(!text.contains(TOKEN), "{what} shows the token: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_failing_items_reach_no_log_line_and_with_redaction_no_file() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), run(logs))
        .await
        .expect("the run ends");
}

async fn run(logs: Captured) {
    let dir = tempfile::tempdir().unwrap();

    // 1. Failures of every kind, collected as error items.
    let (health, signal) = tokio::sync::watch::channel(true);
    let gate = HealthGate::new(signal).named("gate");
    let flip = tokio::spawn(async move {
        // The gate may have let everything through and ended already.
        let _ = health.send(false);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = health.send(true);
        health
    });
    let flow = streamz::iter((0..40u32).map(payment))
        .pipe(gate)
        // Every 4th is refused by a check.
        .try_map(|p: &Payment| {
            if p.id % 4 == 0 {
                Err("the card failed its check")
            } else {
                Ok(p.clone())
            }
        })
        .named("check")
        // Every 4th of the rest fails three times, every 5th times out.
        .pipe(
            AsyncMapper::new(|p: &Payment| {
                let id = p.id;
                let p = p.clone();
                async move {
                    if id % 4 == 1 {
                        return Err(std::io::Error::other("the processor declined"));
                    }
                    if id % 5 == 2 {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    Ok(p)
                }
            })
            .with_timeout(Duration::from_millis(20))
            .with_retry(
                Retry::attempts(3).with_backoff(Duration::from_millis(1), Duration::from_millis(2)),
            )
            .named("charge"),
        );
    #[cfg(feature = "circuit-breaker")]
    let flow = {
        use streamz::breaker::{Breaker, BreakerConfig, CircuitBreaker, OpenPolicy};
        let mut config = BreakerConfig::default();
        config.consecutive_failures = std::num::NonZeroU32::new(2);
        let breaker = Breaker::new("ledger", config);
        flow.pipe(
            CircuitBreaker::new(breaker, |p: &Payment| {
                let p = p.clone();
                async move {
                    if p.id % 3 == 0 {
                        Err(std::io::Error::other("the ledger is down"))
                    } else {
                        Ok(p)
                    }
                }
            })
            .with_open_policy(OpenPolicy::Reject)
            .named("ledger"),
        )
    };
    let out = flow.collect().await;
    let _health = flip.await.unwrap();
    let errors: Vec<StreamError> = out.into_iter().filter_map(Result::err).collect();
    assert!(errors.len() >= 20, "{} errors", errors.len());
    let kinds: std::collections::HashSet<ErrorKind> =
        errors.iter().map(StreamError::kind).collect();
    assert!(
        kinds.contains(&ErrorKind::Failed) && kinds.contains(&ErrorKind::TimedOut),
        "{kinds:?}"
    );
    for error in errors {
        assert!(
            error.item_type_name().is_some(),
            "the error carries its item"
        );
        assert_clean("an error's Display", &error.to_string());
        assert_clean("an error's Debug", &format!("{error:?}"));
        let record = DeadLetter::<Payment>::from_error(1, error);
        assert!(record.item.is_some());
        assert_clean("a record's Debug", &format!("{record:?}"));
    }

    // 2. The same failures into a dead-letter file, with a redaction.
    let path = dir.path().join("payments.dlq.jsonl");
    let dlq = DeadLetterQueue::new(FileSink::<Payment>::create(&path).await.unwrap())
        .with_item_tag("payment.v1")
        .with_redaction(|letter: &mut DeadLetter<Payment>| {
            if let Some(p) = &mut letter.item {
                p.card = format!("****{}", &p.card[p.card.len() - 4..]);
                p.token = String::from("<redacted>");
            }
        });
    let failures = (0..10u32).map(|id| {
        Err::<Payment, _>(StreamError::failed("charge", "declined").with_item(payment(id)))
    });
    let pipeline = streamz::Pipeline::new();
    let out = pipeline
        .try_stream(futures::stream::iter(failures))
        .pipe(dlq.named("dlq"))
        .collect()
        .await;
    assert!(out.is_empty());
    pipeline.join().await.unwrap();
    assert_eq!(pipeline.stage_metrics("dlq").unwrap().dead_lettered, 10);
    let file = std::fs::read_to_string(&path).unwrap();
    assert_clean("the dead-letter file", &file);
    assert_eq!(file.lines().count(), 10);
    assert!(file.contains("****1111"));

    // 3. Replay reads the redacted records.
    let letters = Replay::<Payment>::open(&path)
        .await
        .unwrap()
        .into_flow()
        .collect()
        .await;
    assert_eq!(letters.len(), 10);
    for (id, letter) in letters.into_iter().enumerate() {
        let letter = letter.unwrap();
        assert_eq!(letter.item_type.as_deref(), Some("payment.v1"));
        let p = letter.item.unwrap();
        assert_eq!(
            (p.id, p.card.as_str(), p.token.as_str()),
            (id as u32, "****1111", "<redacted>")
        );
    }

    // 4. A line that is not a record of the type asked for: replay names
    // the line and column, not the values serde_json would quote (a string
    // item read back as a number: serde_json's message would quote it).
    let raw = dir.path().join("raw.dlq.jsonl");
    let unredacted = DeadLetterQueue::new(FileSink::<String>::create(&raw).await.unwrap());
    let one = futures::stream::iter([Err::<String, _>(
        StreamError::failed("charge", "declined").with_item(format!("card {CARD}")),
    )]);
    streamz::try_stream(one).pipe(unredacted).collect().await;
    let text = std::fs::read_to_string(&raw).unwrap();
    let quoted = serde_json::from_str::<DeadLetter<u64>>(text.trim()).unwrap_err();
    assert!(
        quoted.to_string().contains(CARD),
        "serde_json quotes it: {quoted}"
    );
    let replayed = Replay::<u64>::open(&raw)
        .await
        .unwrap()
        .into_flow()
        .collect()
        .await;
    let error = replayed.into_iter().next().unwrap().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Rejected);
    assert_clean("a replay error's Display", &error.to_string());
    assert_clean("a replay error's Debug", &format!("{error:?}"));
    let mut chain = String::new();
    let mut next: Option<&dyn std::error::Error> = Some(&error);
    while let Some(e) = next {
        chain.push_str(&format!("{e} / {e:?}\n"));
        next = e.source();
    }
    assert_clean("a replay error's sources", &chain);

    // 5. A redaction that panics fails closed.
    let closed = dir.path().join("closed.dlq.jsonl");
    let dlq = DeadLetterQueue::new(FileSink::<Payment>::create(&closed).await.unwrap())
        .with_redaction(|_: &mut DeadLetter<Payment>| panic!("a bug in the redaction"));
    let one = futures::stream::iter([Err::<Payment, _>(
        StreamError::failed("charge", "declined").with_item(payment(2)),
    )]);
    streamz::try_stream(one).pipe(dlq).collect().await;
    let file = std::fs::read_to_string(&closed).unwrap();
    assert_clean("the file of a redaction that panicked", &file);
    let letters = Replay::<Payment>::open(&closed)
        .await
        .unwrap()
        .into_flow()
        .collect()
        .await;
    let letter = letters.into_iter().next().unwrap().unwrap();
    assert!(letter.item.is_none());
    assert!(letter.note.unwrap().contains("redaction panicked"));

    // 6. Redactions add up: each applies, in order.
    let both = dir.path().join("both.dlq.jsonl");
    let dlq = DeadLetterQueue::new(FileSink::<Payment>::create(&both).await.unwrap())
        .with_redaction(|l: &mut DeadLetter<Payment>| {
            if let Some(p) = &mut l.item {
                p.card = String::from("<card>");
            }
        })
        .with_redaction(|l: &mut DeadLetter<Payment>| {
            if let Some(p) = &mut l.item {
                p.token = String::from("<token>");
            }
        });
    let one = futures::stream::iter([Err::<Payment, _>(
        StreamError::failed("charge", "declined").with_item(payment(3)),
    )]);
    streamz::try_stream(one).pipe(dlq).collect().await;
    let file = std::fs::read_to_string(&both).unwrap();
    assert_clean("the file of two redactions", &file);
    assert!(
        file.contains("<card>") && file.contains("<token>"),
        "{file}"
    );

    // 7. The library's own JSON readers do not quote what they could not
    // read: a line of a file (`Line::json`), a dead letter's JSON item
    // (`DeadLetter::item_as`).
    let input = dir.path().join("payments.jsonl");
    std::fs::write(&input, format!("{{\"id\": \"{CARD}\"}}\n")).unwrap();
    let pipeline = streamz::Pipeline::new();
    let (lines, _handle) = streamz::file::LineSource::new(&input, dir.path().join("cp"))
        .start(&pipeline)
        .unwrap();
    let out = lines
        .try_map(|line: &streamz::file::Line| line.json::<Payment>())
        .collect()
        .await;
    let error = out.into_iter().next().unwrap().unwrap_err();
    assert_clean("a line's JSON error", &format!("{error} {error:?}"));
    let record = DeadLetter::<serde_json::Value>::from_error(1, {
        StreamError::failed("x", "y").with_item(serde_json::json!({ "id": CARD }))
    });
    let as_payment = record.item_as::<Payment>().unwrap().unwrap_err();
    assert_clean("item_as's error", &format!("{as_payment} {as_payment:?}"));

    // Every log line of the whole run.
    let logs = logs.text();
    // What was logged: the gate's and the breaker's transitions, and the
    // redaction's panic.
    assert!(logs.contains("health gate opens"), "{logs}");
    #[cfg(feature = "circuit-breaker")]
    assert!(logs.contains("circuit breaker opens"), "{logs}");
    assert!(logs.contains("redaction panicked"), "{logs}");
    assert_clean("the logs", &logs);
}
