//! Per-edge transport configuration.

use std::num::NonZeroUsize;

/// Invalid configuration, rejected before anything runs.
///
/// ```
/// use streamz::{ConfigError, EdgeConfig};
///
/// assert_eq!(
///     EdgeConfig::try_new(0, 64).unwrap_err(),
///     ConfigError::Zero { field: "capacity" },
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A size or count that must be at least one was zero.
    #[error("`{field}` must be greater than zero")]
    Zero {
        /// The configuration field.
        field: &'static str,
    },
    /// A value is outside the range the field accepts.
    #[error("`{field}` {reason}")]
    Invalid {
        /// The configuration field.
        field: &'static str,
        /// What the field requires, as a phrase (`must be at least 1.0`).
        reason: &'static str,
    },
}

/// How the channel on one edge of a pipeline is sized.
///
/// Channels between stages carry chunks of items. `capacity` bounds how many
/// items may wait in the channel; `max_chunk` bounds how many items one
/// chunk holds. A stage never waits to fill a chunk: it forwards what it has
/// as soon as its input has nothing more ready, so chunks are large under
/// load and small (down to one item) when traffic is light.
///
/// Memory per edge is bounded: at most `max(capacity, max_chunk)` items
/// queued, plus one chunk in the hands of the sending and one in the hands
/// of the receiving stage (see `docs/architecture.md`).
///
/// # Default
///
/// | setting | default |
/// |---|---|
/// | `capacity` | 1024 items |
/// | `max_chunk` | 256 items |
///
/// # Examples
///
/// ```
/// use std::num::NonZeroUsize;
/// use streamz::EdgeConfig;
///
/// let edge = EdgeConfig::new()
///     .with_capacity(NonZeroUsize::new(64).unwrap())
///     .with_max_chunk(NonZeroUsize::new(16).unwrap());
/// assert_eq!(edge.capacity(), 64);
/// assert_eq!(edge.max_chunk(), 16);
///
/// // From untrusted numbers (a config file), zero is a typed error:
/// assert!(EdgeConfig::try_new(64, 0).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeConfig {
    capacity: NonZeroUsize,
    max_chunk: NonZeroUsize,
}

impl EdgeConfig {
    /// The default configuration (see the table above).
    pub const fn new() -> Self {
        EdgeConfig {
            capacity: NonZeroUsize::new(1024).unwrap(),
            max_chunk: NonZeroUsize::new(256).unwrap(),
        }
    }

    /// Builds a configuration from plain numbers.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Zero`] if either value is zero.
    pub const fn try_new(capacity: usize, max_chunk: usize) -> Result<Self, ConfigError> {
        let Some(capacity) = NonZeroUsize::new(capacity) else {
            return Err(ConfigError::Zero { field: "capacity" });
        };
        let Some(max_chunk) = NonZeroUsize::new(max_chunk) else {
            return Err(ConfigError::Zero { field: "max_chunk" });
        };
        // The channel counts items with a tokio semaphore, which holds at
        // most `usize::MAX >> 3` permits.
        if capacity.get() > usize::MAX >> 3 {
            return Err(ConfigError::Invalid {
                field: "capacity",
                reason: "must be at most usize::MAX / 8",
            });
        }
        Ok(EdgeConfig {
            capacity,
            max_chunk,
        })
    }

    /// Sets how many items may wait in the channel.
    pub const fn with_capacity(mut self, capacity: NonZeroUsize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sets the largest number of items in one chunk.
    pub const fn with_max_chunk(mut self, max_chunk: NonZeroUsize) -> Self {
        self.max_chunk = max_chunk;
        self
    }

    /// How many items may wait in the channel.
    pub const fn capacity(&self) -> usize {
        self.capacity.get()
    }

    /// The largest number of items in one chunk.
    pub const fn max_chunk(&self) -> usize {
        self.max_chunk.get()
    }

    /// The most items this edge holds at once: the queue plus one chunk at
    /// each end.
    ///
    /// ```
    /// let edge = streamz::EdgeConfig::try_new(100, 10).unwrap();
    /// assert_eq!(edge.max_items_held(), 120);
    /// ```
    pub const fn max_items_held(&self) -> usize {
        let queued = if self.capacity() > self.max_chunk() {
            self.capacity()
        } else {
            self.max_chunk()
        };
        queued.saturating_add(self.max_chunk().saturating_mul(2))
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self::new()
    }
}
