//! Every stage runs in a `tracing` span carrying the pipeline's and the
//! stage's names: a task stage in a `stage` span around its task, a fused
//! step in a `step` span around its work, inside its task's span. An
//! event a user's function logs carries both.

use std::io::Write;
use std::sync::{Arc, Mutex};

use streamz::{Map, Pipeline, Stage};
use tracing::span;
use tracing_subscriber::Registry;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Records the `name` field of every `stage` span that is entered.
#[derive(Clone, Default)]
struct Entered(Arc<Mutex<Vec<String>>>);

struct NameField(Option<String>);

impl tracing::field::Visit for NameField {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "name" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S> Layer<S> for Entered
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() == "stage" {
            let mut name = NameField(None);
            attrs.record(&mut name);
            if let Some(span) = ctx.span(id) {
                span.extensions_mut().insert(name.0.unwrap_or_default());
            }
        }
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(name) = span.extensions().get::<String>() {
                self.0.lock().unwrap().push(name.clone());
            }
        }
    }
}

#[test]
fn stage_tasks_run_in_spans_named_after_their_stage() {
    let entered = Entered::default();
    let subscriber = Registry::default().with(entered.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    // A current-thread runtime polls the tasks on this thread, under the
    // subscriber set above.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let out = rt.block_on(async {
        streamz::iter(0..10u32)
            .pipe(Stage::new("parse", Map::new(|x: &u32| *x)))
            .pipe(Stage::new("enrich", Map::new(|x: &u32| *x)))
            .collect()
            .await
    });
    assert_eq!(out.len(), 10);
    let names = entered.0.lock().unwrap().clone();
    assert!(names.iter().any(|n| n == "parse"), "{names:?}");
    assert!(names.iter().any(|n| n == "enrich"), "{names:?}");
}

/// Collects what the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// What `run` logs at DEBUG, on a current-thread runtime under a
/// subscriber of this thread.
fn logged(run: impl std::future::Future<Output = ()>) -> String {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .finish();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || runtime.block_on(run));
    String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
}

#[test]
fn events_in_user_code_carry_the_pipeline_and_the_stage() {
    let text = logged(async {
        let pipeline = Pipeline::builder().with_name("orders").build();
        let out = pipeline
            .iter([1u32, 2])
            .map(|n: &u32| {
                tracing::info!(n, "parsing");
                *n
            })
            .named("parse")
            .pipe(Stage::new(
                "price",
                Map::new(|n: &u32| {
                    tracing::info!(n, "pricing");
                    n * 10
                }),
            ))
            .collect()
            .await;
        assert_eq!(out.len(), 2);
        pipeline.join().await.unwrap();
    });
    // `parse` is fused into `price`'s task: its events are in both spans.
    let parsing: Vec<&str> = text.lines().filter(|l| l.contains("parsing")).collect();
    assert_eq!(parsing.len(), 2, "{text}");
    for line in parsing {
        assert!(
            line.contains("stage{pipeline=orders name=price}:step{pipeline=orders name=parse}"),
            "{line}"
        );
    }
    let pricing: Vec<&str> = text.lines().filter(|l| l.contains("pricing")).collect();
    assert_eq!(pricing.len(), 2, "{text}");
    for line in pricing {
        assert!(
            line.contains("stage{pipeline=orders name=price}:step{pipeline=orders name=price}"),
            "{line}"
        );
    }
}

/// A source's iterator or stream runs in the task that pulls from it; its
/// events carry a `source` span with the source's own name inside that
/// task's span.
#[test]
fn events_in_a_source_carry_the_source_name() {
    use futures::StreamExt;
    let text = logged(async {
        let pipeline = Pipeline::builder().with_name("orders").build();
        let listed = pipeline
            .iter((1u32..=2).inspect(|n| tracing::info!(n, "listing")))
            .named("listed")
            .pipe(Stage::new("price", Map::new(|n: &u32| n * 10)));
        let streamed = pipeline
            .stream(futures::stream::iter(1u32..=2).inspect(|n| tracing::info!(n, "streaming")))
            .named("streamed")
            .pipe(Stage::new("tax", Map::new(|n: &u32| n * 10)));
        assert_eq!(listed.collect().await.len(), 2);
        assert_eq!(streamed.collect().await.len(), 2);
        pipeline.join().await.unwrap();
    });
    for (what, spans) in [
        (
            "listing",
            "stage{pipeline=orders name=price}:source{pipeline=orders name=listed}",
        ),
        (
            "streaming",
            "stage{pipeline=orders name=tax}:source{pipeline=orders name=streamed}",
        ),
    ] {
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(what)).collect();
        assert_eq!(lines.len(), 2, "{text}");
        for line in lines {
            assert!(line.contains(spans), "{line}");
        }
    }
}
