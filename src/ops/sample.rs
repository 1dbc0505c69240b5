//! [`Sample`]: keep each value with a probability.

use crate::base::chunk::Chunk;
use crate::base::config::ConfigError;
use crate::flow::step::{ChunkCtx, Emit, Item, Step, keep_values};

/// Keeps each value with probability `p` and drops the others (counted as
/// `dropped`). Errors always pass: a sample of the data must not hide its
/// failures.
///
/// The choice comes from a small fast generator (`fastrand`), seeded from
/// the system unless [`with_seed`](Sample::with_seed) fixes it (for
/// tests, or the same sample on every run).
///
/// # Examples
///
/// ```
/// use streamz::Sample;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let sample = Sample::new(0.1).with_seed(7);
/// let kept = streamz::iter(0..10_000).step("sample", sample).collect().await;
/// assert!((800..1200).contains(&kept.len()), "{}", kept.len());
///
/// let err = streamz::iter(0..9).try_step("sample", Sample::new(1.5)).unwrap_err();
/// assert_eq!(err.to_string(), "Sample `sample`: `p` must be a probability from 0 to 1");
/// # }
/// ```
#[derive(Debug)]
pub struct Sample {
    p: f64,
    rng: fastrand::Rng,
    keep: Vec<bool>,
}

impl Sample {
    /// Keeps each value with probability `p`, from 0 (none) to 1 (all).
    /// `p` outside `[0, 1]` or NaN is refused when the step is fused or
    /// staged (field `p`).
    pub fn new(p: f64) -> Self {
        Sample {
            p,
            rng: fastrand::Rng::new(),
            keep: Vec::new(),
        }
    }

    /// Makes the choices repeatable: the same seed keeps the same values of
    /// the same input.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = fastrand::Rng::with_seed(seed);
        self
    }
}

impl<T: Send + 'static> Step<T, T> for Sample {
    fn validate(&self) -> Result<(), ConfigError> {
        if (0.0..=1.0).contains(&self.p) {
            Ok(())
        } else {
            Err(ConfigError::new("p", "must be a probability from 0 to 1").in_operator("Sample"))
        }
    }

    fn on_item(&mut self, item: Item<'_, T>, out: &mut Emit<'_, T>) {
        if self.rng.f64() < self.p {
            out.emit(item.take());
        }
    }

    fn on_chunk(&mut self, chunk: Chunk<T>, ctx: ChunkCtx<'_>) -> Chunk<T> {
        let (rng, p) = (&mut self.rng, self.p);
        keep_values(chunk, ctx.counters, &mut self.keep, &mut |_| rng.f64() < p)
    }
}
