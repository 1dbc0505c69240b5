//! The flow layer: [`Flow`] (a stream of `Result<T>` items between
//! stages, in this file), the pipeline that owns a chain's tasks, sources,
//! per-item steps and stages, and the operator driver every operator task
//! runs on.

pub(crate) mod driver;
pub(crate) mod pipeline;
pub(crate) mod processor;
pub(crate) mod source;
pub(crate) mod stage;
pub(crate) mod step;
pub(crate) mod topology;

use std::borrow::Cow;
use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Sink, SinkExt, Stream};

use crate::base::ack::Ack;
use crate::base::channel::EdgeFill;
use crate::base::chunk::{Chunk, IntoAcked};
use crate::base::config::{ConfigError, EdgeConfig};
use crate::base::counters::Counters;
use crate::base::error::{BoxError, ErrorKind, Result, StreamError};
use crate::flow::pipeline::Pipeline;
use crate::flow::processor::Processor;
use crate::flow::source::{BoxSource, ChunkSource, FusedSource};
use crate::flow::stage::spawn_stage;
use crate::flow::step::Step;
use crate::ops::filter::Filter;
use crate::ops::map::{Map, TryMap};
use crate::ops::tap::Tap;

/// A stream of [`Result<T>`] items flowing out of a stage.
///
/// Compose stages left to right with [`pipe`](Flow::pipe) (or the fused
/// shorthands [`map`](Flow::map), [`filter`](Flow::filter), ...), then
/// consume the flow with a sink ([`collect`](Flow::collect),
/// [`for_each`](Flow::for_each), [`forward`](Flow::forward)) or as a
/// `futures::Stream`.
///
/// Between stages, items travel in chunks; a `Flow` hides that and yields
/// one item at a time. Dropping a flow stops the stages that feed it and
/// counts the items it still held in [`Pipeline::discarded`].
///
/// # Examples
///
/// ```
/// use futures::StreamExt;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut flow = streamz::iter(["1", "2", "x", "4"])
///     .try_map(|s: &&str| s.parse::<u32>())
///     .filter(|n: &u32| n % 2 == 0);
///
/// assert_eq!(flow.next().await.unwrap().unwrap(), 2);
/// let err = flow.next().await.unwrap().unwrap_err();
/// assert_eq!(err.stage(), "try_map");
/// assert_eq!(flow.next().await.unwrap().unwrap(), 4);
/// assert!(flow.next().await.is_none());
/// # }
/// ```
pub struct Flow<T> {
    src: Option<BoxSource<T>>,
    /// Items of a chunk being handed over one at a time (as a `Stream`).
    buf: IntoAcked<T>,
    pipeline: Pipeline,
    /// The fused step or source that produces this flow, while it may
    /// still be renamed ([`Flow::named`]).
    stage: Option<Counters>,
    /// The stage whose output this flow is, and the channel in between
    /// when that stage has a task of its own (the pipeline's topology).
    upstream: Option<(Counters, Option<EdgeFill>)>,
}

impl<T> fmt::Debug for Flow<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flow")
            .field("buffered", &self.buf.len())
            .field("ended", &self.src.is_none())
            .field("pipeline", &self.pipeline)
            .finish()
    }
}

impl<T: Send + 'static> Flow<T> {
    pub(crate) fn from_source(pipeline: Pipeline, src: BoxSource<T>) -> Self {
        Flow {
            src: Some(src),
            buf: IntoAcked::default(),
            pipeline,
            stage: None,
            upstream: None,
        }
    }

    /// Marks this flow as the output of the task stage `counters`, read
    /// through a channel that `fill` shows.
    pub(crate) fn output_of(mut self, counters: Counters, fill: EdgeFill) -> Self {
        self.upstream = Some((counters, Some(fill)));
        self
    }

    /// The stage whose output this flow is.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub(crate) fn upstream(&self) -> Option<&Counters> {
        self.upstream.as_ref().map(|(counters, _)| counters)
    }

    /// Records in the pipeline's topology that the stage `to` reads this
    /// flow.
    pub(crate) fn connect(&self, to: &Counters) {
        if let Some((from, fill)) = &self.upstream {
            self.pipeline.add_edge(from, to, fill.clone());
        }
    }

    /// Marks `counters` as the stage producing this flow, one that runs in
    /// the reader's task and so may still be renamed.
    pub(crate) fn produced_by(mut self, counters: Counters) -> Self {
        self.upstream = Some((counters.clone(), None));
        self.stage = Some(counters);
        self
    }

    /// Names the stage that produces this flow: a fused step (`map`,
    /// `try_map`, `filter`, `step`...) or a source (`iter`, `stream`,
    /// `channel`). Its counters ([`Pipeline::stage_metrics`]) and the error
    /// items it makes carry the name. Names are unique in a pipeline: a
    /// name another stage has gets a suffix (`parse#2`).
    ///
    /// A stage with a task of its own (an operator, `async_boundary`) is
    /// named where it is made (`named` on its builder, the argument of
    /// `async_boundary`), since its task already runs under that name; on
    /// its flow, and on a flow already named, this logs a warning and
    /// changes nothing.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let flow = streamz::iter(["1", "x", "3"])
    ///     .named("lines")
    ///     .try_map(|s: &&str| s.parse::<u32>())
    ///     .named("parse");
    /// let pipeline = flow.pipeline().clone();
    /// let out = flow.collect().await;
    /// assert_eq!(out[1].as_ref().unwrap_err().stage(), "parse");
    /// let parse = pipeline.stage_metrics("parse").unwrap();
    /// assert_eq!((parse.received, parse.emitted, parse.failed), (3, 2, 1));
    /// assert_eq!(pipeline.stage_metrics("lines").unwrap().emitted, 3);
    /// # }
    /// ```
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        let name: Cow<'static, str> = name.into();
        match self.stage.take() {
            Some(counters) if self.pipeline.rename(&counters, Arc::from(name.as_ref())) => {}
            _ => tracing::warn!(
                name = %name,
                "Flow::named: the stage producing this flow has a task of its own or was named already; name it where it is made"
            ),
        }
        self
    }

    /// Takes the source out (for a stage that will read it), keeping any
    /// items already buffered by a reader in front.
    pub(crate) fn into_source(mut self) -> BoxSource<T> {
        let src = self.src.take().unwrap_or_else(|| Box::new(Ended));
        let buffered: Chunk<T> = std::mem::take(&mut self.buf).into_chunk();
        if buffered.is_empty() {
            src
        } else {
            Box::new(Prepend {
                first: Some(buffered),
                inner: src,
            })
        }
    }

    /// The pipeline this flow belongs to.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Runs `processor` on this flow and returns its output.
    ///
    /// ```
    /// use streamz::{Filter, Stage};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let evens = streamz::iter(0..10)
    ///     .pipe(Stage::new("evens", Filter::new(|x: &i32| x % 2 == 0)))
    ///     .collect()
    ///     .await;
    /// assert_eq!(evens.len(), 5);
    /// # }
    /// ```
    ///
    /// The processor's settings are checked first
    /// ([`Processor::validate`]). If one is invalid the stage does not
    /// start: its input is dropped (the stage before it counts what it
    /// could not deliver, and what it had sent already is counted in
    /// [`Pipeline::discarded`]), its output is one
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) error item whose
    /// cause is the [`ConfigError`], and [`Pipeline::join`] returns
    /// [`PipelineError::Config`](crate::PipelineError::Config). Use
    /// [`try_pipe`](Flow::try_pipe) to handle it where the pipeline is
    /// built.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, for a processor that starts a task (every
    /// operator and [`Stage`](crate::Stage)). A pipeline's sources and
    /// fused steps may be built anywhere; pipe its stages inside the
    /// runtime that will run them.
    pub fn pipe<U, P>(self, processor: P) -> Flow<U>
    where
        U: Send + 'static,
        P: Processor<T, U>,
    {
        match self.pipeline.validate().and_then(|()| processor.validate()) {
            Ok(()) => processor.process(self),
            Err(error) => {
                let stage = processor.name().to_owned();
                self.refuse(stage, error)
            }
        }
    }

    /// The output of a stage that was not started because of `error`: one
    /// [`ErrorKind::Config`] item, recorded for [`Pipeline::join`]. This
    /// flow is dropped: the stage before counts what it could not deliver,
    /// and what it had already sent is counted in
    /// [`Pipeline::discarded`].
    pub(crate) fn refuse<U: Send + 'static>(self, stage: String, error: ConfigError) -> Flow<U> {
        self.refuse_fan_out(stage, error, 1)
            .pop()
            .expect("one output")
    }

    /// The `n` (at least one) outputs of a stage or fan-out that was not
    /// started: each holds one [`ErrorKind::Config`] item, so whichever
    /// output is read shows why; the error is recorded once.
    pub(crate) fn refuse_fan_out<U: Send + 'static>(
        self,
        stage: String,
        error: ConfigError,
        n: usize,
    ) -> Vec<Flow<U>> {
        let pipeline = self.pipeline.clone();
        drop(self);
        pipeline.add_config_error(error.clone());
        tracing::error!(stage = %stage, %error, "stage not started");
        // As many outputs as the caller expects, unless that is the
        // invalid setting itself.
        let n = if n > crate::base::config::MAX_OUTPUTS {
            1
        } else {
            n.max(1)
        };
        (0..n)
            .map(|_| {
                let item =
                    StreamError::new(ErrorKind::Config, stage.clone()).with_source(error.clone());
                let mut first = Chunk::default();
                first.push_error(item);
                Flow::from_source(
                    pipeline.clone(),
                    Box::new(Prepend {
                        first: Some(first),
                        inner: Box::new(Ended),
                    }),
                )
            })
            .collect()
    }

    /// Runs `processor` on this flow if its settings are valid
    /// ([`Processor::validate`]); otherwise returns why, and drops this
    /// flow.
    ///
    /// # Errors
    ///
    /// The [`ConfigError`] naming the operator, its stage and the field.
    ///
    /// ```
    /// use streamz::Batcher;
    /// use std::time::Duration;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let err = streamz::iter(0..10)
    ///     .try_pipe(Batcher::new(0, Duration::from_millis(10)))
    ///     .unwrap_err();
    /// assert_eq!(err.to_string(), "Batcher `batcher`: `max_size` must be greater than zero");
    /// # }
    /// ```
    pub fn try_pipe<U, P>(self, processor: P) -> std::result::Result<Flow<U>, ConfigError>
    where
        P: Processor<T, U>,
    {
        self.pipeline.validate()?;
        processor.validate()?;
        Ok(processor.process(self))
    }

    /// Runs `step` inside the task that reads this flow: no task, no channel
    /// hop. Its counters appear under `name` in [`Pipeline::metrics`].
    ///
    /// See [`Step`] for an example.
    pub fn step<U, S>(self, name: impl Into<Cow<'static, str>>, step: S) -> Flow<U>
    where
        U: Send + 'static,
        S: Step<T, U>,
    {
        let name: Cow<'static, str> = name.into();
        match self.pipeline.validate().and_then(|()| step.validate()) {
            Ok(()) => self.fuse(name, step).0,
            Err(error) => {
                let error = error.in_stage("Step", &name);
                self.refuse(name.into_owned(), error)
            }
        }
    }

    /// Fuses `step` as [`step`](Flow::step) does if its settings are valid
    /// ([`Step::validate`]); otherwise returns why, and drops this flow.
    ///
    /// # Errors
    ///
    /// The [`ConfigError`] naming the step, its stage and the field.
    pub fn try_step<U, S>(
        self,
        name: impl Into<Cow<'static, str>>,
        step: S,
    ) -> std::result::Result<Flow<U>, ConfigError>
    where
        U: Send + 'static,
        S: Step<T, U>,
    {
        let name: Cow<'static, str> = name.into();
        self.pipeline
            .validate()
            .and_then(|()| step.validate())
            .map_err(|e| e.in_stage("Step", &name))?;
        Ok(self.fuse(name, step).0)
    }

    pub(crate) fn fuse<U, S>(
        self,
        name: impl Into<Cow<'static, str>>,
        step: S,
    ) -> (Flow<U>, Counters)
    where
        U: Send + 'static,
        S: Step<T, U>,
    {
        let name: Cow<'static, str> = name.into();
        let pipeline = self.pipeline.clone();
        let counters = pipeline.register(name.as_ref());
        self.connect(&counters);
        let src = Box::new(FusedSource {
            inner: self.into_source(),
            step,
            counters: counters.clone(),
            ended: false,
            abort: pipeline.abort_token(),
            span: None,
        });
        let flow = Flow::from_source(pipeline, src).produced_by(counters.clone());
        (flow, counters)
    }

    /// Ends the current fused segment: everything fused so far runs on a new
    /// task named `name`, and a channel with the pipeline's edge
    /// configuration carries its output. Use it to spread a chain of fused
    /// stages over several cores.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[track_caller]
    pub fn async_boundary(self, name: impl Into<Cow<'static, str>>) -> Flow<T> {
        let edge = self.pipeline.edge();
        self.async_boundary_with(name, edge)
    }

    /// [`async_boundary`](Flow::async_boundary) with its own edge configuration.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[track_caller]
    pub fn async_boundary_with(
        self,
        name: impl Into<Cow<'static, str>>,
        edge: EdgeConfig,
    ) -> Flow<T> {
        let name: Cow<'static, str> = name.into();
        let checked = self
            .pipeline
            .validate()
            .and(edge.validate())
            .map_err(|e| e.in_stage("async_boundary", &name));
        if let Err(error) = checked {
            return self.refuse(name.into_owned(), error);
        }
        let (flow, counters) = self.fuse(name, crate::flow::stage::Pass);
        flow.spawn_task(counters, edge)
    }

    pub(crate) fn spawn_task(self, counters: Counters, edge: EdgeConfig) -> Flow<T> {
        let pipeline = self.pipeline.clone();
        spawn_stage(&pipeline, self.into_source(), counters, edge)
    }

    /// Applies `f` to each value, fused into the reading task.
    ///
    /// The closure borrows the item, so if it panics the item is still whole
    /// and rides along in the `panicked` error.
    pub fn map<U, F>(self, f: F) -> Flow<U>
    where
        U: Send + 'static,
        F: FnMut(&T) -> U + Send + 'static,
    {
        self.step("map", Map::new(f))
    }

    /// Applies a fallible `f`; an `Err` becomes a `failed` error item that
    /// carries the input item.
    pub fn try_map<U, E, F>(self, f: F) -> Flow<U>
    where
        U: Send + 'static,
        E: Into<BoxError>,
        F: FnMut(&T) -> std::result::Result<U, E> + Send + 'static,
    {
        self.step("try_map", TryMap::new(f))
    }

    /// Keeps the values for which `f` returns true; the others are counted
    /// as dropped. Errors always pass.
    pub fn filter<F>(self, f: F) -> Flow<T>
    where
        F: FnMut(&T) -> bool + Send + 'static,
    {
        self.step("filter", Filter::new(f))
    }

    /// Calls `f` on each value and passes it on unchanged.
    pub fn tap<F>(self, f: F) -> Flow<T>
    where
        F: FnMut(&T) + Send + 'static,
    {
        self.step("tap", Tap::new(f))
    }

    /// The next chunk of items, as the stage before produced it; `None` at
    /// the end. For consumers that handle items in bulk.
    ///
    /// Reading hands the items over: their acknowledgements (see [`Ack`])
    /// are met as the chunk is returned, like every way of reading a flow
    /// except [`next_acked_chunk`](Flow::next_acked_chunk) and
    /// [`for_each_acked`](Flow::for_each_acked), which leave that to the
    /// reader.
    pub async fn next_chunk(&mut self) -> Option<Chunk<T>> {
        let mut chunk = self.next_acked_chunk().await?;
        chunk.ack_all();
        Some(chunk)
    }

    /// The next chunk of items with their acknowledgements still in it, for
    /// a reader that writes the items somewhere durable itself: take them
    /// with [`Chunk::take_acks`] and meet them once the write is durable.
    /// Acknowledgements dropped unmet leave their items to be read again
    /// after a restart (by a source that replays).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut flow = streamz::iter(0..3);
    /// while let Some(mut chunk) = flow.next_acked_chunk().await {
    ///     let acks = chunk.take_acks();
    ///     // ... write chunk.values() somewhere durable, then:
    ///     acks.into_iter().for_each(streamz::Ack::ack);
    /// }
    /// # }
    /// ```
    pub async fn next_acked_chunk(&mut self) -> Option<Chunk<T>> {
        if self.buf.len() > 0 {
            return Some(std::mem::take(&mut self.buf).into_chunk());
        }
        let src = self.src.as_mut()?;
        let chunk = poll_fn(|cx| src.poll_chunk(cx)).await;
        if chunk.is_none() {
            self.src = None;
        }
        chunk
    }

    /// Collects every item, values and errors, in order (handing them over:
    /// see [`next_chunk`](Flow::next_chunk)).
    pub async fn collect(mut self) -> Vec<Result<T>> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next_chunk().await {
            out.extend(chunk);
        }
        out
    }

    /// Calls `f` on every item, in order, and meets the item's
    /// acknowledgement (see [`Ack`]) only when the future `f` returns
    /// resolves to `Ok`: for a reader that writes each item somewhere
    /// durable. The first `Err` ends the loop and is returned; that item's
    /// acknowledgement and the rest's stay unmet, so a source that replays
    /// (Kafka, or one of the application's own) offers
    /// them again after a restart.
    ///
    /// # Errors
    ///
    /// The first error `f` returned.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut written = Vec::new();
    /// streamz::iter(1..=3)
    ///     .for_each_acked(|item| {
    ///         written.push(item.unwrap());
    ///         async { Ok::<(), std::io::Error>(()) }
    ///     })
    ///     .await
    ///     .unwrap();
    /// assert_eq!(written, [1, 2, 3]);
    /// # }
    /// ```
    pub async fn for_each_acked<F, Fut, E>(mut self, mut f: F) -> std::result::Result<(), E>
    where
        F: FnMut(Result<T>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), E>>,
    {
        while let Some(chunk) = self.next_acked_chunk().await {
            let mut items = chunk.into_acked();
            while let Some((item, ack)) = items.next() {
                // An error's acknowledgement is taken out of it, so that `f`
                // may keep or drop the error as it likes.
                let (item, ack) = match item {
                    Ok(v) => (Ok(v), ack),
                    Err(mut e) => {
                        let own = e.take_ack();
                        (Err(e), own)
                    }
                };
                match f(item).await {
                    Ok(()) => ack.ack(),
                    Err(e) => {
                        self.pipeline.add_discarded(items.len() as u64);
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Calls `f` on every item, values and errors, in order. An item's
    /// acknowledgement (see [`Ack`]) is met once `f` returned for it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut sum = 0;
    /// streamz::iter(1..=4).for_each(|r| sum += r.unwrap()).await;
    /// assert_eq!(sum, 10);
    /// # }
    /// ```
    pub async fn for_each<F>(mut self, mut f: F)
    where
        F: FnMut(Result<T>),
    {
        // Each item is decided once `f` returned for it: if `f` panics, the
        // rest of its chunk is not acknowledged.
        while let Some(chunk) = self.next_acked_chunk().await {
            for (item, ack) in chunk.into_acked() {
                // An error's acknowledgement is inside it (none beside it).
                let ack = match item {
                    Ok(v) => {
                        f(Ok(v));
                        ack
                    }
                    Err(mut e) => {
                        let own = e.take_ack();
                        f(Err(e));
                        own
                    }
                };
                ack.ack();
            }
        }
    }

    /// Sends every item into `sink`, then closes it. The items'
    /// acknowledgements (see [`Ack`]) are met chunk by chunk, once the sink
    /// has flushed them.
    ///
    /// # Errors
    ///
    /// The sink's first error. The item the sink refused and the items not
    /// yet sent are counted in [`Pipeline::discarded`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let (tx, mut rx) = futures::channel::mpsc::channel(8);
    /// let sink = futures::SinkExt::sink_map_err(tx, |_| "receiver gone");
    /// tokio::spawn(streamz::iter(0..3).forward(sink));
    /// let mut got = Vec::new();
    /// while let Some(item) = futures::StreamExt::next(&mut rx).await {
    ///     got.push(item.unwrap());
    /// }
    /// assert_eq!(got, [0, 1, 2]);
    /// # }
    /// ```
    pub async fn forward<S>(mut self, mut sink: S) -> std::result::Result<(), S::Error>
    where
        S: Sink<Result<T>> + Unpin,
    {
        while let Some(mut chunk) = self.next_acked_chunk().await {
            // Met once the sink has flushed the chunk's items.
            let acks = chunk.take_acks();
            let mut items = chunk.into_iter();
            while let Some(item) = items.next() {
                if let Err(e) = sink.feed(item).await {
                    self.pipeline.add_discarded(1 + items.len() as u64);
                    return Err(e);
                }
            }
            sink.flush().await?;
            acks.into_iter().for_each(Ack::ack);
        }
        sink.close().await
    }
}

// A flow never pins its items: they sit in a Vec and are moved out.
impl<T> Unpin for Flow<T> {}

/// A flow that has ended stays ended: `select!` and other combinators that
/// need a [`FusedStream`](futures::stream::FusedStream) take it as it is.
impl<T: Send + 'static> futures::stream::FusedStream for Flow<T> {
    fn is_terminated(&self) -> bool {
        self.src.is_none() && self.buf.len() == 0
    }
}

impl<T: Send + 'static> Stream for Flow<T> {
    type Item = Result<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<T>>> {
        let this = self.get_mut();
        loop {
            if let Some((item, ack)) = this.buf.next() {
                // Handed over: the reader owns the item's outcome now.
                ack.ack();
                return Poll::Ready(Some(item.map_err(|mut e| {
                    e.take_ack().ack();
                    e
                })));
            }
            let Some(src) = this.src.as_mut() else {
                return Poll::Ready(None);
            };
            match std::task::ready!(src.poll_chunk(cx)) {
                Some(chunk) => this.buf = chunk.into_acked(),
                None => {
                    this.src = None;
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let buffered = self.buf.len();
        if self.src.is_none() {
            (buffered, Some(buffered))
        } else {
            (buffered, None)
        }
    }
}

impl<T> Drop for Flow<T> {
    fn drop(&mut self) {
        let mut n = self.buf.len() as u64;
        if let Some(src) = self.src.as_mut() {
            n += src.abandon();
        }
        self.pipeline.add_discarded(n);
    }
}

/// The source of a flow that has ended.
pub(crate) struct Ended;

impl<T> ChunkSource<T> for Ended {
    fn poll_chunk(&mut self, _: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        Poll::Ready(None)
    }

    fn abandon(&mut self) -> u64 {
        0
    }
}

/// Items a reader had already buffered, served before the rest.
struct Prepend<T> {
    first: Option<Chunk<T>>,
    inner: BoxSource<T>,
}

impl<T: Send> ChunkSource<T> for Prepend<T> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<T>>> {
        match self.first.take() {
            Some(chunk) => Poll::Ready(Some(chunk)),
            None => self.inner.poll_chunk(cx),
        }
    }

    fn abandon(&mut self) -> u64 {
        self.first.take().map_or(0, |c| c.len() as u64) + self.inner.abandon()
    }
}
