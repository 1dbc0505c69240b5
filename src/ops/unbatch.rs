//! [`Unbatch`]: flatten batches back into items.

use std::marker::PhantomData;

use crate::base::chunk::Chunk;
use crate::base::counters::Local;
use crate::flow::step::{ChunkCtx, Emit, Item, Step};

/// Flattens each `Vec<T>` into its values, in order: the inverse of a
/// [`Batcher`](crate::Batcher). Errors pass in their place.
///
/// Counted in batches, like the [`Batcher`](crate::Batcher) counts in
/// values: `received` batches (and errors) in, `emitted` batches unpacked,
/// so `received = emitted + errors_passed` holds. An empty batch is
/// unpacked into nothing.
///
/// # Examples
///
/// ```
/// use streamz::Unbatch;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = streamz::iter([vec![1, 2], vec![], vec![3]])
///     .step("unbatch", Unbatch::new())
///     .collect()
///     .await;
/// let out: Vec<i32> = out.into_iter().map(Result::unwrap).collect();
/// assert_eq!(out, [1, 2, 3]);
/// # }
/// ```
#[derive(Debug)]
pub struct Unbatch<T> {
    _values: PhantomData<fn() -> T>,
}

impl<T> Unbatch<T> {
    /// An unbatch step.
    pub fn new() -> Self {
        Unbatch {
            _values: PhantomData,
        }
    }
}

impl<T> Default for Unbatch<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Send + 'static> Step<Vec<T>, T> for Unbatch<T> {
    fn on_item(&mut self, item: Item<'_, Vec<T>>, out: &mut Emit<'_, T>) {
        for v in item.take() {
            out.emit(v);
        }
    }

    fn on_chunk(&mut self, chunk: Chunk<Vec<T>>, ctx: ChunkCtx<'_>) -> Chunk<T> {
        let Chunk {
            values,
            errors,
            acks,
        } = chunk;
        let batches = values.len();
        ctx.counters.add(&Local {
            received: (batches + errors.len()) as u64,
            emitted: batches as u64,
            errors_passed: errors.len() as u64,
            ..Local::default()
        });
        // An error placed after `p` batches goes after their values.
        let mut starts = Vec::with_capacity(batches + 1);
        let mut total = 0;
        for b in &values {
            starts.push(total);
            total += b.len();
        }
        starts.push(total);
        let errors = errors.into_iter().map(|(p, e)| (starts[p], e)).collect();
        // A batch's acknowledgement goes to its values: one each when the
        // batch still holds the items it was made of (see `Ack::split`).
        let acks = acks.map(|acks| {
            let mut split = Vec::with_capacity(total);
            for (b, ack) in values.iter().zip(acks) {
                split.extend(ack.split(b.len()));
            }
            split
        });
        let mut flat = Vec::with_capacity(total);
        for b in values {
            flat.extend(b);
        }
        Chunk {
            values: flat,
            errors,
            acks,
        }
    }
}
