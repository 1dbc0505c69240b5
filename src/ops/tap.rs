//! `Tap`: look at each value without changing it.

use std::fmt;

use crate::base::chunk::Chunk;
use crate::flow::step::{ChunkCtx, Emit, Item, Step, keep_values};

/// The step behind [`Flow::tap`](crate::Flow::tap): calls a function on each
/// value (for logging, metrics, debugging) and passes the value on.
///
/// # Examples
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use streamz::{Stage, Tap};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let seen = Arc::new(AtomicU64::new(0));
/// let counter = seen.clone();
/// let out = streamz::iter(0..4)
///     .pipe(Stage::new("count", Tap::new(move |_: &i32| {
///         counter.fetch_add(1, Ordering::Relaxed);
///     })))
///     .collect()
///     .await;
/// assert_eq!(out.len(), 4);
/// assert_eq!(seen.load(Ordering::Relaxed), 4);
/// # }
/// ```
pub struct Tap<F> {
    f: F,
    keep: Vec<bool>,
}

impl<F> Tap<F> {
    /// A tap step calling `f`.
    pub fn new<T>(f: F) -> Self
    where
        F: FnMut(&T),
    {
        Tap {
            f,
            keep: Vec::new(),
        }
    }
}

impl<F> fmt::Debug for Tap<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tap").finish_non_exhaustive()
    }
}

impl<T, F> Step<T, T> for Tap<F>
where
    T: Send + 'static,
    F: FnMut(&T) + Send + 'static,
{
    #[inline]
    fn on_item(&mut self, item: Item<'_, T>, out: &mut Emit<'_, T>) {
        (self.f)(&item);
        out.emit(item.take());
    }

    fn on_chunk(&mut self, chunk: Chunk<T>, ctx: ChunkCtx<'_>) -> Chunk<T> {
        let f = &mut self.f;
        let mut decide = |v: &T| {
            f(v);
            true
        };
        keep_values(chunk, ctx.counters, &mut self.keep, &mut decide)
    }
}
