//! [`Take`]: the first `n` values, then the end of the stream.

use std::borrow::Cow;
use std::pin::pin;
use std::task::Context;

use crate::chunk::Chunk;
use crate::config::{ConfigError, EdgeConfig};
use crate::counters::Local;
use crate::flow::Flow;
use crate::processor::Processor;
use crate::stage::{TaskIo, receive_or_stop, send_or_stop, spawn_operator};

/// Passes the first `n` values (and the errors among them), then ends its
/// output and stops reading its input, so the stages before it stop too.
///
/// What it does not pass is counted, never lost silently: the items after
/// the `n`-th value in the chunk at hand are `dropped`, and whatever was
/// still waiting in its input when it stopped is `aborted` (discarded
/// unprocessed); the stages before it count what they could not deliver as
/// `undelivered`. An input that ends before `n` values simply ends the
/// output.
///
/// # Examples
///
/// ```
/// use streamz::Take;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), streamz::ConfigError> {
/// // An endless source, three values.
/// let out = streamz::iter(0u64..).pipe(Take::new(3)?).collect().await;
/// let out: Vec<u64> = out.into_iter().map(Result::unwrap).collect();
/// assert_eq!(out, [0, 1, 2]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Take {
    n: u64,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl Take {
    /// Takes the first `n` values.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for zero.
    pub fn new(n: u64) -> Result<Self, ConfigError> {
        if n == 0 {
            return Err(ConfigError::Zero { field: "n" });
        }
        Ok(Take {
            n,
            name: Cow::Borrowed("take"),
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

impl<T: Send + 'static> Processor<T, T> for Take {
    fn name(&self) -> &str {
        &self.name
    }

    fn process(self, input: Flow<T>) -> Flow<T> {
        let n = self.n;
        spawn_operator(input, &self.name, self.edge, move |io| run(io, n))
    }
}

async fn run<T: Send + 'static>(io: TaskIo<T, T>, n: u64) {
    let TaskIo {
        mut src,
        tx,
        abort,
        counters,
        max_chunk,
    } = io;
    let mut aborted = pin!(abort.cancelled());
    let mut closed = pin!(tx.closed());
    let mut left = n;
    while left > 0 {
        let stop = |cx: &mut Context<'_>| {
            aborted.as_mut().poll(cx).is_ready() || closed.as_mut().poll(cx).is_ready()
        };
        let Some(chunk) = receive_or_stop(&mut src, &abort, &counters, stop).await else {
            return;
        };
        let mut local = Local {
            received: chunk.len() as u64,
            ..Local::default()
        };
        let mut out = Chunk::with_capacity(chunk.len().min(max_chunk));
        for item in chunk {
            if left == 0 {
                local.dropped += 1;
                continue;
            }
            match item {
                Ok(v) => {
                    out.values.push(v);
                    local.emitted += 1;
                    left -= 1;
                }
                Err(e) => {
                    out.push_error(e);
                    local.errors_passed += 1;
                }
            }
        }
        counters.add(&local);
        let mut pieces = out.split(max_chunk);
        while let Some(piece) = pieces.next() {
            let len = piece.len() as u64;
            let stop = |cx: &mut Context<'_>| aborted.as_mut().poll(cx).is_ready();
            if !matches!(send_or_stop(&tx, piece, stop).await, Some(Ok(()))) {
                let rest: u64 = pieces.map(|p| p.len() as u64).sum();
                counters.add_undelivered(len + rest);
                counters.add_drained(src.abandon());
                return;
            }
        }
    }
    // Done: stop the input; what waits in it is discarded and counted.
    counters.add_drained(src.abandon());
}
