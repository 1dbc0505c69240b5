//! Time windows: [`Tumbling`], [`Sliding`] and [`Session`], emitting a
//! [`Window`] per window with the values and errors that arrived in it.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::chunk::Chunk;
use crate::config::{ConfigError, EdgeConfig};
use crate::counters::Local;
use crate::error::StreamError;
use crate::flow::Flow;
use crate::processor::Processor;
use crate::stage::{TaskIo, send_or_stop, spawn_operator};

/// One window's result: its time span and what arrived in it, in order.
///
/// Times are `tokio::time::Instant`s: processing time (when the stage
/// received the items), on tokio's clock, so tests drive windows with a
/// paused clock.
#[derive(Debug)]
#[non_exhaustive]
pub struct Window<T> {
    /// When the window opened.
    pub start: Instant,
    /// When it closed (exclusive).
    pub end: Instant,
    /// The values that arrived in it.
    pub items: Vec<T>,
    /// The errors that arrived in it.
    pub errors: Vec<StreamError>,
}

/// Fixed, back-to-back windows of `size`: every value is in exactly one.
/// Windows are aligned to the moment the stage starts; a window is emitted
/// when it ends, or at once when the input ends (also at a graceful
/// shutdown). Windows in which nothing arrived are not emitted. An abort
/// discards the open window (its items counted as `aborted`).
///
/// Memory: the values of one window.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::Tumbling;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), streamz::ConfigError> {
/// let pipeline = streamz::Pipeline::new();
/// let (clicks, flow) = pipeline.channel::<u32>();
/// let windows = tokio::spawn(flow.pipe(Tumbling::new(Duration::from_secs(60))?).collect());
/// clicks.send(1).await.unwrap();
/// clicks.send(2).await.unwrap();
/// tokio::time::sleep(Duration::from_secs(90)).await;
/// clicks.send(3).await.unwrap();
/// drop(clicks);
/// let windows: Vec<_> = windows.await.unwrap().into_iter().map(Result::unwrap).collect();
/// assert_eq!(windows.len(), 2);
/// assert_eq!(windows[0].items, [1, 2]);
/// assert_eq!(windows[0].end - windows[0].start, Duration::from_secs(60));
/// assert_eq!(windows[1].items, [3]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Tumbling {
    size: Duration,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl Tumbling {
    /// Windows of `size`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for a zero size.
    pub fn new(size: Duration) -> Result<Self, ConfigError> {
        if size.is_zero() {
            return Err(ConfigError::Zero { field: "size" });
        }
        Ok(Tumbling {
            size,
            name: Cow::Borrowed("tumbling_window"),
            edge: None,
        })
    }

    /// Names the stage (for counters, spans and errors).
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the stage's output edge (in windows).
    pub fn with_edge(mut self, edge: EdgeConfig) -> Self {
        self.edge = Some(edge);
        self
    }
}

/// Overlapping windows of `size`, one starting every `slide`: a value is
/// in every window whose span covers its arrival (`size / slide` of them,
/// rounded up), so values are cloned into each. An error goes to the first
/// window emitted that covers it (errors are not cloned).
///
/// Windows are aligned to the moment the stage starts and emitted when
/// they end, or at once when the input ends; windows in which nothing
/// arrived are not emitted.
///
/// Memory: the values of the last `size` of time.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::Sliding;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), streamz::ConfigError> {
/// let pipeline = streamz::Pipeline::new();
/// let (readings, flow) = pipeline.channel::<u32>();
/// let window = Sliding::new(Duration::from_secs(10), Duration::from_secs(5))?;
/// let windows = tokio::spawn(flow.pipe(window).collect());
/// tokio::time::sleep(Duration::from_secs(7)).await;
/// readings.send(7).await.unwrap(); // at 7 s: in [0, 10) and [5, 15)
/// drop(readings);
/// let windows: Vec<_> = windows.await.unwrap().into_iter().map(Result::unwrap).collect();
/// assert_eq!(windows.len(), 2);
/// assert!(windows.iter().all(|w| w.items == [7]));
///
/// assert!(Sliding::new(Duration::from_secs(5), Duration::from_secs(10)).is_err());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Sliding {
    size: Duration,
    slide: Duration,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl Sliding {
    /// Windows of `size`, one starting every `slide`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for a zero size or slide;
    /// [`ConfigError::Invalid`] for a slide longer than the size (values
    /// between windows would belong to none).
    pub fn new(size: Duration, slide: Duration) -> Result<Self, ConfigError> {
        if size.is_zero() {
            return Err(ConfigError::Zero { field: "size" });
        }
        if slide.is_zero() {
            return Err(ConfigError::Zero { field: "slide" });
        }
        if slide > size {
            return Err(ConfigError::Invalid {
                field: "slide",
                reason: "must not be longer than the window size",
            });
        }
        Ok(Sliding {
            size,
            slide,
            name: Cow::Borrowed("sliding_window"),
            edge: None,
        })
    }

    /// Names the stage (for counters, spans and errors).
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the stage's output edge (in windows).
    pub fn with_edge(mut self, edge: EdgeConfig) -> Self {
        self.edge = Some(edge);
        self
    }
}

/// Session windows: a window stays open while values keep arriving less
/// than `gap` apart, and closes `gap` after the last one (its `end`). A
/// session that reaches `max_items` values (100,000 by default) closes at
/// once, so memory stays bounded while values never pause.
///
/// The open session is emitted at once when the input ends (also at a
/// graceful shutdown); an abort discards it (counted as `aborted`).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::Session;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), streamz::ConfigError> {
/// let pipeline = streamz::Pipeline::new();
/// let (clicks, flow) = pipeline.channel::<&str>();
/// let sessions = tokio::spawn(flow.pipe(Session::new(Duration::from_secs(30))?).collect());
/// clicks.send("home").await.unwrap();
/// tokio::time::sleep(Duration::from_secs(10)).await;
/// clicks.send("cart").await.unwrap();
/// tokio::time::sleep(Duration::from_secs(60)).await; // the session closes
/// clicks.send("home").await.unwrap();
/// drop(clicks);
/// let sessions: Vec<_> = sessions.await.unwrap().into_iter().map(Result::unwrap).collect();
/// assert_eq!(sessions[0].items, ["home", "cart"]);
/// assert_eq!(sessions[0].end - sessions[0].start, Duration::from_secs(40));
/// assert_eq!(sessions[1].items, ["home"]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Session {
    gap: Duration,
    max_items: usize,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl Session {
    /// Sessions that close after `gap` without a value.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for a zero gap.
    pub fn new(gap: Duration) -> Result<Self, ConfigError> {
        if gap.is_zero() {
            return Err(ConfigError::Zero { field: "gap" });
        }
        Ok(Session {
            gap,
            max_items: 100_000,
            name: Cow::Borrowed("session_window"),
            edge: None,
        })
    }

    /// Closes a session early once it holds `n` values.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for zero.
    pub fn with_max_items(mut self, n: usize) -> Result<Self, ConfigError> {
        if n == 0 {
            return Err(ConfigError::Zero { field: "max_items" });
        }
        self.max_items = n;
        Ok(self)
    }

    /// Names the stage (for counters, spans and errors).
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the stage's output edge (in windows).
    pub fn with_edge(mut self, edge: EdgeConfig) -> Self {
        self.edge = Some(edge);
        self
    }
}

/// How a window stage assigns arrivals to windows.
trait Assigner<T>: Send + 'static {
    /// Takes in what arrived at `now`.
    fn arrive(&mut self, now: Instant, item: crate::Result<T>, out: &mut Out<T>);
    /// When the next window closes, if one is open.
    fn next_close(&self) -> Option<Instant>;
    /// Emits every window that has closed by `now` (all of them at the end
    /// of input, `now = None`).
    fn close(&mut self, now: Option<Instant>, out: &mut Out<T>);
    /// Values and errors held (for an abort).
    fn held(&self) -> u64;
}

/// The windows ready to send and their counts (in input items).
struct Out<T> {
    chunk: Chunk<Window<T>>,
    local: Local,
}

impl<T> Out<T> {
    fn emit(&mut self, window: Window<T>, items: u64, errors: u64) {
        self.local.emitted += items;
        self.local.errors_passed += errors;
        self.chunk.values.push(window);
    }
}

/// Tumbling and sliding windows: arrivals kept for `size`, windows built
/// when they close.
struct Slider<T> {
    origin: Instant,
    size: Duration,
    slide: Duration,
    /// Values and errors by arrival, oldest first.
    held: VecDeque<(Instant, crate::Result<T>)>,
    /// The next window to close (by index from the origin).
    next: u64,
}

impl<T> Slider<T> {
    fn start_of(&self, k: u64) -> Instant {
        self.origin
            + self
                .slide
                .saturating_mul(u32::try_from(k).unwrap_or(u32::MAX))
    }

    /// The first window covering an arrival at `at`: the first start after
    /// `at - size`.
    fn first_window(&self, at: Instant) -> u64 {
        let since = at.duration_since(self.origin);
        if since < self.size {
            return 0;
        }
        let past = since - self.size;
        (past.as_nanos() / self.slide.as_nanos()) as u64 + 1
    }
}

impl<T: Clone + Send + 'static> Assigner<T> for Slider<T> {
    fn arrive(&mut self, now: Instant, item: crate::Result<T>, _out: &mut Out<T>) {
        if self.held.is_empty() {
            self.next = self.next.max(self.first_window(now));
        }
        self.held.push_back((now, item));
    }

    fn next_close(&self) -> Option<Instant> {
        (!self.held.is_empty()).then(|| self.start_of(self.next) + self.size)
    }

    fn close(&mut self, now: Option<Instant>, out: &mut Out<T>) {
        while let Some((oldest, _)) = self.held.front() {
            let start = self.start_of(self.next);
            let end = start + self.size;
            if now.is_some_and(|now| end > now) {
                return;
            }
            // Skip windows before the oldest arrival: nothing is in them.
            if end <= *oldest {
                self.next = self.first_window(*oldest);
                continue;
            }
            let mut items = Vec::new();
            let mut errors = Vec::new();
            let mut i = 0;
            while i < self.held.len() {
                let at = self.held[i].0;
                if at >= end {
                    break;
                }
                if at >= start {
                    match &self.held[i].1 {
                        Ok(v) => items.push(v.clone()),
                        Err(_) => {
                            // Errors are not cloned: this window takes it.
                            if let Some((_, Err(e))) = self.held.remove(i) {
                                errors.push(e);
                            }
                            continue;
                        }
                    }
                }
                i += 1;
            }
            self.next += 1;
            // Values before the next window's start are in no later window.
            let next_start = self.start_of(self.next);
            let mut done = 0;
            while self.held.front().is_some_and(|(at, _)| *at < next_start) {
                self.held.pop_front();
                done += 1;
            }
            let n_errors = errors.len() as u64;
            if !(items.is_empty() && errors.is_empty()) {
                out.emit(
                    Window {
                        start,
                        end,
                        items,
                        errors,
                    },
                    done,
                    n_errors,
                );
            } else {
                out.local.emitted += done;
            }
        }
    }

    fn held(&self) -> u64 {
        self.held.len() as u64
    }
}

/// Session windows.
struct Sessions<T> {
    gap: Duration,
    max_items: usize,
    open: Option<Window<T>>,
    last: Instant,
}

impl<T: Send + 'static> Sessions<T> {
    fn finish(&mut self, end: Instant, out: &mut Out<T>) {
        if let Some(mut w) = self.open.take() {
            w.end = end;
            let (n, e) = (w.items.len() as u64, w.errors.len() as u64);
            out.emit(w, n, e);
        }
    }
}

impl<T: Send + 'static> Assigner<T> for Sessions<T> {
    fn arrive(&mut self, now: Instant, item: crate::Result<T>, out: &mut Out<T>) {
        if self.open.is_some() && now >= self.last + self.gap {
            let end = self.last + self.gap;
            self.finish(end, out);
        }
        let w = self.open.get_or_insert_with(|| Window {
            start: now,
            end: now,
            items: Vec::new(),
            errors: Vec::new(),
        });
        match item {
            Ok(v) => {
                w.items.push(v);
                self.last = now;
            }
            // An error joins the open session without extending it.
            Err(e) => w.errors.push(e),
        }
        if w.items.is_empty() {
            self.last = self.last.max(w.start);
        }
        if w.items.len() >= self.max_items {
            self.finish(now, out);
        }
    }

    fn next_close(&self) -> Option<Instant> {
        self.open.as_ref().map(|_| self.last + self.gap)
    }

    fn close(&mut self, now: Option<Instant>, out: &mut Out<T>) {
        let end = self.last + self.gap;
        if now.is_none_or(|now| now >= end) {
            self.finish(end, out);
        }
    }

    fn held(&self) -> u64 {
        self.open
            .as_ref()
            .map_or(0, |w| (w.items.len() + w.errors.len()) as u64)
    }
}

impl<T: Clone + Send + 'static> Processor<T, Window<T>> for Tumbling {
    fn name(&self) -> &str {
        &self.name
    }

    fn process(self, input: Flow<T>) -> Flow<Window<T>> {
        let size = self.size;
        spawn_operator(input, &self.name, self.edge, move |io| {
            let slider = Slider {
                origin: Instant::now(),
                size,
                slide: size,
                held: VecDeque::new(),
                next: 0,
            };
            run(io, slider)
        })
    }
}

impl<T: Clone + Send + 'static> Processor<T, Window<T>> for Sliding {
    fn name(&self) -> &str {
        &self.name
    }

    fn process(self, input: Flow<T>) -> Flow<Window<T>> {
        let (size, slide) = (self.size, self.slide);
        spawn_operator(input, &self.name, self.edge, move |io| {
            let slider = Slider {
                origin: Instant::now(),
                size,
                slide,
                held: VecDeque::new(),
                next: 0,
            };
            run(io, slider)
        })
    }
}

impl<T: Send + 'static> Processor<T, Window<T>> for Session {
    fn name(&self) -> &str {
        &self.name
    }

    fn process(self, input: Flow<T>) -> Flow<Window<T>> {
        let sessions = Sessions {
            gap: self.gap,
            max_items: self.max_items,
            open: None,
            last: Instant::now(),
        };
        spawn_operator(input, &self.name, self.edge, move |io| run(io, sessions))
    }
}

enum Event<T> {
    Input(Option<Chunk<T>>),
    Close,
    Stop,
}

async fn run<T, A>(io: TaskIo<T, Window<T>>, mut windows: A)
where
    T: Send + 'static,
    A: Assigner<T>,
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
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    loop {
        let close_at = windows.next_close();
        if let Some(at) = close_at {
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
        }
        let event = poll_fn(|cx: &mut Context<'_>| {
            if aborted.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Stop);
            }
            if let Poll::Ready(chunk) = src.poll_chunk(cx) {
                return Poll::Ready(Event::Input(chunk));
            }
            if close_at.is_some() && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Close);
            }
            if closed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Stop);
            }
            Poll::Pending
        })
        .await;
        let mut out = Out {
            chunk: Chunk::with_capacity(0),
            local: Local::default(),
        };
        let mut end = false;
        match event {
            Event::Stop => {
                counters.add_aborted(windows.held());
                counters.add_drained(src.abandon());
                return;
            }
            Event::Input(Some(chunk)) => {
                let now = Instant::now();
                out.local.received = chunk.len() as u64;
                // Windows that closed before this arrival go first.
                windows.close(Some(now), &mut out);
                for item in chunk {
                    windows.arrive(now, item, &mut out);
                }
            }
            Event::Input(None) => {
                windows.close(None, &mut out);
                end = true;
            }
            Event::Close => windows.close(Some(Instant::now()), &mut out),
        }
        counters.add(&out.local);
        // Undelivered is counted in input items, like emitted.
        let inside = |c: &Chunk<Window<T>>| -> u64 {
            c.values
                .iter()
                .map(|w| (w.items.len() + w.errors.len()) as u64)
                .sum()
        };
        let mut pieces = out.chunk.split(max_chunk);
        while let Some(piece) = pieces.next() {
            let items = inside(&piece);
            let stop = |cx: &mut Context<'_>| aborted.as_mut().poll(cx).is_ready();
            if !matches!(send_or_stop(&tx, piece, stop).await, Some(Ok(()))) {
                let rest: u64 = pieces.map(|p| inside(&p)).sum();
                counters.add_undelivered(items + rest);
                counters.add_aborted(windows.held());
                counters.add_drained(src.abandon());
                return;
            }
        }
        if end {
            return;
        }
    }
}
