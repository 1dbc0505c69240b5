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
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = streamz::iter(0..100).pipe(Buffer::new(10_000)).collect().await;
/// assert_eq!(out.len(), 100);
/// assert!(streamz::iter(0..100).try_pipe(Buffer::new(0)).is_err());
/// # }
/// ```
#[derive(Debug)]
pub struct Buffer {
    edge: EdgeConfig,
    name: Cow<'static, str>,
}

impl Buffer {
    /// A buffer of `capacity` items. Zero, or more than `usize::MAX / 8`
    /// (the count of the channel's semaphore; nothing is allocated up
    /// front), is refused when piped (field `capacity`).
    pub fn new(capacity: usize) -> Self {
        Buffer {
            edge: EdgeConfig::new(capacity, capacity.min(256)),
            name: Cow::Borrowed("buffer"),
        }
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

    fn validate(&self) -> Result<(), ConfigError> {
        // The buffer is its edge: name the argument the user gave.
        self.edge
            .validate()
            .map_err(|e| ConfigError::new("capacity", e.reason().to_owned()))
            .map_err(|e| e.in_stage("Buffer", &self.name))
    }

    fn process(self, input: Flow<T>) -> Flow<T> {
        input.async_boundary_with(self.name, self.edge)
    }
}
