//! Per-edge transport configuration.

use std::borrow::Cow;
use std::fmt;

/// An invalid setting, found when its operator is piped.
///
/// Constructors and `with_*` setters never fail; each operator checks its
/// settings once, when [`Flow::pipe`](crate::Flow::pipe) starts it. The
/// error names the operator, its stage and the field, and says what the
/// field requires. [`Flow::try_pipe`](crate::Flow::try_pipe) returns it;
/// [`Flow::pipe`](crate::Flow::pipe) turns it into one
/// [`ErrorKind::Config`](crate::ErrorKind::Config) error item, starts
/// nothing, and makes [`Pipeline::join`](crate::Pipeline::join) return
/// [`PipelineError::Config`](crate::PipelineError::Config).
///
/// ```
/// use std::time::Duration;
/// use streamz::Throttle;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let err = streamz::iter(0..3)
///     .try_pipe(Throttle::new(0, Duration::from_secs(1)).named("api"))
///     .unwrap_err();
/// assert_eq!((err.operator(), err.stage(), err.field()), (Some("Throttle"), Some("api"), "rate"));
/// assert_eq!(err.to_string(), "Throttle `api`: `rate` must be greater than zero");
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    operator: Option<&'static str>,
    stage: Option<String>,
    field: &'static str,
    reason: Cow<'static, str>,
}

impl ConfigError {
    /// `field` does not hold what it must; `reason` says what, as a phrase
    /// that follows the field's name (`must be at least 1.0`).
    pub fn new(field: &'static str, reason: impl Into<Cow<'static, str>>) -> Self {
        ConfigError {
            operator: None,
            stage: None,
            field,
            reason: reason.into(),
        }
    }

    /// `field` is zero but must be at least one.
    pub const fn zero(field: &'static str) -> Self {
        ConfigError {
            operator: None,
            stage: None,
            field,
            reason: Cow::Borrowed("must be greater than zero"),
        }
    }

    /// Names the operator and stage the setting belongs to, each unless
    /// already named (by an inner part such as a retry policy, or by a
    /// step that knows its type but not its stage).
    pub fn in_stage(mut self, operator: &'static str, stage: &str) -> Self {
        self.operator.get_or_insert(operator);
        if self.stage.is_none() {
            self.stage = Some(stage.to_owned());
        }
        self
    }

    /// Names the operator only (a [`Step`](crate::Step)'s `validate`: the
    /// stage is named where the step is fused or staged).
    pub fn in_operator(mut self, operator: &'static str) -> Self {
        self.operator.get_or_insert(operator);
        self
    }

    /// The operator's type (`Throttle`), once piped.
    pub fn operator(&self) -> Option<&'static str> {
        self.operator
    }

    /// The stage's name (`api-limit`), once piped.
    pub fn stage(&self) -> Option<&str> {
        self.stage.as_deref()
    }

    /// The setting (`rate`, `edge.capacity`).
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What the setting requires (`must be greater than zero`).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Whether the setting was zero where it must be at least one.
    pub fn is_zero(&self) -> bool {
        self.reason == "must be greater than zero"
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.operator, &self.stage) {
            (Some(op), Some(stage)) => write!(f, "{op} `{stage}`: ")?,
            (Some(op), None) => write!(f, "{op}: ")?,
            _ => {}
        }
        write!(f, "`{}` {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// The most outputs a fan-out (`partition`, `broadcast_with`) may have:
/// each is a channel and a flow, made up front.
pub(crate) const MAX_OUTPUTS: usize = 1 << 16;

/// A fan-out's output count: from 1 to [`MAX_OUTPUTS`].
pub(crate) fn outputs(n: usize, field: &'static str) -> Result<(), ConfigError> {
    nonzero(n, field)?;
    if n > MAX_OUTPUTS {
        return Err(ConfigError::new(field, "must be at most 65,536"));
    }
    Ok(())
}

/// `Err(ConfigError::zero(field))` if `n` is zero.
pub(crate) fn nonzero<N: PartialEq + Default>(
    n: N,
    field: &'static str,
) -> Result<(), ConfigError> {
    if n == N::default() {
        Err(ConfigError::zero(field))
    } else {
        Ok(())
    }
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
/// use streamz::{EdgeConfig, Pipeline};
///
/// let edge = EdgeConfig::new(64, 16);
/// assert_eq!((edge.capacity(), edge.max_chunk()), (64, 16));
/// let pipeline = Pipeline::builder().with_edge(edge).build();
///
/// // Zero is reported when a stage using the edge is piped:
/// assert_eq!(EdgeConfig::new(64, 0).validate().unwrap_err().field(), "edge.max_chunk");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeConfig {
    capacity: usize,
    max_chunk: usize,
}

impl EdgeConfig {
    /// An edge of `capacity` items in chunks of at most `max_chunk`.
    /// Checked when a stage using it is piped: both at least 1, and
    /// `capacity` at most `usize::MAX / 8` (the channel counts items with
    /// a tokio semaphore).
    pub const fn new(capacity: usize, max_chunk: usize) -> Self {
        EdgeConfig {
            capacity,
            max_chunk,
        }
    }

    /// Sets how many items may wait in the channel.
    pub const fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sets the largest number of items in one chunk.
    pub const fn with_max_chunk(mut self, max_chunk: usize) -> Self {
        self.max_chunk = max_chunk;
        self
    }

    /// Checks the settings (see [`new`](EdgeConfig::new)).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for the field `edge.capacity` or `edge.max_chunk`.
    ///
    /// ```
    /// let err = streamz::EdgeConfig::new(0, 64).validate().unwrap_err();
    /// assert_eq!(err.field(), "edge.capacity");
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.capacity, "edge.capacity")?;
        nonzero(self.max_chunk, "edge.max_chunk")?;
        if self.capacity > usize::MAX >> 3 {
            return Err(ConfigError::new(
                "edge.capacity",
                "must be at most usize::MAX / 8",
            ));
        }
        Ok(())
    }

    /// This edge with zero settings raised to 1 and the capacity capped,
    /// for transport built before (or despite) validation.
    pub(crate) fn sane(self) -> Self {
        EdgeConfig {
            capacity: self.capacity.clamp(1, usize::MAX >> 3),
            max_chunk: self.max_chunk.max(1),
        }
    }

    /// How many items may wait in the channel.
    pub const fn capacity(&self) -> usize {
        self.capacity
    }

    /// The largest number of items in one chunk.
    pub const fn max_chunk(&self) -> usize {
        self.max_chunk
    }

    /// The most items this edge holds at once: the queue plus one chunk at
    /// each end.
    ///
    /// ```
    /// let edge = streamz::EdgeConfig::new(100, 10);
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
    /// 1024 items, in chunks of at most 256.
    fn default() -> Self {
        Self::new(1024, 256)
    }
}
