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

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, poll_fn};
use std::marker::PhantomData;
use std::num::NonZeroUsize;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::future::{Fuse, FusedFuture, FutureExt};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::chunk::{Chunk, IntoIter as ChunkIter};
use crate::config::{ConfigError, EdgeConfig};
use crate::counters::Local;
use crate::error::{BoxError, ErrorKind, Result, StreamError};
use crate::flow::Flow;
use crate::processor::Processor;
use crate::retry::Retry;
use crate::stage::{TaskIo, spawn_operator};
use crate::time;

type Predicate<E> = Arc<dyn Fn(&E) -> bool + Send + Sync>;

/// Marks the item, output and error types without owning any (so the
/// mapper's auto traits depend only on the function).
type Types<In, Out, E> = PhantomData<fn(&In) -> (Out, E)>;

/// The source of a [`TimedOut`](ErrorKind::TimedOut) error: an attempt ran
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

/// Runs an async function on each item, `concurrency` items at a time.
///
/// The function borrows the item and returns a future that owns what it
/// needs (clone out of the item before the `async move` block). The mapper
/// keeps the item itself: to retry it, and to hand it back inside the error
/// when the item finally fails, so nothing needs to be `Clone`.
///
/// # Default
///
/// - Concurrency: the machine's available parallelism.
/// - Ordered: outputs leave in input order, upstream errors keep their
///   position. [`unordered`](AsyncMapper::unordered) emits each item as soon
///   as it finishes.
/// - No timeout, no retries ([`with_retry`](AsyncMapper::with_retry)), every
///   error retryable once retries are on
///   ([`retry_if`](AsyncMapper::retry_if)).
/// - Named `async_mapper`; the output edge uses the pipeline's
///   [`EdgeConfig`].
///
/// # Failures
///
/// An item whose last attempt fails becomes an error that carries the item
/// ([`StreamError::take_item`]), the number of attempts and the last error
/// as its source: kind [`Failed`](ErrorKind::Failed) for an error the
/// function returned, [`TimedOut`](ErrorKind::TimedOut) with a
/// [`TimeoutError`] source for a timeout, [`Panicked`](ErrorKind::Panicked)
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
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), streamz::ConfigError> {
/// async fn lookup(id: u32) -> Result<String, std::io::Error> {
///     tokio::time::sleep(Duration::from_millis(10)).await;
///     Ok(format!("user-{id}"))
/// }
///
/// let enrich = AsyncMapper::new(|id: &u32| lookup(*id))
///     .with_concurrency(8)?
///     .with_timeout(Duration::from_secs(1))?
///     .with_retry(Retry::attempts(3)?);
/// let names = streamz::iter(1..=3).pipe(enrich).collect().await;
/// let names: Vec<String> = names.into_iter().map(Result::unwrap).collect();
/// assert_eq!(names, ["user-1", "user-2", "user-3"]);
/// # Ok(()) }
/// ```
pub struct AsyncMapper<In, Out, E, F> {
    name: Cow<'static, str>,
    f: F,
    concurrency: NonZeroUsize,
    ordered: bool,
    timeout: Option<Duration>,
    retry: Retry,
    retryable: Option<Predicate<E>>,
    edge: Option<EdgeConfig>,
    _types: Types<In, Out, E>,
}

impl<In, Out, E, F> fmt::Debug for AsyncMapper<In, Out, E, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncMapper")
            .field("name", &self.name)
            .field("concurrency", &self.concurrency)
            .field("ordered", &self.ordered)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("edge", &self.edge)
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
        let parallelism = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
        AsyncMapper {
            name: Cow::Borrowed("async_mapper"),
            f,
            concurrency: parallelism,
            ordered: true,
            timeout: None,
            retry: Retry::default(),
            retryable: None,
            edge: None,
            _types: PhantomData,
        }
    }
}

impl<In, Out, E, F> AsyncMapper<In, Out, E, F> {
    /// How many items run at once.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] if `concurrency` is zero.
    ///
    /// ```
    /// use streamz::{AsyncMapper, ConfigError};
    ///
    /// let m = AsyncMapper::new(|x: &u8| std::future::ready(Ok::<_, ConfigError>(*x)));
    /// assert_eq!(m.with_concurrency(0).unwrap_err(), ConfigError::Zero { field: "concurrency" });
    /// ```
    pub fn with_concurrency(mut self, concurrency: usize) -> Result<Self, ConfigError> {
        self.concurrency = NonZeroUsize::new(concurrency).ok_or(ConfigError::Zero {
            field: "concurrency",
        })?;
        Ok(self)
    }

    /// Emits each item as soon as it finishes instead of in input order.
    /// Upstream errors are passed on as they arrive.
    pub fn unordered(mut self) -> Self {
        self.ordered = false;
        self
    }

    /// Limits each attempt to `timeout`, measured from the moment the
    /// attempt starts; an attempt that takes longer is cancelled (its future
    /// dropped) and counts as a [`TimedOut`](ErrorKind::TimedOut) failure.
    ///
    /// `Duration::MAX` means no limit (the default), as does any limit that
    /// would end beyond what the clock can represent.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] if `timeout` is zero.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::AsyncMapper;
    ///
    /// // No time limit: the same as not calling `with_timeout`.
    /// let m = AsyncMapper::new(|x: &u8| std::future::ready(Ok::<_, std::io::Error>(*x)))
    ///     .with_timeout(Duration::MAX)?;
    /// # Ok::<(), streamz::ConfigError>(())
    /// ```
    pub fn with_timeout(mut self, timeout: Duration) -> Result<Self, ConfigError> {
        if timeout.is_zero() {
            return Err(ConfigError::Zero { field: "timeout" });
        }
        self.timeout = (timeout != Duration::MAX).then_some(timeout);
        Ok(self)
    }

    /// Retries failed attempts by `retry`.
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Decides which errors are worth another attempt (all are by default).
    /// Timeouts follow [`Retry::retry_timeouts`] instead; a predicate that
    /// panics fails the item as [`Panicked`](ErrorKind::Panicked).
    ///
    /// ```
    /// use std::io;
    /// use streamz::{AsyncMapper, Retry};
    ///
    /// # fn main() -> Result<(), streamz::ConfigError> {
    /// let m = AsyncMapper::new(|x: &u32| std::future::ready(Ok::<u32, io::Error>(*x)))
    ///     .with_retry(Retry::attempts(3)?)
    ///     .retry_if(|e: &io::Error| e.kind() != io::ErrorKind::InvalidInput);
    /// # Ok(()) }
    /// ```
    pub fn retry_if<P>(mut self, retryable: P) -> Self
    where
        P: Fn(&E) -> bool + Send + Sync + 'static,
    {
        self.retryable = Some(Arc::new(retryable));
        self
    }

    /// Names the stage (for counters, spans and errors).
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the stage's output edge.
    pub fn with_edge(mut self, edge: EdgeConfig) -> Self {
        self.edge = Some(edge);
        self
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

    fn process(self, input: Flow<In>) -> Flow<Out> {
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
    pub(crate) fn spawn_guarded<G: Guard>(self, input: Flow<In>, guard: G) -> Flow<Out> {
        let c = self.concurrency.get();
        let shutdown = input.pipeline().shutdown_token();
        spawn_operator(input, &self.name, self.edge, |io| {
            let machine = Machine {
                policy: Policy {
                    shutdown: Shutdown::new(shutdown),
                    rng: self.retry.rng(),
                    f: self.f,
                    guard,
                    timeout: self.timeout,
                    retry: self.retry,
                    retryable: self.retryable,
                    stage: io.counters.name().clone(),
                    local: Local::default(),
                },
                slots: (0..c).map(|_| Slot::new()).collect(),
                free: (0..c).rev().collect(),
                order: VecDeque::with_capacity(c),
                ordered: self.ordered,
                finished: 0,
            };
            run(io, machine)
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
    /// function's own errors.
    fn admit(&mut self, token: &mut Option<Self::Token>) -> std::result::Result<(), BoxError>;

    /// The attempt ended with a value (`ok`) or an error (or a panic).
    fn settle(&mut self, token: Self::Token, ok: bool);

    /// The attempt ended without an outcome: a timeout, an abort.
    fn cancel(&mut self, token: Self::Token);

    /// The task is about to wait or end: report anything kept back.
    fn flush(&mut self);
}

/// No guard: every attempt starts.
pub(crate) struct Unguarded;

impl Guard for Unguarded {
    type Token = ();

    fn admit(&mut self, token: &mut Option<()>) -> std::result::Result<(), BoxError> {
        *token = Some(());
        Ok(())
    }

    fn settle(&mut self, (): (), _ok: bool) {}

    fn cancel(&mut self, (): ()) {}

    fn flush(&mut self) {}
}

/// What a slot is doing.
enum Phase<Out> {
    Free,
    /// An attempt's future is running.
    Running,
    /// Waiting for the backoff timer before the next attempt.
    Backoff,
    /// The outcome, waiting to be emitted.
    Done(Outcome<Out>),
}

enum Outcome<Out> {
    Value(Out),
    /// A failure this stage produced.
    Failed(StreamError),
    /// An upstream error, passed on unchanged.
    Passed(StreamError),
}

/// One unit of concurrency, reused item after item.
struct Slot<In, Out, E, Fut, T> {
    item: Option<In>,
    /// While the slot waits its backoff: the failure it retries, which
    /// becomes the item's final error if shutdown ends the wait.
    last: Option<Failure<E>>,
    /// The guard's token for the running attempt.
    token: Option<T>,
    fut: Pin<Box<Option<Fut>>>,
    /// The running attempt's time limit, or the backoff.
    timer: time::Timer,
    attempts: u32,
    first_start: Option<Instant>,
    /// When the item's first attempt failed, by the wall clock (for the
    /// error's record when a retry does not save it).
    first_failure: Option<SystemTime>,
    phase: Phase<Out>,
}

impl<In, Out, E, Fut, T> Slot<In, Out, E, Fut, T> {
    fn new() -> Self {
        Slot {
            item: None,
            last: None,
            token: None,
            fut: Box::pin(None),
            timer: time::Timer::new(),
            attempts: 0,
            first_start: None,
            first_failure: None,
            phase: Phase::Free,
        }
    }

    fn busy(&self) -> bool {
        matches!(self.phase, Phase::Running | Phase::Backoff)
    }
}

/// What every slot shares: the function, the policies and the counts of the
/// chunk in progress.
struct Policy<F, E, G> {
    f: F,
    guard: G,
    shutdown: Shutdown,
    timeout: Option<Duration>,
    retry: Retry,
    retryable: Option<Predicate<E>>,
    rng: fastrand::Rng,
    stage: Arc<str>,
    local: Local,
}

/// The pipeline's graceful shutdown as retries see it. It is looked at
/// only where a retry is scheduled or waits its backoff, never per item:
/// the token's check takes a lock.
struct Shutdown {
    token: CancellationToken,
    /// Polled only while a slot waits its backoff (allocated once).
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
    seen: bool,
}

impl Shutdown {
    fn new(token: CancellationToken) -> Self {
        Shutdown {
            wait: Box::pin(token.clone().cancelled_owned()),
            token,
            seen: false,
        }
    }

    /// Whether shutdown was requested.
    fn requested(&mut self) -> bool {
        if !self.seen {
            self.seen = self.token.is_cancelled();
        }
        self.seen
    }

    /// Whether shutdown was requested; if not, `cx` is woken when it is.
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.seen {
            self.seen = self.wait.as_mut().poll(cx).is_ready();
        }
        self.seen
    }
}

/// Why an attempt failed.
enum Failure<E> {
    Error(E),
    TimedOut(TimeoutError),
}

impl<F, E, G: Guard> Policy<F, E, G> {
    fn stage(&self) -> String {
        self.stage.to_string()
    }

    /// Starts the next attempt of the slot's item.
    fn start<In, Out, Fut>(&mut self, slot: &mut Slot<In, Out, E, Fut, G::Token>)
    where
        In: Send + 'static,
        F: Fn(&In) -> Fut,
    {
        let item = slot.item.as_ref().expect("a started slot holds its item");
        slot.attempts += 1;
        if let Err(refused) = self.guard.admit(&mut slot.token) {
            let err = StreamError::new(kind_of(&*refused), self.stage()).with_source(refused);
            self.fail(slot, err);
            return;
        }
        match catch_unwind(AssertUnwindSafe(|| (self.f)(item))) {
            Ok(fut) => slot.fut.as_mut().set(Some(fut)),
            Err(payload) => {
                self.end_attempt(slot, None);
                let err = StreamError::panicked(&self.stage, payload);
                self.fail(slot, err);
                return;
            }
        }
        slot.phase = Phase::Running;
        if self.timeout.is_none() && self.retry.deadline.is_none() {
            slot.timer.set(None);
            return;
        }
        let now = Instant::now();
        let first = *slot.first_start.get_or_insert(now);
        slot.timer.set(time::earliest(
            self.timeout.and_then(|t| time::after(now, t)),
            self.retry.deadline.and_then(|d| time::after(first, d)),
        ));
    }

    /// Ends the item with a failure of this stage.
    fn fail<In, Out, Fut>(&mut self, slot: &mut Slot<In, Out, E, Fut, G::Token>, err: StreamError)
    where
        In: Send + 'static,
    {
        let mut err = err.with_attempts(slot.attempts);
        if let Some(first) = slot.first_failure.take() {
            err = err.with_first_time(first);
        }
        if let Some(item) = slot.item.take() {
            err = err.with_item(item);
        }
        slot.phase = Phase::Done(Outcome::Failed(err));
    }

    /// An attempt failed: retry after a backoff, or give up.
    fn failed<In, Out, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        failure: Failure<E>,
    ) where
        In: Send + 'static,
        E: Into<BoxError>,
    {
        let retryable = match &failure {
            Failure::Error(e) => match &self.retryable {
                None => true,
                Some(p) => match catch_unwind(AssertUnwindSafe(|| p(e))) {
                    Ok(r) => r,
                    Err(payload) => {
                        let err = StreamError::panicked(&self.stage, payload);
                        return self.fail(slot, err);
                    }
                },
            },
            Failure::TimedOut(TimeoutError::Attempt { .. }) => self.retry.retry_timeouts,
            Failure::TimedOut(TimeoutError::Deadline { .. }) => false,
        };
        if retryable && slot.attempts < self.retry.max_attempts.get() {
            slot.first_failure.get_or_insert_with(SystemTime::now);
            // No retry is scheduled after shutdown (checked here, on the
            // retry path only).
            if !self.shutdown.requested() {
                if let Some(at) = self.retry_at(slot) {
                    slot.timer.set(Some(at));
                    slot.last = Some(failure);
                    slot.phase = Phase::Backoff;
                    return;
                }
            }
        }
        self.give_up(slot, failure);
    }

    /// When the slot's next attempt starts, if it can: not if the delay
    /// never ends, nor at or after the item's deadline.
    fn retry_at<In, Out, Fut>(
        &mut self,
        slot: &Slot<In, Out, E, Fut, G::Token>,
    ) -> Option<Instant> {
        let delay = self.retry.delay(slot.attempts, &mut self.rng);
        let at = time::after(Instant::now(), delay)?;
        match (self.retry.deadline, slot.first_start) {
            (Some(d), Some(first)) => time::after(first, d)
                .is_none_or(|end| at < end)
                .then_some(at),
            _ => Some(at),
        }
    }

    /// Ends the item with `failure` as its final error.
    fn give_up<In, Out, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        failure: Failure<E>,
    ) where
        In: Send + 'static,
        E: Into<BoxError>,
    {
        let err = match failure {
            Failure::Error(e) => {
                let source: BoxError = e.into();
                StreamError::new(kind_of(&*source), self.stage()).with_source(source)
            }
            Failure::TimedOut(t) => {
                StreamError::new(ErrorKind::TimedOut, self.stage()).with_source(t)
            }
        };
        self.fail(slot, err);
    }

    /// Drives a busy slot as far as it goes; true once it is done.
    fn poll<In, Out, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        cx: &mut Context<'_>,
    ) -> bool
    where
        In: Send + 'static,
        E: Into<BoxError>,
        F: Fn(&In) -> Fut,
        Fut: Future<Output = std::result::Result<Out, E>>,
    {
        loop {
            match slot.phase {
                Phase::Running => {
                    let fut = slot.fut.as_mut();
                    let polled = catch_unwind(AssertUnwindSafe(|| {
                        fut.as_pin_mut()
                            .expect("a running slot has a future")
                            .poll(cx)
                    }));
                    match polled {
                        Ok(Poll::Pending) => {
                            let Poll::Ready(limit) = slot.timer.poll_due(cx) else {
                                return false;
                            };
                            slot.fut.as_mut().set(None);
                            self.end_attempt(slot, None);
                            self.local.timeouts += 1;
                            let failure = self.timeout_cause(slot, limit);
                            self.failed(slot, Failure::TimedOut(failure));
                        }
                        Ok(Poll::Ready(Ok(value))) => {
                            slot.fut.as_mut().set(None);
                            self.end_attempt(slot, Some(true));
                            slot.item = None;
                            slot.phase = Phase::Done(Outcome::Value(value));
                        }
                        Ok(Poll::Ready(Err(e))) => {
                            slot.fut.as_mut().set(None);
                            self.end_attempt(slot, Some(false));
                            self.failed(slot, Failure::Error(e));
                        }
                        Err(payload) => {
                            slot.fut.as_mut().set(None);
                            self.end_attempt(slot, Some(false));
                            let err = StreamError::panicked(&self.stage, payload);
                            self.fail(slot, err);
                        }
                    }
                }
                Phase::Backoff => {
                    // Shutdown ends the wait at once (before the timer is
                    // looked at: no attempt starts after shutdown).
                    if self.shutdown.poll(cx) {
                        slot.timer.set(None);
                        let last = slot.last.take().expect("a waiting slot keeps its failure");
                        self.give_up(slot, last);
                        continue;
                    }
                    if slot.timer.poll_due(cx).is_pending() {
                        return false;
                    }
                    slot.last = None;
                    self.local.retries += 1;
                    self.start(slot);
                }
                Phase::Done(_) => return true,
                Phase::Free => return false,
            }
        }
    }

    /// Tells the guard how the slot's attempt ended: a value (`Some(true)`),
    /// an error or a panic (`Some(false)`), or no outcome (`None`: a
    /// timeout, a panic before the call).
    fn end_attempt<In, Out, Fut>(
        &mut self,
        slot: &mut Slot<In, Out, E, Fut, G::Token>,
        ok: Option<bool>,
    ) {
        if let Some(token) = slot.token.take() {
            match ok {
                Some(ok) => self.guard.settle(token, ok),
                None => self.guard.cancel(token),
            }
        }
    }

    /// Which limit cut the attempt off at `at`: the per-attempt timeout,
    /// or the total deadline if that came first.
    fn timeout_cause<In, Out, Fut>(
        &self,
        slot: &Slot<In, Out, E, Fut, G::Token>,
        at: Instant,
    ) -> TimeoutError {
        match (self.retry.deadline, slot.first_start) {
            (Some(limit), Some(first)) if time::after(first, limit) == Some(at) => {
                TimeoutError::Deadline { limit }
            }
            _ => TimeoutError::Attempt {
                limit: self.timeout.unwrap_or_default(),
            },
        }
    }
}

/// The slots and the order they leave in.
struct Machine<In, Out, E, F, Fut, G: Guard> {
    policy: Policy<F, E, G>,
    slots: Vec<Slot<In, Out, E, Fut, G::Token>>,
    free: Vec<usize>,
    /// Ordered mode: occupied slots in arrival order.
    order: VecDeque<usize>,
    ordered: bool,
    /// Unordered mode: how many slots are done.
    finished: usize,
}

impl<In, Out, E, F, Fut, G: Guard> Machine<In, Out, E, F, Fut, G>
where
    In: Send + 'static,
    E: Into<BoxError>,
    F: Fn(&In) -> Fut,
    Fut: Future<Output = std::result::Result<Out, E>>,
{
    fn occupied(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Puts an input item into a free slot (the caller checked there is one).
    fn admit(&mut self, item: Result<In>) {
        let i = self.free.pop().expect("admit needs a free slot");
        let slot = &mut self.slots[i];
        if self.ordered {
            self.order.push_back(i);
        }
        match item {
            Ok(value) => {
                slot.item = Some(value);
                slot.attempts = 0;
                slot.first_start = None;
                slot.first_failure = None;
                self.policy.start(slot);
                if matches!(slot.phase, Phase::Done(_)) {
                    self.finished += 1;
                }
            }
            Err(e) => {
                slot.phase = Phase::Done(Outcome::Passed(e));
                self.finished += 1;
            }
        }
    }

    /// Polls every busy slot.
    fn poll_slots(&mut self, cx: &mut Context<'_>) {
        for slot in &mut self.slots {
            if slot.busy() && self.policy.poll(slot, cx) {
                self.finished += 1;
            }
        }
    }

    /// Moves finished items that may leave into `out`, up to `max` items.
    fn take_done(&mut self, out: &mut Chunk<Out>, max: usize) -> bool {
        let before = out.len();
        if self.ordered {
            while out.len() < max {
                let Some(&i) = self.order.front() else { break };
                if !matches!(self.slots[i].phase, Phase::Done(_)) {
                    break;
                }
                self.order.pop_front();
                self.release(i, out);
            }
        } else if self.finished > 0 {
            for i in 0..self.slots.len() {
                if out.len() >= max {
                    break;
                }
                if matches!(self.slots[i].phase, Phase::Done(_)) {
                    self.release(i, out);
                }
            }
        }
        out.len() > before
    }

    fn release(&mut self, i: usize, out: &mut Chunk<Out>) {
        let phase = std::mem::replace(&mut self.slots[i].phase, Phase::Free);
        self.finished -= 1;
        self.free.push(i);
        let local = &mut self.policy.local;
        match phase {
            Phase::Done(Outcome::Value(v)) => {
                local.emitted += 1;
                out.values.push(v);
            }
            Phase::Done(Outcome::Failed(e)) => {
                local.failed += 1;
                out.push_error(e);
            }
            Phase::Done(Outcome::Passed(e)) => {
                local.errors_passed += 1;
                out.push_error(e);
            }
            Phase::Free | Phase::Running | Phase::Backoff => unreachable!("released a busy slot"),
        }
    }

    /// Drops every item held (an abort): how many there were.
    fn clear(&mut self) -> u64 {
        let held = self.occupied() as u64;
        for slot in &mut self.slots {
            slot.fut.as_mut().set(None);
            self.policy.end_attempt(slot, None);
            slot.item = None;
            slot.last = None;
            slot.timer.set(None);
            slot.phase = Phase::Free;
        }
        held
    }
}

enum End {
    Finished,
    Stopped,
}

/// Items admitted per wake-up before the task yields to the runtime.
const YIELD_AFTER: usize = 2048;

async fn run<In, Out, E, F, Fut, G: Guard>(
    io: TaskIo<In, Out>,
    mut m: Machine<In, Out, E, F, Fut, G>,
) where
    In: Send + 'static,
    Out: Send + 'static,
    E: Into<BoxError>,
    F: Fn(&In) -> Fut,
    Fut: Future<Output = std::result::Result<Out, E>>,
{
    let TaskIo {
        mut src,
        tx,
        abort,
        counters,
        max_chunk,
    } = io;
    let mut aborted = pin!(abort.cancelled());
    let mut closed = pin!(tx.closed());
    let mut sending = pin!(Fuse::terminated());
    let mut sending_len = 0u64;
    let mut pending = ChunkIter::<In>::default();
    let mut input_ended = false;
    let mut out = Chunk::with_capacity(max_chunk);
    let end = poll_fn(|cx| {
        // The abort is checked once per wake-up (polling the token takes a
        // lock), and the loop yields after a budget of items, so an abort is
        // seen within one budget even while input never stops.
        if aborted.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Stopped);
        }
        let mut budget = YIELD_AFTER;
        let wake = 'wake: loop {
            if budget == 0 {
                cx.waker().wake_by_ref();
                break 'wake Poll::Pending;
            }
            let mut progress = false;
            if !sending.is_terminated() {
                match sending.as_mut().poll(cx) {
                    Poll::Ready(Ok(())) => {
                        sending_len = 0;
                        progress = true;
                    }
                    Poll::Ready(Err(_)) => break 'wake Poll::Ready(End::Stopped),
                    Poll::Pending => {}
                }
            }
            m.poll_slots(cx);
            // While a send waits for room, finished items stay in their
            // slots: that is what holds the input back.
            if sending.is_terminated() {
                progress |= m.take_done(&mut out, max_chunk);
            }
            while budget > 0 && !m.free.is_empty() {
                if let Some(item) = pending.next() {
                    m.admit(item);
                    progress = true;
                    budget -= 1;
                    continue;
                }
                if input_ended {
                    break;
                }
                match src.poll_chunk(cx) {
                    Poll::Ready(Some(chunk)) => {
                        m.policy.local.received += chunk.len() as u64;
                        pending = chunk.into_iter();
                    }
                    Poll::Ready(None) => input_ended = true,
                    Poll::Pending => break,
                }
            }
            // Send a full chunk at once, a partial one when nothing else
            // can move.
            if sending.is_terminated() && !out.is_empty() && (out.len() >= max_chunk || !progress) {
                counters.add(&std::mem::take(&mut m.policy.local));
                sending_len = out.len() as u64;
                let chunk = std::mem::replace(&mut out, Chunk::with_capacity(max_chunk));
                sending.set(tx.send(chunk).fuse());
                continue;
            }
            if input_ended
                && pending.len() == 0
                && m.occupied() == 0
                && out.is_empty()
                && sending.is_terminated()
            {
                break 'wake Poll::Ready(End::Finished);
            }
            if !progress {
                if closed.as_mut().poll(cx).is_ready() {
                    break 'wake Poll::Ready(End::Stopped);
                }
                break 'wake Poll::Pending;
            }
        };
        // What the guard kept back (a breaker's outcomes) is reported
        // before the task waits or ends.
        m.policy.guard.flush();
        wake
    })
    .await;
    counters.add(&m.policy.local);
    if let End::Stopped = end {
        counters.add_undelivered(sending_len + out.len() as u64);
        counters.add_aborted(m.clear() + pending.len() as u64);
        counters.add_drained(src.abandon());
        m.policy.guard.flush();
    }
}

/// The kind of an item's final error: `circuit_open` when a circuit
/// breaker refused the call, `failed` otherwise.
fn kind_of(error: &(dyn std::error::Error + Send + Sync + 'static)) -> ErrorKind {
    #[cfg(feature = "circuit-breaker")]
    if error.is::<crate::breaker::CircuitOpen>() {
        return ErrorKind::CircuitOpen;
    }
    let _ = error;
    ErrorKind::Failed
}
