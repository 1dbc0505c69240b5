//! [`Buffer`]: extra room between a bursty producer and a slow consumer.

use std::borrow::Cow;

use crate::base::config::{ConfigError, EdgeConfig};
use crate::flow::Flow;
use crate::flow::processor::Processor;

/// A stage whose output edge holds up to `capacity` items: room for a
/// producer's bursts while a slower consumer catches up, without raising
/// the edge of every stage. When it is full, backpressure resumes as
/// everywhere else; nothing is dropped.
///
/// Memory: up to `capacity` items (in chunks of at most 256, or
/// `capacity` if smaller), in addition to the pipeline's other edges.
///
/// # Examples
///
/// ```
/// use streamz::Buffer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), streamz::ConfigError> {
/// let out = streamz::iter(0..100).pipe(Buffer::new(10_000)?).collect().await;
/// assert_eq!(out.len(), 100);
/// assert!(Buffer::new(0).is_err());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Buffer {
    edge: EdgeConfig,
    name: Cow<'static, str>,
}

impl Buffer {
    /// A buffer of `capacity` items.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] for zero.
    pub fn new(capacity: usize) -> Result<Self, ConfigError> {
        if capacity == 0 {
            return Err(ConfigError::Zero { field: "capacity" });
        }
        let edge = EdgeConfig::try_new(capacity, capacity.min(256))?;
        Ok(Buffer {
            edge,
            name: Cow::Borrowed("buffer"),
        })
    }

    /// Names the stage (for counters and spans).
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }
}

impl<T: Send + 'static> Processor<T, T> for Buffer {
    fn name(&self) -> &str {
        &self.name
    }

    fn process(self, input: Flow<T>) -> Flow<T> {
        input.async_boundary_with(self.name, self.edge)
    }
}
