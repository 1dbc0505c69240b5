//! [`Debounce`]: the last value after a quiet period.

use std::borrow::Cow;
use std::future::poll_fn;
use std::pin::pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::Instant;

use crate::chunk::Chunk;
use crate::config::{ConfigError, EdgeConfig};
use crate::counters::Local;
use crate::flow::Flow;
use crate::processor::Processor;
use crate::stage::{TaskIo, send_or_stop, spawn_operator};
use crate::window::later;

/// Emits a value only once `quiet` has passed without a newer one: a burst
/// of values becomes its last value. Each value replaces the one waiting
/// (which is counted as `dropped`); errors pass at once and do not restart
/// the wait.
///
/// When the input ends (also at a graceful
/// [`shutdown`](crate::Pipeline::shutdown)), the waiting value is emitted
/// without waiting for the quiet period; an abort discards it (counted as
/// `aborted`). The values of one chunk arrived together: the last one of a
/// chunk waits.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use streamz::Debounce;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), streamz::ConfigError> {
/// let pipeline = streamz::Pipeline::new();
/// let (keys, typed) = pipeline.channel::<&str>();
/// let searches = tokio::spawn(typed.pipe(Debounce::new(Duration::from_millis(300))?).collect());
/// for prefix in ["r", "ru", "rus"] {
///     keys.send(prefix).await.unwrap();
///     tokio::time::sleep(Duration::from_millis(100)).await;
/// }
/// tokio::time::sleep(Duration::from_millis(500)).await;
/// keys.send("rust").await.unwrap();
/// drop(keys); // the end of input flushes "rust"
/// let searches: Vec<&str> = searches.await.unwrap().into_iter().map(Result::unwrap).collect();
/// assert_eq!(searches, ["rus", "rust"]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Debounce {
    quiet: Duration,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl Debounce {
    /// Waits for `quiet` without a new value before emitting the last one.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for a zero duration.
    pub fn new(quiet: Duration) -> Result<Self, ConfigError> {
        if quiet.is_zero() {
            return Err(ConfigError::Zero { field: "quiet" });
        }
        Ok(Debounce {
            quiet,
            name: Cow::Borrowed("debounce"),
            edge: None,
        })
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

impl<T: Send + 'static> Processor<T, T> for Debounce {
    fn name(&self) -> &str {
        &self.name
    }

    fn process(self, input: Flow<T>) -> Flow<T> {
        let quiet = self.quiet;
        spawn_operator(input, &self.name, self.edge, move |io| run(io, quiet))
    }
}

enum Event<T> {
    Input(Option<Chunk<T>>),
    Quiet,
    Stop,
}

async fn run<T: Send + 'static>(io: TaskIo<T, T>, quiet: Duration) {
    let TaskIo {
        mut src,
        tx,
        abort,
        counters,
        ..
    } = io;
    let mut aborted = pin!(abort.cancelled());
    let mut closed = pin!(tx.closed());
    let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
    let mut pending: Option<T> = None;
    loop {
        let waiting = pending.is_some();
        let event = poll_fn(|cx: &mut Context<'_>| {
            use std::task::Poll;
            // The stop and the timer come before the input: an input that
            // is always ready (errors only) must not hold back a value whose
            // quiet period has passed, nor hide a closed output.
            if aborted.as_mut().poll(cx).is_ready() || closed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Stop);
            }
            if waiting && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Quiet);
            }
            if let Poll::Ready(chunk) = src.poll_chunk(cx) {
                return Poll::Ready(Event::Input(chunk));
            }
            Poll::Pending
        })
        .await;
        let mut out = Chunk::with_capacity(0);
        let mut local = Local::default();
        let mut end = false;
        let mut flush = false;
        match event {
            Event::Stop => {
                counters.add_aborted(u64::from(pending.is_some()));
                counters.add_drained(src.abandon());
                return;
            }
            Event::Input(Some(chunk)) => {
                local.received = chunk.len() as u64;
                let mut got_value = false;
                for item in chunk {
                    match item {
                        Ok(v) => {
                            got_value = true;
                            if pending.replace(v).is_some() {
                                local.dropped += 1;
                            }
                        }
                        Err(e) => {
                            local.errors_passed += 1;
                            out.push_error(e);
                        }
                    }
                }
                // Only a value restarts the wait; an error passes by.
                if got_value {
                    timer.as_mut().reset(later(Instant::now(), quiet));
                }
            }
            Event::Input(None) => {
                end = true;
                flush = true;
            }
            Event::Quiet => flush = true,
        }
        if flush {
            if let Some(v) = pending.take() {
                local.emitted += 1;
                out.values.push(v);
            }
        }
        counters.add(&local);
        if !out.is_empty() {
            let len = out.len() as u64;
            let stop = |cx: &mut Context<'_>| aborted.as_mut().poll(cx).is_ready();
            if !matches!(send_or_stop(&tx, out, stop).await, Some(Ok(()))) {
                counters.add_undelivered(len);
                counters.add_aborted(u64::from(pending.is_some()));
                counters.add_drained(src.abandon());
                return;
            }
        }
        if end {
            return;
        }
    }
}
