//! `Filter`: keep the values a predicate accepts, count the rest.

use std::fmt;

use crate::base::chunk::Chunk;
use crate::flow::step::{ChunkCtx, Emit, Item, Step, keep_values};

/// The step behind [`Flow::filter`](crate::Flow::filter): keeps the values
/// for which the predicate returns true. Rejected values are counted in the
/// stage's `dropped` counter; errors always pass.
///
/// # Examples
///
/// ```
/// use streamz::{Filter, Stage};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let flow = streamz::iter(1..=6).pipe(Stage::new("odd", Filter::new(|x: &i32| x % 2 == 1)));
/// let pipeline = flow.pipeline().clone();
/// assert_eq!(flow.collect().await.len(), 3);
/// assert_eq!(pipeline.stage_metrics("odd").unwrap().dropped, 3);
/// # }
/// ```
pub struct Filter<F> {
    f: F,
    keep: Vec<bool>,
}

impl<F> Filter<F> {
    /// A filter step with predicate `f`.
    pub fn new<T>(f: F) -> Self
    where
        F: FnMut(&T) -> bool,
    {
        Filter {
            f,
            keep: Vec::new(),
        }
    }
}

impl<F> fmt::Debug for Filter<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filter").finish_non_exhaustive()
    }
}

impl<T, F> Step<T, T> for Filter<F>
where
    T: Send + 'static,
    F: FnMut(&T) -> bool + Send + 'static,
{
    #[inline]
    fn on_item(&mut self, item: Item<'_, T>, out: &mut Emit<'_, T>) {
        if (self.f)(&item) {
            out.emit(item.take());
        }
        // An item not taken and not emitted is counted as dropped.
    }

    fn on_chunk(&mut self, chunk: Chunk<T>, ctx: ChunkCtx<'_>) -> Chunk<T> {
        keep_values(chunk, ctx.counters, &mut self.keep, &mut self.f)
    }
}
