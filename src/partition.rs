//! [`Partition`]: each value to one of `n` outputs, by key hash, in turn,
//! or by a function of your own.

use std::hash::{DefaultHasher, Hash, Hasher};

use crate::config::ConfigError;
use crate::flow::Flow;
use crate::route::{Pick, spawn_router};

type Choose<T> = Box<dyn FnMut(&T) -> Pick + Send>;

/// Splits a flow into `n` flows, each value to exactly one of them:
/// [`by_key`](Partition::by_key) (the same key always to the same output),
/// [`round_robin`](Partition::round_robin), or
/// [`custom`](Partition::custom). Apply it with
/// [`Flow::partition`](crate::Flow::partition).
///
/// **Where errors go: output 0.** Upstream errors, and the values whose
/// strategy failed, go to the first output: a custom strategy that panics
/// or returns an index out of range turns that value into an error item
/// carrying it (`panicked` or `failed`), never a crash. Read output 0 (or
/// put a [`DeadLetterQueue`](crate::DeadLetterQueue) on it).
///
/// Every output is paced by its reader: a chunk is split and each part
/// sent to its output in turn, so a slow output holds the others back
/// (bounded memory, no loss). Values for an output nobody reads any more
/// are counted as `undelivered`; when no output is read, the stage stops.
///
/// # Examples
///
/// ```
/// use streamz::Partition;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), streamz::ConfigError> {
/// let [even, odd] = <[_; 2]>::try_from(
///     streamz::iter(0..10u32).partition(Partition::custom(2, |x: &u32| (*x % 2) as usize)?),
/// ).unwrap();
/// let (even, odd) = tokio::join!(even.collect(), odd.collect());
/// assert_eq!(even.len(), 5);
/// assert_eq!(odd.into_iter().map(Result::unwrap).collect::<Vec<_>>(), [1, 3, 5, 7, 9]);
/// # Ok(()) }
/// ```
pub struct Partition<T> {
    n: usize,
    choose: Choose<T>,
}

impl<T> std::fmt::Debug for Partition<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("n", &self.n)
            .finish_non_exhaustive()
    }
}

fn outputs(n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        Err(ConfigError::Zero { field: "n" })
    } else {
        Ok(n)
    }
}

impl<T: 'static> Partition<T> {
    /// To output `hash(key(value)) % n`: values with the same key always
    /// go to the same output, in their order. The hash is fixed (SipHash
    /// with zero keys), so the mapping is the same in every run.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for zero outputs.
    pub fn by_key<K: Hash>(
        n: usize,
        mut key: impl FnMut(&T) -> K + Send + 'static,
    ) -> Result<Self, ConfigError> {
        let n = outputs(n)?;
        Ok(Partition {
            n,
            choose: Box::new(move |v| {
                let mut h = DefaultHasher::new();
                key(v).hash(&mut h);
                Pick::To((h.finish() % n as u64) as usize)
            }),
        })
    }

    /// To outputs 0, 1, ..., n - 1, 0, ... in turn.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for zero outputs.
    pub fn round_robin(n: usize) -> Result<Self, ConfigError> {
        let n = outputs(n)?;
        let mut next = 0;
        Ok(Partition {
            n,
            choose: Box::new(move |_| {
                let i = next;
                next = (next + 1) % n;
                Pick::To(i)
            }),
        })
    }

    /// To the output `choose` returns. An index of `n` or more makes the
    /// value a `failed` error item on output 0; a panic, a `panicked` one.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for zero outputs.
    pub fn custom(
        n: usize,
        mut choose: impl FnMut(&T) -> usize + Send + 'static,
    ) -> Result<Self, ConfigError> {
        let n = outputs(n)?;
        Ok(Partition {
            n,
            choose: Box::new(move |v| match choose(v) {
                i if i < n => Pick::To(i),
                i => Pick::Failed(
                    format!(
                        "the partition strategy chose output {i} of {n} (0 to {})",
                        n - 1
                    )
                    .into(),
                ),
            }),
        })
    }
}

impl<T: Send + 'static> Flow<T> {
    /// Splits the flow by `partition` into its `n` outputs, in order of
    /// index; errors go to output 0.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[track_caller]
    pub fn partition(self, partition: Partition<T>) -> Vec<Flow<T>> {
        spawn_router(self, "partition", partition.n, 0, partition.choose)
    }
}
