//! Fan-in: merge several flows into one.

use std::borrow::Cow;

use crate::base::channel::chunk_channel;
use crate::base::config::EdgeConfig;
use crate::flow::Flow;
use crate::flow::pipeline::Pipeline;
use crate::flow::source::FusedSource;
use crate::flow::stage::{Pass, spawn_into};
use crate::flow::topology::StageKind;

/// Merges `flows` into one flow, interleaving chunks as they become ready.
///
/// Each input is read by its own task, so a slow input does not hold up the
/// others; order is kept within each input, not across inputs. The output
/// ends when every input has ended. Errors pass through unchanged.
///
/// The merged flow belongs to the first input's pipeline; the other inputs'
/// pipelines are linked to it, so [`Pipeline::shutdown`],
/// [`Pipeline::abort`], [`Pipeline::join`] and [`Pipeline::metrics`] on the
/// result cover the whole graph. An empty list gives an empty flow.
///
/// # Panics
///
/// Outside a tokio runtime.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let merged = streamz::merge([streamz::iter(0..3), streamz::iter(10..13)]);
/// let mut values: Vec<i32> = merged.collect().await.into_iter().map(Result::unwrap).collect();
/// values.sort();
/// assert_eq!(values, [0, 1, 2, 10, 11, 12]);
/// # }
/// ```
#[track_caller]
pub fn merge<T, I>(flows: I) -> Flow<T>
where
    T: Send + 'static,
    I: IntoIterator<Item = Flow<T>>,
{
    Merge::new().merge(flows)
}

/// A fan-in's settings: the stage's name (`merge` by default) and its
/// output's edge (the pipeline's by default); [`Merge::merge`] runs it.
///
/// ```
/// use streamz::{EdgeConfig, Merge};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let merged = Merge::new()
///     .named("all_orders")
///     .with_edge(EdgeConfig::new(64, 16))
///     .merge([streamz::iter(0..3), streamz::iter(10..13)]);
/// let pipeline = merged.pipeline().clone();
/// assert_eq!(merged.collect().await.len(), 6);
/// assert_eq!(pipeline.stage_metrics("all_orders").unwrap().emitted, 6);
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Merge {
    name: Option<Cow<'static, str>>,
    edge: Option<EdgeConfig>,
}

impl Merge {
    /// A merge named `merge` on the pipeline's edge.
    pub fn new() -> Self {
        Merge::default()
    }

    /// Names the stage.
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the output's edge.
    pub fn with_edge(mut self, edge: EdgeConfig) -> Self {
        self.edge = Some(edge);
        self
    }

    /// Merges `flows` into one; see [`merge`].
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[track_caller]
    pub fn merge<T, I>(self, flows: I) -> Flow<T>
    where
        T: Send + 'static,
        I: IntoIterator<Item = Flow<T>>,
    {
        merge_into(self, flows)
    }
}

#[track_caller]
fn merge_into<T, I>(settings: Merge, flows: I) -> Flow<T>
where
    T: Send + 'static,
    I: IntoIterator<Item = Flow<T>>,
{
    let mut flows = flows.into_iter().peekable();
    let pipeline = match flows.peek() {
        Some(first) => first.pipeline().clone(),
        None => Pipeline::new(),
    };
    let name = settings.name.as_deref().unwrap_or("merge");
    let checked = pipeline
        .validate()
        .and(settings.edge.map_or(Ok(()), |e| e.validate()))
        .map_err(|e| e.in_stage("Merge", name));
    if let Err(error) = checked {
        // Started nothing: the inputs are dropped (their producers count
        // what they could not deliver) and follow this pipeline's join.
        for flow in flows {
            pipeline.link(flow.pipeline().clone());
        }
        let ended: Flow<T> = Flow::from_source(pipeline.clone(), Box::new(crate::flow::Ended));
        return ended.refuse(name.to_owned(), error);
    }
    let edge = settings.edge.unwrap_or(pipeline.edge());
    let counters = pipeline.register(name);
    counters.mark(StageKind::Task);
    let (tx, rx) = chunk_channel(edge);
    let fill = rx.fill();
    for flow in flows {
        pipeline.link(flow.pipeline().clone());
        flow.connect(&counters);
        let src = FusedSource {
            inner: flow.into_source(),
            step: Pass,
            counters: counters.clone(),
            ended: false,
            abort: pipeline.abort_token(),
            span: None,
        };
        spawn_into(
            &pipeline,
            Box::new(src),
            tx.clone(),
            counters.clone(),
            edge.max_chunk(),
        );
    }
    Flow::from_source(pipeline, Box::new(rx)).output_of(counters, fill)
}

impl<T: Send + 'static> Flow<T> {
    /// Merges this flow with `other`; see [`merge`].
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[track_caller]
    pub fn merge_with(self, other: Flow<T>) -> Flow<T> {
        merge([self, other])
    }
}
