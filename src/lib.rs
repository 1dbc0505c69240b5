//! Channel-based stream-processing operators for tokio.
//!
//! A streamz pipeline is a chain of stages over a stream of
//! [`Result<T>`](Result) items. A failure is a value: the stage that could
//! not process an item sends a [`StreamError`] downstream that carries the
//! item, the stage's name and the cause, and every later stage passes it on
//! unchanged, so it can be routed to a dead-letter queue instead of killing
//! the pipeline. Every channel is bounded, so a slow consumer slows its
//! producers, and every item that enters a stage leaves it as an output, an
//! error carrying the item, or a counted drop.
//!
//! Between stages, items travel in chunks (see `docs/architecture.md`), which
//! makes a stage hop cost nanoseconds per item (`cargo bench --bench chain`;
//! figures in `docs/performance.md`); the API shows one item at a time.
//!
//! # Example
//!
//! ```
//! use streamz::{ErrorKind, Map, Stage};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let out = streamz::iter(["1", "2", "three", "4"])
//!     .try_map(|s: &&str| s.parse::<u64>())                   // fused, no task
//!     .pipe(Stage::new("square", Map::new(|n: &u64| n * n)))  // its own task
//!     .filter(|n: &u64| *n > 1)
//!     .collect()
//!     .await;
//!
//! assert_eq!(out.len(), 3);
//! assert_eq!(*out[0].as_ref().unwrap(), 4);
//! let mut err = out.into_iter().find_map(Result::err).unwrap();
//! assert_eq!(err.kind(), ErrorKind::Failed);
//! assert_eq!(err.stage(), "try_map");
//! assert_eq!(err.take_item::<&str>(), Some("three"));
//! # }
//! ```
//!
//! # Building blocks
//!
//! - Sources: [`iter`], [`stream`], [`try_stream`], [`channel`] (push with
//!   backpressure), or the same methods on an explicit [`Pipeline`].
//! - Stages: [`Flow::pipe`] with any [`Processor`]; [`Stage`] runs a
//!   per-item [`Step`] on its own task; [`Flow::map`], [`Flow::try_map`],
//!   [`Flow::filter`], [`Flow::tap`] and [`Flow::step`] fuse into the
//!   previous stage; [`merge`] and [`Flow::broadcast`] fan in and out;
//!   [`AsyncMapper`] runs an async function per item with bounded
//!   concurrency, timeouts and [`Retry`]; [`Throttle`] limits the rate;
//!   [`Batcher`] groups values into batches; [`DeadLetterQueue`] takes
//!   error items out of the stream into a sink (a channel, a closure, a
//!   durable file that [`dlq::Replay`] reads back); [`HealthGate`] stops
//!   taking input while a dependency is unhealthy. With the
//!   `circuit-breaker` feature (off by default; read the warnings in
//!   `breaker` first), `breaker::CircuitBreaker` guards a call per item.
//! - Sinks: [`Flow::collect`], [`Flow::for_each`], [`Flow::forward`], or use
//!   the [`Flow`] as a `futures::Stream`.
//! - Lifecycle and counters: [`Pipeline`].
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![forbid(unsafe_code)]

// The layers, each using only those above it: the transport core; flows,
// stages and the operator driver; the operators; the resilience operators
// (calls with timeouts and retries, dead letters, health gates, the
// breaker); connectors to external systems.
mod base;
mod connectors;
mod flow;
mod ops;
mod resilience;

pub use connectors::file;
#[cfg(feature = "kafka")]
pub use connectors::kafka;
#[cfg(feature = "circuit-breaker")]
pub use resilience::breaker;
pub use resilience::dlq;

pub use base::ack::{Ack, Receipt, SourcePosition};
pub use base::chunk::{Chunk, IntoIter as ChunkIntoIter};
pub use base::config::{ConfigError, EdgeConfig};
pub use base::counters::StageMetrics;
pub use base::error::{BoxError, ErrorKind, PanicError, Result, StreamError};
pub use flow::Flow;
pub use flow::pipeline::{Pipeline, PipelineBuilder, PipelineError, ShutdownReport, StagePanic};
pub use flow::processor::Processor;
pub use flow::source::{Pusher, PusherClosed, SendError, TrySendError};
pub use flow::stage::Stage;
pub use flow::step::{Emit, Item, Step};
pub use flow::topology::{EdgeQueue, StageKind, Topology, TopologyEdge, TopologyStage};
pub use ops::batcher::Batcher;
pub use ops::broadcast::{BranchPolicy, BranchStats, Broadcast};
pub use ops::buffer::Buffer;
pub use ops::debounce::Debounce;
pub use ops::dedupe::Dedupe;
pub use ops::filter::Filter;
pub use ops::map::{Map, TryMap};
pub use ops::merge::{Merge, merge};
pub use ops::par_map::{INLINE_BELOW, ParMap};
pub use ops::partition::Partition;
pub use ops::sample::Sample;
pub use ops::skip::Skip;
pub use ops::switch::{Routes, Switch};
pub use ops::take::Take;
pub use ops::tap::Tap;
pub use ops::throttle::Throttle;
pub use ops::unbatch::Unbatch;
pub use ops::window::{Session, Sliding, Tumbling, Window};
pub use resilience::async_mapper::{
    AsyncMapper, ConcurrencyLimit, DependencyDown, DependencySignal, TimeoutError,
};
pub use resilience::dlq::{DeadLetter, DeadLetterQueue};
#[cfg(feature = "http")]
pub use resilience::health::HttpProbe;
/// The gate's model-test hooks (only with `--cfg streamz_loom`).
#[cfg(streamz_loom)]
#[doc(hidden)]
pub use resilience::health::loom_hooks as gate_loom_hooks;
pub use resilience::health::{
    ClosedPolicy, GateError, GateHandle, GateState, GateStatus, Health, HealthCheck, HealthFn,
    HealthGate, health_fn,
};
pub use resilience::retry::{Jitter, Retry};

// The README's and the guides' examples are compiled and run as doc tests,
// so they cannot drift from the code.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/architecture.md")]
struct ArchitectureDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/errors-and-dlq.md")]
struct ErrorsAndDlqDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/health-gate.md")]
struct HealthGateDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/operators.md")]
struct OperatorsDoctests;

#[cfg(all(doctest, feature = "tower"))]
#[doc = include_str!("../docs/interop.md")]
struct InteropDoctests;

#[cfg(all(doctest, feature = "circuit-breaker"))]
#[doc = include_str!("../docs/circuit-breaker.md")]
struct CircuitBreakerDoctests;

#[cfg(all(doctest, feature = "kafka"))]
#[doc = include_str!("../docs/scaling.md")]
struct ScalingDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/recovery.md")]
struct RecoveryDoctests;

/// Without the `circuit-breaker` feature the crate has no breaker: neither
/// the module
///
/// ```compile_fail
/// use streamz::breaker::Breaker;
/// ```
///
/// nor the error kind.
///
/// ```compile_fail
/// let _ = streamz::ErrorKind::CircuitOpen;
/// ```
#[cfg(all(doctest, not(feature = "circuit-breaker")))]
struct NoBreakerWithoutTheFeature;

/// A flow of the iterator's items on a new [`Pipeline`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// assert_eq!(streamz::iter(0..3).collect().await.len(), 3);
/// # }
/// ```
pub fn iter<I>(items: I) -> Flow<I::Item>
where
    I: IntoIterator,
    I::IntoIter: Send + 'static,
    I::Item: Send + 'static,
{
    Pipeline::new().iter(items)
}

/// A flow of a `futures::Stream`'s items on a new [`Pipeline`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let s = futures::stream::iter(vec!["a", "b"]);
/// assert_eq!(streamz::stream(s).collect().await.len(), 2);
/// # }
/// ```
pub fn stream<S>(stream: S) -> Flow<S::Item>
where
    S: futures::Stream + Send + 'static,
    S::Item: Send + 'static,
{
    Pipeline::new().stream(stream)
}

/// A flow of a stream of `Result`s (some items may already be errors) on a
/// new [`Pipeline`].
///
/// ```
/// use streamz::StreamError;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let s = futures::stream::iter(vec![Ok(1), Err(StreamError::failed("reader", "bad frame"))]);
/// let out = streamz::try_stream(s).map(|x: &i32| x + 1).collect().await;
/// assert_eq!(*out[0].as_ref().unwrap(), 2);
/// assert_eq!(out[1].as_ref().unwrap_err().stage(), "reader");
/// # }
/// ```
pub fn try_stream<S, T>(stream: S) -> Flow<T>
where
    S: futures::Stream<Item = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    Pipeline::new().try_stream(stream)
}

/// A flow fed by the returned [`Pusher`] on a new [`Pipeline`]; see
/// [`Pipeline::channel`].
pub fn channel<T: Send + 'static>() -> (Pusher<T>, Flow<T>) {
    Pipeline::new().channel()
}
