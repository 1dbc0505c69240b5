//! [`Skip`]: drop the first `n` values.

use crate::base::chunk::Chunk;
use crate::base::config::{ConfigError, nonzero};
use crate::flow::step::{ChunkCtx, Emit, Item, Step, keep_values};

/// Drops the first `n` values (counted as `dropped`) and passes the rest.
/// Errors are never skipped: they pass wherever they are.
///
/// A [`Step`]: fuse it with [`Flow::step`](crate::Flow::step), or give it
/// its own task with [`Stage`](crate::Stage).
///
/// # Examples
///
/// ```
/// use streamz::Skip;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = streamz::iter(1..=5).step("skip", Skip::new(2)).collect().await;
/// let out: Vec<i32> = out.into_iter().map(Result::unwrap).collect();
/// assert_eq!(out, [3, 4, 5]);
/// # }
/// ```
#[derive(Debug)]
pub struct Skip {
    left: u64,
    keep: Vec<bool>,
}

impl Skip {
    /// Skips the first `n` values. Zero is refused when the step is fused
    /// or staged (field `n`): a skip of nothing is a mistake to surface,
    /// not a stage to run.
    pub fn new(n: u64) -> Self {
        Skip {
            left: n,
            keep: Vec::new(),
        }
    }
}

impl<T: Send + 'static> Step<T, T> for Skip {
    fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.left, "n").map_err(|e| e.in_operator("Skip"))
    }

    fn on_item(&mut self, item: Item<'_, T>, out: &mut Emit<'_, T>) {
        if self.left > 0 {
            self.left -= 1; // not taken, not emitted: counted as dropped
        } else {
            out.emit(item.take());
        }
    }

    fn on_chunk(&mut self, chunk: Chunk<T>, ctx: ChunkCtx<'_>) -> Chunk<T> {
        let left = &mut self.left;
        keep_values(chunk, ctx.counters, &mut self.keep, &mut |_| {
            if *left > 0 {
                *left -= 1;
                false
            } else {
                true
            }
        })
    }
}
