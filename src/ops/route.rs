//! The task behind [`Partition`](crate::Partition) and
//! [`Switch`](crate::Switch): each value to one output of several.

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::base::chunk::Chunk;
use crate::base::config::EdgeConfig;
use crate::base::error::{BoxError, StreamError};
use crate::flow::Flow;
use crate::flow::driver::{self, Operator, Out};

/// Where one value goes.
pub(crate) enum Pick {
    /// To output `i`.
    To(usize),
    /// Nowhere: dropped and counted.
    Unrouted,
    /// The choice failed: a `failed` error item with this source, carrying
    /// the value, goes to the error output.
    Failed(BoxError),
}

/// Spawns the router: `n` outputs, errors (from upstream and made here) to
/// output `errors_to`, each value where `pick` says.
pub(crate) fn spawn_router<T, P>(
    input: Flow<T>,
    name: &str,
    edge: Option<EdgeConfig>,
    n: usize,
    errors_to: usize,
    pick: P,
) -> Vec<Flow<T>>
where
    T: Send + 'static,
    P: FnMut(&T) -> Pick + Send + 'static,
{
    driver::spawn_fan_out(input, name, n, edge, Router { pick, errors_to })
}

struct Router<P> {
    pick: P,
    errors_to: usize,
}

impl<T, P> Operator<T, T> for Router<P>
where
    T: Send + 'static,
    P: FnMut(&T) -> Pick + Send + 'static,
{
    fn on_chunk(&mut self, chunk: Chunk<T>, out: &mut Out<T>) {
        for (item, ack) in chunk.into_acked() {
            let value = match item {
                Ok(v) => v,
                Err(e) => {
                    out.pass_to(self.errors_to, e);
                    continue;
                }
            };
            let error = match catch_unwind(AssertUnwindSafe(|| (self.pick)(&value))) {
                Ok(Pick::To(i)) => {
                    out.emit_to(i, value, ack);
                    continue;
                }
                Ok(Pick::Unrouted) => {
                    out.drop(value, ack);
                    continue;
                }
                Ok(Pick::Failed(why)) => StreamError::failed(out.stage().to_string(), why),
                Err(payload) => StreamError::panicked(out.stage(), payload),
            };
            out.fail_to(self.errors_to, error.with_item(value).with_ack(ack));
        }
    }
}
