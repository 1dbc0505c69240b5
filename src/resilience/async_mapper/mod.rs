//! [`AsyncMapper`]: an async function per item, with bounded concurrency,
//! ordering, a per-attempt timeout and retries.
//!
//! # How it runs
//!
//! One task owns `concurrency` slots. A slot holds an item, the future of
//! its current attempt and one timer (the attempt's time limit, or the
//! backoff before the next attempt); slots and their boxes are allocated
//! once and reused. The task's single loop polls the in-flight futures, the
//! input and the pending output send together, so futures keep running while
//! the output is full: a timeout measures the item's own execution, never
//! the time spent waiting for a slow consumer (the flaw of
//! `futures::StreamExt::buffered`, rust-lang/futures-rs#2387).
//!
//! In ordered mode the slots form a ring in arrival order and only the head
//! may leave, so a slow head item holds back at most `concurrency - 1`
//! finished ones: memory never grows with the length of the stream. Each
//! wake-up polls every busy slot, which is cheap for the small
//! concurrencies async I/O calls use (tens, not thousands).

mod adaptive;
mod hold;
mod machine;
mod slot;

pub use adaptive::ConcurrencyLimit;
pub use hold::DependencySignal;
pub use slot::DependencyDown;

use std::any::Any;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::base::chunk::IntoAcked;
use crate::base::config::{ConfigError, EdgeConfig, nonzero};
use crate::base::error::BoxError;
use crate::base::telemetry::MapperSeries;
use crate::flow::Flow;
use crate::flow::driver;
use crate::flow::processor::Processor;
use crate::resilience::retry::Retry;

use machine::Machine;
use slot::Policy;

pub(crate) type Predicate<E> = Arc<dyn Fn(&E) -> bool + Send + Sync>;

/// Marks the item, output and error types without owning any (so the
/// mapper's auto traits depend only on the function).
type Types<In, Out, E> = PhantomData<fn(&In) -> (Out, E)>;

/// The source of a [`TimedOut`](crate::ErrorKind::TimedOut) error: an attempt ran
/// longer than its time limit.
///
/// ```
/// use std::time::Duration;
/// use streamz::TimeoutError;
///
/// let e = TimeoutError::Attempt { limit: Duration::from_millis(50) };
/// assert_eq!(e.to_string(), "the attempt took longer than its 50ms timeout");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimeoutError {
    /// The per-attempt timeout ([`AsyncMapper::with_timeout`]) passed.
    #[error("the attempt took longer than its {limit:?} timeout")]
    Attempt {
        /// The timeout.
        limit: Duration,
    },
    /// The retry policy's total deadline ([`Retry::with_deadline`]) passed
    /// while an attempt was running.
    #[error("the item's {limit:?} retry deadline passed during an attempt")]
    Deadline {
        /// The deadline.
        limit: Duration,
    },
}

/// How many calls an [`AsyncMapper`] runs at once unless
/// [`with_concurrency`](AsyncMapper::with_concurrency) says otherwise (see
/// its "Default" section for why 16).
pub(crate) const DEFAULT_CONCURRENCY: usize = 16;

/// Runs an async function on each item, `concurrency` items at a time.
///
/// The function borrows the item and returns a future that owns what it
/// needs (clone out of the item before the `async move` block). The mapper
/// keeps the item itself: to retry it, and to hand it back inside the error
/// when the item finally fails, so nothing needs to be `Clone`.
///
/// # Default
///
/// - Concurrency: 16. Not the core count: the
///   calls an `AsyncMapper` makes wait on I/O, not on the CPU, so how many
///   run at once is a question about the dependency. Sixteen keeps a 10 ms
///   service at about 1,600 calls/s without flooding it; set
///   [`with_concurrency`](AsyncMapper::with_concurrency) to what yours
///   takes. (For CPU-bound work, the limit is the runtime's workers.)
/// - Ordered: outputs leave in input order, upstream errors keep their
///   position, as a stream promises and as per-key processing and
///   offset commits need. The price is head-of-line blocking: a slow call
///   holds back the finished calls behind it, and their slots. With 2,000
///   calls of 1 ms where every 50th takes 20 ms, at concurrency 16, ordered
///   took 3.1× as long as unordered (`cargo bench --bench async_mapper --
///   head_of_line`: 1.016 s against 0.324 s, both runtimes). When order
///   does not matter, [`unordered`](AsyncMapper::unordered) emits each item
///   as soon as it finishes.
/// - No timeout, no retries ([`with_retry`](AsyncMapper::with_retry)), every
///   error retryable once retries are on
///   ([`retry_if`](AsyncMapper::retry_if)).
/// - Named `async_mapper`; the output edge uses the pipeline's
///   [`EdgeConfig`].
///
/// # Validation
///
/// The constructor and setters never fail: the settings are checked when
/// the mapper is piped. A zero `concurrency` or `timeout`, an invalid
/// [`Retry`] (fields `retry.*`) or an explicit edge with a zero
/// (`edge.capacity`, `edge.max_chunk`) is refused then with a
/// [`ConfigError`] naming `AsyncMapper`, the stage and the field
/// ([`Flow::try_pipe`] returns it; [`Flow::pipe`] turns it into an error
/// item).
///
/// # Failures
///
/// An item whose last attempt fails becomes an error that carries the item
/// ([`StreamError::take_item`](crate::StreamError::take_item)), the number of attempts and the last error
/// as its source: kind [`Failed`](crate::ErrorKind::Failed) for an error the
/// function returned, [`TimedOut`](crate::ErrorKind::TimedOut) with a
/// [`TimeoutError`] source for a timeout, [`Panicked`](crate::ErrorKind::Panicked)
/// if the function or its future panicked (never retried).
///
/// # Shutdown
///
/// A graceful [`shutdown`](crate::Pipeline::shutdown) of the pipeline
/// stops retries, not work in flight. Attempts already running finish
/// normally, and items still arriving from upstream get their first
/// attempt (they drain like any accepted item), but no retry starts after
/// the shutdown: an item waiting its backoff ends at once, and an attempt
/// that fails afterwards is final. Such an item ends as if its retries
/// were exhausted: an error of its last failure's kind carrying the item,
/// its attempt count and that failure as the source, counted as `failed`.
/// So a mapper with many (or effectively unlimited) attempts always lets
/// the pipeline end. An [`abort`](crate::Pipeline::abort) drops what is
/// held instead (counted as `aborted`).
///
/// # Memory
///
/// At most `concurrency` items are in flight or finished and waiting for
/// their turn, plus the input chunk being admitted and the output chunk being
/// assembled (both at most the edge's `max_chunk`).
///
/// # Counters
///
/// `received`, `emitted`, `failed` (final failures), `errors_passed`,
/// `retries` (attempts made again: a retry that shutdown or an abort
/// cancels during its backoff is not counted) and `timeouts` (attempts that ran
/// out of time); `aborted` counts the items held when the pipeline aborts.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::{AsyncMapper, Retry};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// async fn lookup(id: u32) -> Result<String, std::io::Error> {
///     tokio::time::sleep(Duration::from_millis(10)).await;
///     Ok(format!("user-{id}"))
/// }
///
/// let enrich = AsyncMapper::new(|id: &u32| lookup(*id))
///     .with_concurrency(8)
///     .with_timeout(Duration::from_secs(1))
///     .with_retry(Retry::attempts(3));
/// let names = streamz::iter(1..=3).pipe(enrich).collect().await;
/// let names: Vec<String> = names.into_iter().map(Result::unwrap).collect();
/// assert_eq!(names, ["user-1", "user-2", "user-3"]);
/// # }
/// ```
pub struct AsyncMapper<In, Out, E, F> {
    name: Cow<'static, str>,
    f: F,
    concurrency: usize,
    /// Adaptive concurrency's bounds (`min`, `max`), if on.
    adaptive: Option<(usize, usize)>,
    overload: Option<Predicate<E>>,
    /// What [`ConcurrencyLimit`] handles read, made when one is asked for.
    limit_handle: OnceLock<Arc<AtomicUsize>>,
    ordered: bool,
    timeout: Option<Duration>,
    retry: Retry,
    retryable: Option<Predicate<E>>,
    edge: Option<EdgeConfig>,
    hold: Option<DependencySignal>,
    #[cfg(feature = "circuit-breaker")]
    pub(crate) breaker: crate::resilience::breaker::BreakerSettings<Out, E>,
    /// The operator named in configuration errors (`CircuitBreaker` for a
    /// mapper made by [`CircuitBreaker::new`](crate::breaker::CircuitBreaker::new)).
    pub(crate) operator: &'static str,
    _types: Types<In, Out, E>,
}

impl<In, Out, E, F> fmt::Debug for AsyncMapper<In, Out, E, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncMapper")
            .field("name", &self.name)
            .field("concurrency", &self.concurrency)
            .field("adaptive", &self.adaptive)
            .field("ordered", &self.ordered)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("edge", &self.edge)
            .field("hold", &self.hold)
            .finish_non_exhaustive()
    }
}

impl<In, Out, E, F, Fut> AsyncMapper<In, Out, E, F>
where
    F: Fn(&In) -> Fut,
    Fut: Future<Output = std::result::Result<Out, E>>,
{
    /// A mapper running `f` on each item.
    pub fn new(f: F) -> Self {
        AsyncMapper {
            name: Cow::Borrowed("async_mapper"),
            f,
            concurrency: DEFAULT_CONCURRENCY,
            adaptive: None,
            overload: None,
            limit_handle: OnceLock::new(),
            ordered: true,
            timeout: None,
            retry: Retry::default(),
            retryable: None,
            edge: None,
            hold: None,
            #[cfg(feature = "circuit-breaker")]
            breaker: Default::default(),
            operator: "AsyncMapper",
            _types: PhantomData,
        }
    }
}

#[cfg(feature = "tower")]
impl<Req> AsyncMapper<Req, (), (), ()>
where
    Req: Clone + Send + 'static,
{
    /// A mapper calling a [`tower::Service`] with each item (feature
    /// `tower`), so tower's layers (timeouts, rate limits, concurrency
    /// limits, load shedding, retries) wrap the call and the mapper's own
    /// settings (concurrency, order, timeout, retry) still apply around it.
    ///
    /// Each call takes a clone of the service and of the item, waits until
    /// the clone is ready, and calls it (tower's
    /// [`oneshot`](tower::ServiceExt::oneshot)). A layer whose state must be
    /// shared by all calls, such as `RateLimit`, therefore goes behind a
    /// `Buffer`, which hands every clone the same inner service; a
    /// `ConcurrencyLimit` shares its permits among its clones by itself.
    /// The service's error becomes the error item's source (a tower
    /// timeout's `Elapsed`, say: to the mapper a failed call of kind
    /// `failed`, not counted in `timeouts`, which count the mapper's own
    /// [`with_timeout`](AsyncMapper::with_timeout)), and the mapper's
    /// [`retry_if`](AsyncMapper::retry_if) sees it.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::AsyncMapper;
    /// use tower::ServiceBuilder;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let lookup = ServiceBuilder::new()
    ///     .timeout(Duration::from_secs(1))
    ///     .service_fn(|id: u32| async move { Ok::<_, std::io::Error>(format!("user-{id}")) });
    /// let names = streamz::iter(1..=3u32)
    ///     .pipe(AsyncMapper::from_service(lookup).with_concurrency(8))
    ///     .collect()
    ///     .await;
    /// let names: Vec<String> = names.into_iter().map(Result::unwrap).collect();
    /// assert_eq!(names, ["user-1", "user-2", "user-3"]);
    /// # }
    /// ```
    // The closure's type cannot be named (an alias of `impl Fn` is not
    // stable Rust), so the return type is spelled out.
    #[allow(clippy::type_complexity)]
    pub fn from_service<S>(
        service: S,
    ) -> AsyncMapper<
        Req,
        S::Response,
        S::Error,
        impl Fn(&Req) -> tower::util::Oneshot<S, Req> + Send + 'static,
    >
    where
        S: tower::Service<Req> + Clone + Send + 'static,
    {
        use tower::ServiceExt;
        AsyncMapper::new(move |req: &Req| service.clone().oneshot(req.clone()))
    }
}

impl<In, Out, E, F> AsyncMapper<In, Out, E, F> {
    /// How many items run at once: the bound on items in flight. Slots are
    /// created as items arrive, so a large limit costs memory only for the
    /// items actually in flight, never up front. Zero is refused when the
    /// mapper is piped ([`ConfigError`], field `concurrency`).
    ///
    /// ```
    /// use streamz::AsyncMapper;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let m = AsyncMapper::new(|x: &u8| std::future::ready(Ok::<_, std::io::Error>(*x)))
    ///     .with_concurrency(0)
    ///     .named("lookup");
    /// let err = streamz::iter([1u8]).try_pipe(m).unwrap_err();
    /// assert_eq!((err.operator(), err.stage(), err.field()), (Some("AsyncMapper"), Some("lookup"), "concurrency"));
    /// assert_eq!(err.to_string(), "AsyncMapper `lookup`: `concurrency` must be greater than zero");
    /// # }
    /// ```
    ///
    /// A fixed limit: it replaces an earlier
    /// [`with_adaptive_concurrency`](AsyncMapper::with_adaptive_concurrency).
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self.adaptive = None;
        self
    }

    /// A limit that finds the dependency's capacity by itself, between
    /// `min` and `max` items at once, instead of a fixed concurrency. For
    /// a dependency that slows down as it is loaded, or sheds load with
    /// errors, and whose capacity is unknown or changes.
    ///
    /// The limit starts at `min`. The mapper cuts time into windows of one
    /// typical call and, at the end of each (additive increase,
    /// multiplicative decrease, as TCP does and as Vector's adaptive
    /// request concurrency and Netflix's concurrency-limits do):
    ///
    /// - cuts the limit to 90 % (at least by one, never below `min`) if a
    ///   call in the window was an overload, or if the window's successful
    ///   calls were slower on average than the baseline (the fastest of
    ///   the last 100 windows: the latency without load) by more than 5 %
    ///   plus 2.5 standard errors of the window's mean, from the spread of
    ///   its calls (so that latency that jitters by chance is not taken
    ///   for load): the dependency is queueing;
    /// - otherwise raises it by one (up to `max`) if the window filled the
    ///   limit: there was demand for more, and more did not hurt;
    /// - keeps it otherwise.
    ///
    /// A window is about one call's time and at least a limit's worth (two
    /// at least) of successful calls that began at the current limit (an
    /// overload ends it early).
    ///
    /// An overload is an attempt's timeout
    /// ([`with_timeout`](AsyncMapper::with_timeout); not the item's retry
    /// deadline) or an error [`overload_if`](AsyncMapper::overload_if)
    /// marks (an HTTP 429 or 503, say). Other errors say nothing either
    /// way; only successful calls' latencies are compared. So the limit
    /// climbs by about one per call time while the dependency keeps up,
    /// and settles near the knee where its latency starts to grow. While
    /// every call fails with an error that is not an overload, the limit
    /// stays where it is: mark the dependency's "too busy" errors.
    ///
    /// The limit bounds what the mapper holds, as a fixed concurrency
    /// does: calls, backoffs, held items and, when ordered, finished items
    /// waiting for their turn. When it falls, no item is cancelled: new
    /// ones wait until enough have left. Read it with
    /// [`concurrency_limit`](AsyncMapper::concurrency_limit), or as the
    /// gauge `streamz_async_mapper_concurrency_limit` (feature `metrics`).
    ///
    /// `min` must be at least 1 and `max` at least `min`, checked when the
    /// mapper is piped ([`ConfigError`], fields `adaptive_concurrency.min`
    /// and `adaptive_concurrency.max`). A later
    /// [`with_concurrency`](AsyncMapper::with_concurrency) makes the limit
    /// fixed again.
    ///
    /// # Examples
    ///
    /// A dependency that answers 503 when more than 8 calls reach it: the
    /// limit climbs, meets the 503s, and stays near 8.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::time::Duration;
    /// use streamz::{AsyncMapper, Retry};
    ///
    /// #[derive(Debug, thiserror::Error)]
    /// #[error("HTTP {0}")]
    /// struct Status(u16);
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let calls = Arc::new(AtomicUsize::new(0));
    /// let active = calls.clone();
    /// let mapper = AsyncMapper::new(move |id: &u32| {
    ///     let active = active.clone();
    ///     let id = *id;
    ///     async move {
    ///         let now = active.fetch_add(1, Ordering::SeqCst) + 1;
    ///         tokio::time::sleep(Duration::from_millis(10)).await;
    ///         active.fetch_sub(1, Ordering::SeqCst);
    ///         if now > 8 { Err(Status(503)) } else { Ok(id) }
    ///     }
    /// })
    /// .with_adaptive_concurrency(1, 64)
    /// .overload_if(|e: &Status| matches!(e.0, 429 | 503))
    /// .with_retry(Retry::attempts(10));
    /// let limit = mapper.concurrency_limit();
    /// let out = streamz::iter(0..2_000u32).pipe(mapper).collect().await;
    /// assert!(out.iter().all(Result::is_ok));
    /// assert!((4..=9).contains(&limit.get()), "{}", limit.get());
    /// # }
    /// ```
    pub fn with_adaptive_concurrency(mut self, min: usize, max: usize) -> Self {
        self.adaptive = Some((min, max));
        self.concurrency = max;
        self
    }

    /// Marks the errors that mean the dependency is overloaded (an HTTP
    /// 429 or 503, a "too many connections"): each cuts an adaptive limit
    /// ([`with_adaptive_concurrency`](AsyncMapper::with_adaptive_concurrency)),
    /// as a timeout does. Without it, no error is an overload. The
    /// predicate is asked only with an adaptive limit; one that panics
    /// fails the item as [`Panicked`](crate::ErrorKind::Panicked).
    pub fn overload_if<P>(mut self, overload: P) -> Self
    where
        P: Fn(&E) -> bool + Send + Sync + 'static,
    {
        self.overload = Some(Arc::new(overload));
        self
    }

    /// A handle on the mapper's concurrency limit, to read while it runs:
    /// the fixed concurrency, or where an adaptive limit stands.
    ///
    /// ```
    /// use streamz::AsyncMapper;
    ///
    /// let mapper = AsyncMapper::new(|x: &u32| std::future::ready(Ok::<_, std::io::Error>(*x)))
    ///     .with_concurrency(8);
    /// assert_eq!(mapper.concurrency_limit().get(), 8);
    /// ```
    pub fn concurrency_limit(&self) -> ConcurrencyLimit {
        let start = self.adaptive.map_or(self.concurrency, |(min, _)| min);
        let handle = self
            .limit_handle
            .get_or_init(|| Arc::new(AtomicUsize::new(start)));
        handle.store(start, Ordering::Relaxed);
        ConcurrencyLimit(handle.clone())
    }

    /// Emits each item as soon as it finishes instead of in input order.
    /// Upstream errors are passed on as they arrive.
    pub fn unordered(mut self) -> Self {
        self.ordered = false;
        self
    }

    /// Limits each attempt to `timeout`, measured from the moment the
    /// attempt starts; an attempt that takes longer is cancelled (its future
    /// dropped) and counts as a [`TimedOut`](crate::ErrorKind::TimedOut) failure.
    ///
    /// `Duration::MAX` means no limit (the default), as does any limit that
    /// would end beyond what the clock can represent. Zero is refused when
    /// the mapper is piped ([`ConfigError`], field `timeout`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::AsyncMapper;
    ///
    /// // No time limit: the same as not calling `with_timeout`.
    /// let m = AsyncMapper::new(|x: &u8| std::future::ready(Ok::<_, std::io::Error>(*x)))
    ///     .with_timeout(Duration::MAX);
    /// ```
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = (timeout != Duration::MAX).then_some(timeout);
        self
    }

    /// Retries failed attempts by `retry`, whose settings are checked
    /// when the mapper is piped ([`Retry::validate`]; fields `retry.*`).
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Decides which errors are worth another attempt (all are by default).
    /// Timeouts follow [`Retry::with_timeouts_retried`] instead; a predicate that
    /// panics fails the item as [`Panicked`](crate::ErrorKind::Panicked).
    ///
    /// ```
    /// use std::io;
    /// use streamz::{AsyncMapper, Retry};
    ///
    /// let m = AsyncMapper::new(|x: &u32| std::future::ready(Ok::<u32, io::Error>(*x)))
    ///     .with_retry(Retry::attempts(3))
    ///     .retry_if(|e: &io::Error| e.kind() != io::ErrorKind::InvalidInput);
    /// ```
    pub fn retry_if<P>(mut self, retryable: P) -> Self
    where
        P: Fn(&E) -> bool + Send + Sync + 'static,
    {
        self.retryable = Some(Arc::new(retryable));
        self
    }

    /// Holds calls and retries while `signal` says the dependency is down,
    /// instead of spending attempts on it: an item that arrives, or whose
    /// backoff ends, while it is down keeps its slot (and its place, when
    /// ordered) and starts its attempt once the signal says up. Attempts
    /// already running go on. The slots fill, and upstream feels
    /// backpressure, so nothing piles up.
    ///
    /// The signal is a [`GateHandle`](crate::GateHandle) (the gate at the
    /// ingress already probes the dependency: with this, the items past it
    /// wait too), a `watch` channel of [`Health`](crate::Health) or `bool`,
    /// a [`Breaker`], or any stream of health
    /// answers ([`DependencySignal`]).
    ///
    /// A retry deadline ([`Retry::with_deadline`]) keeps running while an
    /// item is held: a held retry ends at its deadline with the failure it
    /// was retrying, and no call is made after it. (The deadline counts
    /// from the first attempt: an item held before its first has none
    /// yet.) The attempt count does
    /// not grow while held. On a graceful
    /// [`shutdown`](crate::Pipeline::shutdown) a held item ends at once: a
    /// held retry with the failure it was retrying, an item never tried
    /// with a `gate_closed` error whose source is a [`DependencyDown`] (and
    /// no attempt counted); both carry the item, so a dead-letter queue
    /// keeps it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::{AsyncMapper, Health, Retry};
    /// use tokio::sync::watch;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let (health, signal) = watch::channel(Health::unhealthy("failover"));
    /// let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    /// let counted = calls.clone();
    /// let lookup = AsyncMapper::new(move |id: &u32| {
    ///     counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ///     std::future::ready(Ok::<_, std::io::Error>(*id))
    /// })
    /// .with_retry(Retry::attempts(3))
    /// .hold_while_down(signal);
    /// let mut out = streamz::iter(1..=3u32).pipe(lookup);
    /// tokio::time::sleep(Duration::from_secs(5)).await;
    /// assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 0); // held, no attempt spent
    /// health.send(Health::Healthy).unwrap();
    /// let out: Vec<u32> = out.collect().await.into_iter().map(Result::unwrap).collect();
    /// assert_eq!(out, [1, 2, 3]);
    /// # }
    /// ```
    ///
    #[cfg_attr(
        feature = "circuit-breaker",
        doc = "[`Breaker`]: crate::breaker::Breaker"
    )]
    #[cfg_attr(not(feature = "circuit-breaker"), doc = "[`Breaker`]: crate")]
    pub fn hold_while_down(mut self, signal: impl Into<DependencySignal>) -> Self {
        self.hold = Some(signal.into());
        self
    }

    crate::flow::processor::name_and_edge!("Sets the stage's output edge.");

    /// Checks the settings, naming no operator: the concurrency, the
    /// timeout, the retry policy, an explicit edge and a breaker's
    /// configuration.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        match self.adaptive {
            None => nonzero(self.concurrency, "concurrency")?,
            Some((min, max)) => {
                nonzero(min, "adaptive_concurrency.min")?;
                if max < min {
                    return Err(ConfigError::new(
                        "adaptive_concurrency.max",
                        format!("must be at least `min` ({min}), is {max}"),
                    ));
                }
            }
        }
        if let Some(timeout) = self.timeout {
            nonzero(timeout, "timeout")?;
        }
        self.retry.validate()?;
        self.edge.map_or(Ok(()), |e| e.validate())?;
        #[cfg(feature = "circuit-breaker")]
        if let Some(breaker) = &self.breaker.breaker {
            breaker.validate()?;
        }
        Ok(())
    }
}

impl<In, Out, E, F, Fut> Processor<In, Out> for AsyncMapper<In, Out, E, F>
where
    In: Send + 'static,
    Out: Send + 'static,
    E: Into<BoxError> + Send + 'static,
    F: Fn(&In) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<Out, E>> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.check()
            .map_err(|e| e.in_stage(self.operator, &self.name))
    }

    #[cfg_attr(not(feature = "circuit-breaker"), allow(unused_mut))]
    fn process(mut self, input: Flow<In>) -> Flow<Out> {
        #[cfg(feature = "circuit-breaker")]
        if let Some(breaker) = self.breaker.breaker.take() {
            return crate::resilience::breaker::spawn(self, breaker, input);
        }
        self.spawn_guarded(input, Unguarded)
    }
}

impl<In, Out, E, F, Fut> AsyncMapper<In, Out, E, F>
where
    In: Send + 'static,
    Out: Send + 'static,
    E: Into<BoxError> + Send + 'static,
    F: Fn(&In) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<Out, E>> + Send + 'static,
{
    /// Runs the mapper with `guard` asked before every attempt.
    pub(crate) fn spawn_guarded<G: Guard>(mut self, input: Flow<In>, guard: G) -> Flow<Out> {
        let c = self.concurrency.max(1);
        let edge = self.edge.unwrap_or(input.pipeline().edge());
        let shared = self
            .limit_handle
            .take()
            .unwrap_or_else(|| Arc::new(AtomicUsize::new(c)));
        let adaptive = match self.adaptive {
            Some((min, max)) => Some(adaptive::Controller::new(min, max, shared)),
            None => {
                shared.store(c, Ordering::Relaxed);
                None
            }
        };
        let machine = Machine {
            policy: Policy {
                shutting_down: false,
                rng: self.retry.rng(),
                f: self.f,
                guard,
                hold: self.hold.take(),
                timeout: self.timeout,
                retry: self.retry,
                retryable: self.retryable,
                adaptive,
                overload: self.overload,
                stage: Arc::from(self.name.as_ref()),
                retries: 0,
                timeouts: 0,
                series: MapperSeries::default(),
            },
            slots: Vec::new(),
            free: Vec::new(),
            limit: c,
            order: VecDeque::new(),
            ordered: self.ordered,
            finished: 0,
            exported_busy: 0,
            pending: IntoAcked::default(),
            max_chunk: edge.max_chunk(),
        };
        driver::spawn_with(input, &self.name, Some(edge), |_, counters| {
            let mut machine = machine;
            machine.policy.series = MapperSeries::new(&counters.labels());
            let gauge = machine.policy.series.limit.clone();
            match &mut machine.policy.adaptive {
                Some(adaptive) => adaptive.export(gauge),
                None => gauge.set(machine.limit as f64),
            }
            machine
        })
    }
}

/// Asked before each attempt and told how it ended: how a circuit breaker
/// does its bookkeeping inside the mapper's task, instead of in a future
/// per item around the call.
pub(crate) trait Guard: Send + 'static {
    /// What a slot holds while its attempt runs.
    type Token: Send;

    /// Asks to start an attempt, putting its token in `token` (in place:
    /// a token moved out through a return value costs a stall per item).
    /// A refusal fails the item without calling the function (and without
    /// retries); its kind comes from the error's type as for the
    /// function's own errors. `Pending` holds the attempt back (the item
    /// keeps its slot) until `cx` is woken; while `stopping` (a graceful
    /// shutdown) a guard refuses instead of holding.
    fn poll_admit(
        &mut self,
        cx: &mut Context<'_>,
        token: &mut Option<Self::Token>,
        stopping: bool,
    ) -> Poll<std::result::Result<(), BoxError>>;

    /// Whether [`judge`](Guard::judge) has anything to say (a classifier):
    /// if not, the mapper settles a value as a success and an error as a
    /// failure without asking.
    #[inline]
    fn judges(&self) -> bool {
        false
    }

    /// How an attempt's result counts: a value is a success and an error
    /// a failure unless the guard says otherwise (a breaker's classifier).
    /// The result's types are the mapper's output and error types.
    fn judge(&self, result: std::result::Result<&dyn Any, &dyn Any>) -> Verdict {
        match result {
            Ok(_) => Verdict::Success,
            Err(_) => Verdict::Failure,
        }
    }

    /// The attempt ended: with a value, an error, a panic or a timeout (a
    /// failure), as judged.
    fn settle(&mut self, token: Self::Token, verdict: Verdict);

    /// The attempt ended without an outcome: an abort, a panic before the
    /// call.
    fn cancel(&mut self, token: Self::Token);

    /// The task is about to wait or end: report anything kept back.
    fn flush(&mut self);
}

/// How an attempt's end counts for a [`Guard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Success,
    Failure,
    /// Neither (a breaker's ignored outcome).
    #[cfg_attr(not(feature = "circuit-breaker"), allow(dead_code))]
    Ignored,
}

/// No guard: every attempt starts.
pub(crate) struct Unguarded;

impl Guard for Unguarded {
    type Token = ();

    fn poll_admit(
        &mut self,
        _cx: &mut Context<'_>,
        token: &mut Option<()>,
        _stopping: bool,
    ) -> Poll<std::result::Result<(), BoxError>> {
        *token = Some(());
        Poll::Ready(Ok(()))
    }

    fn settle(&mut self, (): (), _verdict: Verdict) {}

    fn cancel(&mut self, (): ()) {}

    fn flush(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ready = std::future::Ready<Result<u8, std::io::Error>>;

    fn mapper() -> AsyncMapper<u8, u8, std::io::Error, impl Fn(&u8) -> Ready> {
        AsyncMapper::new(|x: &u8| std::future::ready(Ok(*x))).named("lookup")
    }

    fn refused<P: Processor<u8, u8>>(p: P) -> (Option<&'static str>, Option<String>, &'static str) {
        let err = crate::iter([1u8]).try_pipe(p).map(drop).unwrap_err();
        (err.operator(), err.stage().map(str::to_owned), err.field())
    }

    #[test]
    fn valid_settings_pass() {
        let m = mapper()
            .with_concurrency(1)
            .with_timeout(Duration::MAX)
            .with_retry(Retry::attempts(3))
            .with_edge(EdgeConfig::new(1, 1));
        assert_eq!(Processor::validate(&m), Ok(()));
    }

    #[test]
    fn invalid_settings_are_refused_when_piped() {
        let at = |field| (Some("AsyncMapper"), Some("lookup".to_owned()), field);
        assert_eq!(refused(mapper().with_concurrency(0)), at("concurrency"));
        assert_eq!(
            refused(mapper().with_timeout(Duration::ZERO)),
            at("timeout")
        );
        assert_eq!(
            refused(mapper().with_retry(Retry::attempts(0))),
            at("retry.max_attempts")
        );
        assert_eq!(
            refused(mapper().with_retry(Retry::attempts(2).with_factor(0.0))),
            at("retry.factor")
        );
        assert_eq!(
            refused(mapper().with_retry(Retry::attempts(2).with_deadline(Duration::ZERO))),
            at("retry.deadline")
        );
        assert_eq!(
            refused(mapper().with_edge(EdgeConfig::new(0, 1))),
            at("edge.capacity")
        );
        let err = Processor::validate(&mapper().with_concurrency(0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "AsyncMapper `lookup`: `concurrency` must be greater than zero"
        );
    }
}
