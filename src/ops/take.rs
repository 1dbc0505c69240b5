//! [`Take`]: the first `n` values, then the end of the stream.

use std::borrow::Cow;

use crate::base::ack::Ack;
use crate::base::chunk::Chunk;
use crate::base::config::{ConfigError, EdgeConfig, nonzero};
use crate::flow::Flow;
use crate::flow::driver::{self, Demand, Operator, Out};
use crate::flow::processor::Processor;

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
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // An endless source, three values.
/// let out = streamz::iter(0u64..).pipe(Take::new(3)).collect().await;
/// let out: Vec<u64> = out.into_iter().map(Result::unwrap).collect();
/// assert_eq!(out, [0, 1, 2]);
/// # }
/// ```
#[derive(Debug)]
pub struct Take {
    n: u64,
    name: Cow<'static, str>,
    edge: Option<EdgeConfig>,
}

impl Take {
    /// Takes the first `n` values (zero is refused when piped: field `n`).
    pub fn new(n: u64) -> Self {
        Take {
            n,
            name: Cow::Borrowed("take"),
            edge: None,
        }
    }

    crate::flow::processor::name_and_edge!("Sets the stage's output edge.");
}

impl<T: Send + 'static> Processor<T, T> for Take {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.n, "n")
            .and(self.edge.map_or(Ok(()), |e| e.validate()))
            .map_err(|e| e.in_stage("Take", &self.name))
    }

    fn process(self, input: Flow<T>) -> Flow<T> {
        driver::spawn(input, &self.name, self.edge, Taking { left: self.n })
    }
}

struct Taking {
    left: u64,
}

impl<T: Send + 'static> Operator<T, T> for Taking {
    fn on_chunk(&mut self, chunk: Chunk<T>, out: &mut Out<T>) {
        for (item, ack) in chunk.into_acked() {
            match item {
                // Past the count, the rest of the chunk is dropped, counted,
                // and not acknowledged: it was never processed, so a source
                // that replays offers it again (like what waits upstream).
                _ if self.left == 0 => {
                    drop(ack);
                    out.drop(item, Ack::none());
                }
                Ok(v) => {
                    out.emit(v, ack);
                    self.left -= 1;
                }
                Err(e) => out.pass(e),
            }
        }
    }

    /// Done: the driver stops the input, counting what waits in it.
    fn demand(&self) -> Demand {
        if self.left == 0 {
            Demand::Done
        } else {
            Demand::Input
        }
    }
}
