//! Each stage task runs inside a tracing span named after the stage.

use std::sync::{Arc, Mutex};

use streamz::{Map, Stage};
use tracing::span;
use tracing_subscriber::Registry;
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
