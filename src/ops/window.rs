//! Time windows: [`Tumbling`], [`Sliding`] and [`Session`], emitting a
//! [`Window`] per window with the values and errors that arrived in it.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::base::ack::Ack;
use crate::base::chunk::Chunk;
use crate::base::config::{ConfigError, EdgeConfig, nonzero};
use crate::base::error::StreamError;
use crate::base::time::{Deadline, far_after as later};
use crate::flow::Flow;
use crate::flow::driver::{self, Demand, Operator, Out};
use crate::flow::processor::Processor;

/// The most sliding windows one value may be in (a day every second is
/// 86,400): each window it is in gets a copy.
const MAX_OVERLAP: u128 = 100_000;

/// Arrivals a window stage holds at most, unless told otherwise.
const DEFAULT_MAX_ITEMS: usize = 100_000;

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
/// Memory: the values of one window, at most
/// [`max_items`](Tumbling::with_max_items) (100,000): a window that reaches
/// it is emitted at once, ending at its last arrival, and the rest of its
/// span goes on as a window starting there (like a
/// [`Batcher`](crate::Batcher) that fills before its latency).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::Tumbling;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let pipeline = streamz::Pipeline::new();
/// let (clicks, flow) = pipeline.channel::<u32>();
/// let windows = tokio::spawn(flow.pipe(Tumbling::new(Duration::from_secs(60))).collect());
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
/// # }
/// ```
#[derive(Debug)]
pub struct Tumbling {
    size: Duration,
    max_items: usize,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl Tumbling {
    /// Windows of `size` (zero is refused when piped: field `size`).
    pub fn new(size: Duration) -> Self {
        Tumbling {
            size,
            max_items: DEFAULT_MAX_ITEMS,
            name: Cow::Borrowed("tumbling_window"),
            edge: None,
        }
    }

    /// How many arrivals a window may hold (100,000 by default); a window
    /// that reaches it is emitted at once (zero is refused when piped).
    pub fn with_max_items(mut self, n: usize) -> Self {
        self.max_items = n;
        self
    }

    crate::flow::processor::name_and_edge!("Sets the stage's output edge (in windows).");
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
/// Memory: the values of the last `size` of time, at most
/// [`max_items`](Sliding::with_max_items) (100,000) arrivals plus a chunk:
/// at the limit the stage takes no input until a window closes (the
/// producer waits, nothing is dropped), so it passes at most about
/// `max_items` values per `slide`: raise it for fast streams.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::Sliding;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let pipeline = streamz::Pipeline::new();
/// let (readings, flow) = pipeline.channel::<u32>();
/// let window = Sliding::new(Duration::from_secs(10), Duration::from_secs(5));
/// let windows = tokio::spawn(flow.pipe(window).collect());
/// tokio::time::sleep(Duration::from_secs(7)).await;
/// readings.send(7).await.unwrap(); // at 7 s: in [0, 10) and [5, 15)
/// drop(readings);
/// let windows: Vec<_> = windows.await.unwrap().into_iter().map(Result::unwrap).collect();
/// assert_eq!(windows.len(), 2);
/// assert!(windows.iter().all(|w| w.items == [7]));
///
/// let too_far = Sliding::new(Duration::from_secs(5), Duration::from_secs(10));
/// let err = streamz::iter([1]).try_pipe(too_far).unwrap_err();
/// assert_eq!(err.field(), "slide");
/// # }
/// ```
#[derive(Debug)]
pub struct Sliding {
    size: Duration,
    slide: Duration,
    max_items: usize,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl Sliding {
    /// Windows of `size`, one starting every `slide`.
    ///
    /// Refused when piped ([`ConfigError`]): a zero size or slide; a slide
    /// longer than the size (values between windows would belong to
    /// none), or shorter than size / 100,000 (each value is copied into
    /// every window it is in); a size of `Duration::MAX`: a window that never closes would
    /// hold the input back forever once `max_items` arrivals wait in it
    /// (use [`Tumbling`] for one window cut at a count).
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::Sliding;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let endless = Sliding::new(Duration::MAX, Duration::from_secs(1));
    /// assert_eq!(streamz::iter([1]).try_pipe(endless).unwrap_err().field(), "size");
    /// # }
    /// ```
    pub fn new(size: Duration, slide: Duration) -> Self {
        Sliding {
            size,
            slide,
            max_items: DEFAULT_MAX_ITEMS,
            name: Cow::Borrowed("sliding_window"),
            edge: None,
        }
    }

    /// How many arrivals it may hold (100,000 by default); at the limit it
    /// takes no input until a window closes (zero is refused when piped).
    pub fn with_max_items(mut self, n: usize) -> Self {
        self.max_items = n;
        self
    }

    crate::flow::processor::name_and_edge!("Sets the stage's output edge (in windows).");
}

/// Session windows: a window stays open while values keep arriving less
/// than `gap` apart, and closes `gap` after the last one (its `end`). A
/// session that reaches `max_items` values (100,000 by default) closes at
/// once, with its last value's arrival as its `end`, so memory stays
/// bounded while values never pause.
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
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let pipeline = streamz::Pipeline::new();
/// let (clicks, flow) = pipeline.channel::<&str>();
/// let sessions = tokio::spawn(flow.pipe(Session::new(Duration::from_secs(30))).collect());
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
/// # }
/// ```
#[derive(Debug)]
pub struct Session {
    gap: Duration,
    max_items: usize,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl Session {
    /// Sessions that close after `gap` without a value (zero is refused
    /// when piped: field `gap`).
    pub fn new(gap: Duration) -> Self {
        Session {
            gap,
            max_items: DEFAULT_MAX_ITEMS,
            name: Cow::Borrowed("session_window"),
            edge: None,
        }
    }

    /// Closes a session early once it holds `n` values (zero is refused
    /// when piped).
    pub fn with_max_items(mut self, n: usize) -> Self {
        self.max_items = n;
        self
    }

    crate::flow::processor::name_and_edge!("Sets the stage's output edge (in windows).");
}

/// A window ready to leave, with what it completes in input items: the
/// values counted as emitted with it (a sliding window counts a value with
/// the last window it is in) and its errors.
struct Ready<T> {
    window: Window<T>,
    values: u64,
    errors: u64,
    /// The acknowledgements of what the window carries, errors included.
    ack: Ack,
}

/// Keeps an acknowledgement for a window: none is kept for items without
/// one (the common case), so a window of a source without
/// acknowledgements builds no list.
#[inline]
fn keep(acks: &mut Vec<Ack>, ack: Ack) {
    if !ack.is_none() {
        acks.push(ack);
    }
}

/// How a window stage assigns arrivals to windows.
trait Assigner<T>: Send + 'static {
    /// Takes in what arrived at `now`; a window it completes goes to
    /// `ready`.
    fn arrive(&mut self, now: Instant, item: crate::Result<T>, ack: Ack, ready: &mut Vec<Ready<T>>);
    /// When the next window closes, if one is open.
    fn next_close(&self) -> Option<Instant>;
    /// The next window that has closed by `now` (any open window at the
    /// end of input, `now = None`), one at a time so a long backlog of
    /// windows is never built at once.
    fn close_one(&mut self, now: Option<Instant>) -> Option<Ready<T>>;
    /// Values and errors held (for an abort, and for backpressure).
    fn held(&self) -> u64;
}

/// Tumbling and sliding windows: arrivals kept for `size`, windows built
/// when they close.
struct Slider<T> {
    origin: Instant,
    size: Duration,
    slide: Duration,
    /// Values and errors by arrival, oldest first, with the values'
    /// acknowledgements. Each window a value is in takes a fork; the value's
    /// own is met when it leaves (its windows' forks then hold it).
    held: VecDeque<(Instant, crate::Result<T>, Ack)>,
    /// The next window to close (by index from the origin).
    next: u64,
    /// Tumbling only: a window that reaches this many values is cut and
    /// emitted at once.
    cut_at: Option<usize>,
    /// Where the current window resumes after a cut.
    resume: Option<Instant>,
}

impl<T> Slider<T> {
    /// The start of window `k`: `origin + k * slide`, in exact 128-bit
    /// nanoseconds (a 1 µs slide passes `u32::MAX` windows in 72 minutes).
    fn start_of(&self, k: u64) -> Instant {
        let nanos = self.slide.as_nanos().saturating_mul(u128::from(k));
        match u64::try_from(nanos / 1_000_000_000) {
            Ok(secs) => later(
                self.origin,
                Duration::new(secs, (nanos % 1_000_000_000) as u32),
            ),
            Err(_) => later(self.origin, Duration::MAX),
        }
    }

    /// The first window covering an arrival at `at`: the first start after
    /// `at - size`.
    fn first_window(&self, at: Instant) -> u64 {
        let since = at.duration_since(self.origin);
        if since < self.size {
            return 0;
        }
        let past = since - self.size;
        u64::try_from(past.as_nanos() / self.slide.as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }
}

impl<T: Clone + Send + 'static> Assigner<T> for Slider<T> {
    fn arrive(
        &mut self,
        now: Instant,
        item: crate::Result<T>,
        ack: Ack,
        ready: &mut Vec<Ready<T>>,
    ) {
        if self.held.is_empty() {
            let first = self.first_window(now);
            if first > self.next {
                self.next = first;
                self.resume = None;
            }
        }
        self.held.push_back((now, item, ack));
        if self.cut_at.is_some_and(|n| self.held.len() >= n) {
            // Tumbling at its limit: everything held is in the current
            // window; it leaves now, and the window's span goes on.
            let start = self.resume.unwrap_or_else(|| self.start_of(self.next));
            let (mut items, mut errors, mut acks) = (Vec::new(), Vec::new(), Vec::new());
            for (_, item, ack) in self.held.drain(..) {
                match item {
                    Ok(v) => items.push(v),
                    Err(mut e) => {
                        keep(&mut acks, e.take_ack());
                        errors.push(e);
                    }
                }
                keep(&mut acks, ack);
            }
            self.resume = Some(now);
            let (values, errors_n) = (items.len() as u64, errors.len() as u64);
            ready.push(Ready {
                window: Window {
                    start,
                    end: now,
                    items,
                    errors,
                },
                values,
                errors: errors_n,
                ack: Ack::merge_batch(acks, (values + errors_n) as usize),
            });
        }
    }

    fn next_close(&self) -> Option<Instant> {
        (!self.held.is_empty()).then(|| later(self.start_of(self.next), self.size))
    }

    fn close_one(&mut self, now: Option<Instant>) -> Option<Ready<T>> {
        loop {
            let oldest = self.held.front()?.0;
            let start = self.start_of(self.next);
            let end = later(start, self.size);
            if now.is_some_and(|now| end > now) {
                return None;
            }
            // Skip windows before the oldest arrival: nothing is in them.
            if end <= oldest {
                self.next = self.first_window(oldest).max(self.next + 1);
                self.resume = None;
                continue;
            }
            // After a cut, the window resumes where it was cut.
            let start = self.resume.take().unwrap_or(start);
            let mut items = Vec::new();
            let mut errors = Vec::new();
            let mut acks = Vec::new();
            let mut i = 0;
            while i < self.held.len() {
                let at = self.held[i].0;
                if at >= end {
                    break;
                }
                if at >= start {
                    match &self.held[i].1 {
                        Ok(v) => {
                            items.push(v.clone());
                            keep(&mut acks, self.held[i].2.fork());
                        }
                        Err(_) => {
                            // Errors are not cloned: this window takes it.
                            if let Some((_, Err(mut e), _)) = self.held.remove(i) {
                                keep(&mut acks, e.take_ack());
                                errors.push(e);
                            }
                            continue;
                        }
                    }
                }
                i += 1;
            }
            self.next += 1;
            // Values before the next window's start are in no later window:
            // their own acknowledgements are met, the forks of the windows
            // they are in stand for them.
            let next_start = self.start_of(self.next);
            let mut done = 0;
            while self.held.front().is_some_and(|(at, _, _)| *at < next_start) {
                if let Some((_, _, ack)) = self.held.pop_front() {
                    ack.ack();
                }
                done += 1;
            }
            if items.is_empty() && errors.is_empty() {
                continue; // nothing in it, and nothing left it (done is 0)
            }
            let errors_n = errors.len() as u64;
            let held = items.len() + errors.len();
            return Some(Ready {
                window: Window {
                    start,
                    end,
                    items,
                    errors,
                },
                values: done,
                errors: errors_n,
                ack: Ack::merge_batch(acks, held),
            });
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
    /// The acknowledgements of what the open session holds.
    acks: Vec<Ack>,
    last: Instant,
}

impl<T: Send + 'static> Sessions<T> {
    fn finish(&mut self, end: Instant) -> Option<Ready<T>> {
        let mut w = self.open.take()?;
        w.end = end;
        let (values, errors) = (w.items.len() as u64, w.errors.len() as u64);
        Some(Ready {
            window: w,
            values,
            errors,
            ack: Ack::merge_batch(self.acks.drain(..), (values + errors) as usize),
        })
    }
}

impl<T: Send + 'static> Assigner<T> for Sessions<T> {
    fn arrive(
        &mut self,
        now: Instant,
        item: crate::Result<T>,
        ack: Ack,
        ready: &mut Vec<Ready<T>>,
    ) {
        keep(&mut self.acks, ack);
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
            Err(mut e) => {
                keep(&mut self.acks, e.take_ack());
                w.errors.push(e);
            }
        }
        if w.items.is_empty() {
            self.last = self.last.max(w.start);
        }
        if w.items.len() >= self.max_items {
            ready.extend(self.finish(now));
        }
    }

    fn next_close(&self) -> Option<Instant> {
        self.open.as_ref().map(|_| later(self.last, self.gap))
    }

    fn close_one(&mut self, now: Option<Instant>) -> Option<Ready<T>> {
        let end = later(self.last, self.gap);
        if now.is_none_or(|now| now >= end) {
            self.finish(end)
        } else {
            None
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

    fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.size, "size")
            .and(nonzero(self.max_items, "max_items"))
            .and(self.edge.map_or(Ok(()), |e| e.validate()))
            .map_err(|e| e.in_stage("Tumbling", &self.name))
    }

    fn process(self, input: Flow<T>) -> Flow<Window<T>> {
        // A tumbling window is a sliding one that slides by its size, and
        // is cut at its limit instead of holding the input back.
        let limit = Limit::Cut(self.max_items);
        slide(input, &self.name, self.edge, self.size, self.size, limit)
    }
}

impl<T: Clone + Send + 'static> Processor<T, Window<T>> for Sliding {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let size = if self.size == Duration::MAX {
            Err(ConfigError::new(
                "size",
                "must be finite: a sliding window holds its input back until a window closes",
            ))
        } else {
            nonzero(self.size, "size")
        };
        let slide = if self.slide > self.size {
            Err(ConfigError::new(
                "slide",
                "must not be longer than the window size",
            ))
        } else if !self.slide.is_zero()
            && self.size.as_nanos() / self.slide.as_nanos() > MAX_OVERLAP
        {
            Err(ConfigError::new(
                "slide",
                "must be at least the window size / 100,000: each value is copied into every window it is in",
            ))
        } else {
            nonzero(self.slide, "slide")
        };
        size.and(slide)
            .and(nonzero(self.max_items, "max_items"))
            .and(self.edge.map_or(Ok(()), |e| e.validate()))
            .map_err(|e| e.in_stage("Sliding", &self.name))
    }

    fn process(self, input: Flow<T>) -> Flow<Window<T>> {
        let limit = Limit::Wait(self.max_items);
        slide(input, &self.name, self.edge, self.size, self.slide, limit)
    }
}

/// What a window stage does at its item limit.
enum Limit {
    /// Emit the window at once (tumbling).
    Cut(usize),
    /// Take no input until a window closes (sliding).
    Wait(usize),
}

fn slide<T: Clone + Send + 'static>(
    input: Flow<T>,
    name: &str,
    edge: Option<EdgeConfig>,
    size: Duration,
    slide: Duration,
    limit: Limit,
) -> Flow<Window<T>> {
    let (cut_at, max_held) = match limit {
        Limit::Cut(n) => (Some(n), usize::MAX),
        Limit::Wait(n) => (None, n),
    };
    let slider = Slider {
        origin: Instant::now(),
        size,
        slide,
        held: VecDeque::new(),
        next: 0,
        cut_at,
        resume: None,
    };
    run(input, name, edge, slider, max_held)
}

impl<T: Send + 'static> Processor<T, Window<T>> for Session {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.gap, "gap")
            .and(nonzero(self.max_items, "max_items"))
            .and(self.edge.map_or(Ok(()), |e| e.validate()))
            .map_err(|e| e.in_stage("Session", &self.name))
    }

    fn process(self, input: Flow<T>) -> Flow<Window<T>> {
        let sessions = Sessions {
            gap: self.gap,
            max_items: self.max_items,
            open: None,
            acks: Vec::new(),
            last: Instant::now(),
        };
        // A session closes itself at max_items, so input never waits.
        run(input, &self.name, self.edge, sessions, usize::MAX)
    }
}

/// A window stage's state machine: the assigner, and a chunk that has
/// arrived but waits for the windows that closed before it to leave first,
/// one window per step, so a long backlog of windows is never built at once.
struct Windowing<T, A> {
    windows: A,
    /// At this many held arrivals, take no input until windows close: the
    /// producer waits, nothing is dropped.
    max_held: usize,
    arriving: Option<(Instant, Chunk<T>)>,
    ready: Vec<Ready<T>>,
}

impl<T: Send + 'static, A: Assigner<T>> Windowing<T, A> {
    fn send(r: Ready<T>, out: &mut Out<Window<T>>) {
        // Counted in input items: the values that left the stage with this
        // window, and the errors it carries.
        out.emit_counted(r.window, r.values, r.errors, r.ack);
    }

    /// One step of an arrival: a window that closed before it, or, when
    /// none is left, the arrival itself.
    fn step(&mut self, out: &mut Out<Window<T>>) {
        let Some((now, _)) = &self.arriving else {
            return;
        };
        if let Some(r) = self.windows.close_one(Some(*now)) {
            return Self::send(r, out);
        }
        let (now, chunk) = self.arriving.take().expect("checked above");
        for (item, ack) in chunk.into_acked() {
            self.windows.arrive(now, item, ack, &mut self.ready);
        }
        for r in self.ready.drain(..) {
            Self::send(r, out);
        }
    }
}

impl<T: Send + 'static, A: Assigner<T>> Operator<T, Window<T>> for Windowing<T, A> {
    fn on_chunk(&mut self, chunk: Chunk<T>, out: &mut Out<Window<T>>) {
        self.arriving = Some((Instant::now(), chunk));
        self.step(out);
    }

    fn deadline(&self) -> Deadline {
        match &self.arriving {
            // The rest of an arrival is due at once.
            Some((at, _)) => Some(*at),
            None => self.windows.next_close(),
        }
    }

    fn on_deadline(&mut self, now: Instant, out: &mut Out<Window<T>>) {
        if self.arriving.is_some() {
            return self.step(out);
        }
        if let Some(r) = self.windows.close_one(Some(now)) {
            Self::send(r, out);
        }
    }

    fn demand(&self) -> Demand {
        if self.arriving.is_some() || self.windows.held() >= self.max_held as u64 {
            Demand::Hold
        } else {
            Demand::Input
        }
    }

    fn on_end(&mut self, out: &mut Out<Window<T>>) {
        if let Some(r) = self.windows.close_one(None) {
            Self::send(r, out);
        }
    }

    fn held(&self) -> u64 {
        let arriving = self.arriving.as_ref().map_or(0, |(_, c)| c.len() as u64);
        self.windows.held() + arriving
    }
}

fn run<T, A>(
    input: Flow<T>,
    name: &str,
    edge: Option<EdgeConfig>,
    windows: A,
    max_held: usize,
) -> Flow<Window<T>>
where
    T: Send + 'static,
    A: Assigner<T>,
{
    let op = Windowing {
        windows,
        max_held,
        arriving: None,
        ready: Vec::new(),
    };
    driver::spawn(input, name, edge, op)
}
