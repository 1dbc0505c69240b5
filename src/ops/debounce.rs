//! [`Debounce`]: the last value after a quiet period.

use std::borrow::Cow;
use std::time::Duration;

use tokio::time::Instant;

use crate::base::ack::Ack;
use crate::base::chunk::Chunk;
use crate::base::config::{ConfigError, EdgeConfig, nonzero};
use crate::base::time::{self, Deadline};
use crate::flow::Flow;
use crate::flow::driver::{self, Operator, Out};
use crate::flow::processor::Processor;

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
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let pipeline = streamz::Pipeline::new();
/// let (keys, typed) = pipeline.channel::<&str>();
/// let searches = tokio::spawn(typed.pipe(Debounce::new(Duration::from_millis(300))).collect());
/// for prefix in ["r", "ru", "rus"] {
///     keys.send(prefix).await.unwrap();
///     tokio::time::sleep(Duration::from_millis(100)).await;
/// }
/// tokio::time::sleep(Duration::from_millis(500)).await;
/// keys.send("rust").await.unwrap();
/// drop(keys); // the end of input flushes "rust"
/// let searches: Vec<&str> = searches.await.unwrap().into_iter().map(Result::unwrap).collect();
/// assert_eq!(searches, ["rus", "rust"]);
/// # }
/// ```
#[derive(Debug)]
pub struct Debounce {
    quiet: Duration,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl Debounce {
    /// Waits for `quiet` without a new value before emitting the last one
    /// (zero is refused when piped: field `quiet`).
    pub fn new(quiet: Duration) -> Self {
        Debounce {
            quiet,
            name: Cow::Borrowed("debounce"),
            edge: None,
        }
    }

    crate::flow::processor::name_and_edge!("Sets the stage's output edge.");
}

impl<T: Send + 'static> Processor<T, T> for Debounce {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.quiet, "quiet")
            .and(self.edge.map_or(Ok(()), |e| e.validate()))
            .map_err(|e| e.in_stage("Debounce", &self.name))
    }

    fn process(self, input: Flow<T>) -> Flow<T> {
        let op = Debouncer {
            quiet: self.quiet,
            waiting: None,
            due: None,
        };
        driver::spawn(input, &self.name, self.edge, op)
    }
}

struct Debouncer<T> {
    quiet: Duration,
    /// The latest value, with its acknowledgement.
    waiting: Option<(T, Ack)>,
    due: Deadline,
}

impl<T: Send + 'static> Debouncer<T> {
    fn release(&mut self, out: &mut Out<T>) {
        if let Some((v, ack)) = self.waiting.take() {
            out.emit(v, ack);
        }
    }
}

impl<T: Send + 'static> Operator<T, T> for Debouncer<T> {
    fn on_chunk(&mut self, chunk: Chunk<T>, out: &mut Out<T>) {
        let mut got_value = false;
        for (item, ack) in chunk.into_acked() {
            match item {
                Ok(v) => {
                    got_value = true;
                    if let Some((older, ack)) = self.waiting.replace((v, ack)) {
                        out.drop(older, ack);
                    }
                }
                Err(e) => out.pass(e),
            }
        }
        // Only a value restarts the wait; an error passes by.
        if got_value {
            self.due = time::after(Instant::now(), self.quiet);
        }
    }

    fn deadline(&self) -> Deadline {
        self.waiting.as_ref().and(self.due)
    }

    fn on_deadline(&mut self, _now: Instant, out: &mut Out<T>) {
        self.release(out);
    }

    fn on_end(&mut self, out: &mut Out<T>) {
        self.release(out);
    }

    fn held(&self) -> u64 {
        u64::from(self.waiting.is_some())
    }
}
