//! The error model: failures travel through a pipeline as values.
//!
//! Every item on a streamz channel is a [`Result<T>`]: either a value or a
//! [`StreamError`]. A stage that cannot process an item turns it into a
//! `StreamError` that carries the kind of failure, the stage's name, the
//! source error with its chain, the attempt count, the time, and the item
//! itself, so a later stage (a dead-letter queue) gets the original value
//! back with [`StreamError::take_item`]. Stages pass errors they did not
//! produce through unchanged: no nesting, no re-stamping.

use crate::base::ack::Ack;
use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::sync::Mutex;
use std::time::SystemTime;

/// The item type of every streamz stream: a value or the error that replaced it.
pub type Result<T, E = StreamError> = std::result::Result<T, E>;

/// A boxed error as user code returns it: any `std::error::Error` that is
/// `Send + Sync`, or a string (`"bad input".into()`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong with an item.
///
/// New kinds arrive with new operators, so matches need a wildcard arm.
///
/// # Examples
///
/// ```
/// use streamz::ErrorKind;
///
/// assert_eq!(ErrorKind::Panicked.to_string(), "panicked");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// User code returned an error for the item.
    Failed,
    /// User code panicked while processing the item.
    Panicked,
    /// The item was rejected by the stage as invalid input.
    Rejected,
    /// Processing the item took longer than its time limit (a per-attempt
    /// timeout or a retry deadline).
    TimedOut,
    /// A [`HealthGate`](crate::HealthGate) was closed for longer than its
    /// limit and its policy passes items on as errors.
    GateClosed,
    /// A circuit breaker refused the call for the item (feature
    /// `circuit-breaker`).
    #[cfg(feature = "circuit-breaker")]
    CircuitOpen,
    /// The stage did not start: one of its settings is invalid. The error's
    /// cause is the [`ConfigError`](crate::ConfigError); it carries no
    /// item, and it is the only item of the stage's output.
    Config,
}

impl ErrorKind {
    /// A short lowercase name, stable for logs and records.
    ///
    /// ```
    /// assert_eq!(streamz::ErrorKind::Failed.as_str(), "failed");
    /// ```
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Failed => "failed",
            ErrorKind::Panicked => "panicked",
            ErrorKind::Rejected => "rejected",
            ErrorKind::TimedOut => "timed_out",
            ErrorKind::GateClosed => "gate_closed",
            #[cfg(feature = "circuit-breaker")]
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::Config => "config",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed item, as it travels downstream.
///
/// One pointer wide (the data is boxed) so `Result<T>` stays small on the
/// hot path. It implements [`std::error::Error`]; [`source`] returns the
/// error user code produced, with its chain intact.
///
/// `Debug` does not require the item to be `Debug`: it prints the item's
/// type name.
///
/// # Examples
///
/// ```
/// use streamz::{ErrorKind, StreamError};
///
/// let mut err = StreamError::new(ErrorKind::Failed, "parse")
///     .with_source("not a number")
///     .with_item(String::from("x1"));
///
/// assert_eq!(err.kind(), ErrorKind::Failed);
/// assert_eq!(err.stage(), "parse");
/// assert_eq!(err.to_string(), "stage `parse` failed: not a number");
/// assert_eq!(err.take_item::<String>().as_deref(), Some("x1"));
/// assert!(!err.has_item());
/// ```
///
/// [`source`]: std::error::Error::source
pub struct StreamError {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    stage: Cow<'static, str>,
    source: Option<BoxError>,
    attempts: u32,
    at: SystemTime,
    /// When the first of several attempts failed; `None` means `at`.
    first_at: Option<SystemTime>,
    item: Option<Payload>,
    /// The failed item's acknowledgement (see [`Ack`]): met where the error
    /// item's outcome is decided (written to a dead-letter queue, handed to
    /// a reader).
    ack: Ack,
}

/// The failed item, type-erased. The mutex makes `StreamError: Sync`
/// without asking items to be `Sync`; it is only ever reached through
/// `&mut self`, so it is never contended.
pub(crate) struct Payload {
    type_name: &'static str,
    value: Mutex<Box<dyn Any + Send>>,
}

impl StreamError {
    /// Creates an error of `kind` produced by `stage`, stamped with the
    /// current time and one attempt.
    pub fn new(kind: ErrorKind, stage: impl Into<Cow<'static, str>>) -> Self {
        StreamError {
            inner: Box::new(Inner {
                kind,
                stage: stage.into(),
                source: None,
                attempts: 1,
                at: SystemTime::now(),
                first_at: None,
                item: None,
                ack: Ack::none(),
            }),
        }
    }

    /// Shorthand for a [`ErrorKind::Failed`] error with a source.
    ///
    /// ```
    /// let err = streamz::StreamError::failed("lookup", "no such key");
    /// assert_eq!(err.to_string(), "stage `lookup` failed: no such key");
    /// ```
    pub fn failed(stage: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Failed, stage).with_source(source)
    }

    /// Sets the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// Attaches the item that failed, so a later stage can take it back.
    pub fn with_item<T: Send + 'static>(mut self, item: T) -> Self {
        self.inner.item = Some(Payload {
            type_name: std::any::type_name::<T>(),
            value: Mutex::new(Box::new(item)),
        });
        self
    }

    /// Sets how many attempts were made before giving up (1 by default; 0
    /// for an item refused before any attempt, as a closed
    /// [`HealthGate`](crate::HealthGate) or an open circuit breaker does).
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.inner.attempts = attempts;
        self
    }

    /// Sets when the failure happened (the time of creation by default).
    pub fn with_time(mut self, at: SystemTime) -> Self {
        self.inner.at = at;
        self
    }

    /// Sets when the first attempt failed, for an error that ends several
    /// attempts (by default the first failure is the last one, [`time`]).
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    ///
    /// let first = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
    /// let err = streamz::StreamError::failed("s", "e").with_attempts(3).with_first_time(first);
    /// assert_eq!(err.first_time(), first);
    /// assert!(err.time() > first);
    /// ```
    ///
    /// [`time`]: StreamError::time
    pub fn with_first_time(mut self, at: SystemTime) -> Self {
        self.inner.first_at = Some(at);
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The name of the stage that produced the error.
    pub fn stage(&self) -> &str {
        &self.inner.stage
    }

    /// How many attempts were made.
    pub fn attempts(&self) -> u32 {
        self.inner.attempts
    }

    /// Where the failed item was read, if its source said (a Kafka
    /// record's topic, partition and offset; see
    /// [`SourcePosition`](crate::SourcePosition)). It comes with the item's
    /// acknowledgement, so it survives the maps and steps between the
    /// source and the failing stage; `None` for an item of a source
    /// without positions, and for a batch (several items).
    pub fn source_position(&self) -> Option<&crate::SourcePosition> {
        self.inner.ack.position()
    }

    /// When the (last) failure happened, by the wall clock.
    pub fn time(&self) -> SystemTime {
        self.inner.at
    }

    /// When the first failed attempt happened: [`time`](StreamError::time)
    /// unless [`with_first_time`](StreamError::with_first_time) set it.
    pub fn first_time(&self) -> SystemTime {
        self.inner.first_at.unwrap_or(self.inner.at)
    }

    /// The error user code produced, if any (also [`std::error::Error::source`]).
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.inner.source.as_deref()
    }

    /// Whether the error still carries an item.
    pub fn has_item(&self) -> bool {
        self.inner.item.is_some()
    }

    /// The Rust type name of the carried item, if any (for records and logs).
    ///
    /// ```
    /// let err = streamz::StreamError::failed("s", "e").with_item(7u32);
    /// assert_eq!(err.item_type_name(), Some("u32"));
    /// ```
    pub fn item_type_name(&self) -> Option<&'static str> {
        self.inner.item.as_ref().map(|p| p.type_name)
    }

    /// Whether the carried item is a `T`.
    pub fn item_is<T: 'static>(&mut self) -> bool {
        self.item_mut::<T>().is_some()
    }

    /// A mutable reference to the carried item if it is a `T`.
    pub fn item_mut<T: 'static>(&mut self) -> Option<&mut T> {
        let payload = self.inner.item.as_mut()?;
        let value = payload
            .value
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner());
        value.downcast_mut::<T>()
    }

    /// Takes the carried item out if it is a `T`; leaves it in place (and
    /// returns `None`) if it is another type.
    pub fn take_item<T: 'static>(&mut self) -> Option<T> {
        if !self.item_is::<T>() {
            return None;
        }
        let payload = self.inner.item.take()?;
        let value = payload
            .value
            .into_inner()
            .unwrap_or_else(|poison| poison.into_inner());
        value.downcast::<T>().ok().map(|b| *b)
    }

    /// Takes the carried item out, whatever its type.
    pub fn take_any_item(&mut self) -> Option<Box<dyn Any + Send>> {
        let payload = self.inner.item.take()?;
        Some(
            payload
                .value
                .into_inner()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
    }

    /// Moves the carried item out, with its type name, to attach elsewhere.
    /// Attaches the failed item's acknowledgement (added to any it has).
    pub(crate) fn with_ack(mut self, ack: Ack) -> Self {
        self.add_ack(ack);
        self
    }

    /// Adds an acknowledgement to the error's.
    pub(crate) fn add_ack(&mut self, ack: Ack) {
        if !ack.is_none() {
            let had = std::mem::take(&mut self.inner.ack);
            self.inner.ack = if had.is_none() {
                ack
            } else {
                Ack::merge([had, ack])
            };
        }
    }

    /// Takes the failed item's acknowledgement out of the error.
    pub(crate) fn take_ack(&mut self) -> Ack {
        std::mem::take(&mut self.inner.ack)
    }

    /// A fork of the error's acknowledgement (another output for the same
    /// item).
    pub(crate) fn fork_ack(&self) -> Ack {
        self.inner.ack.fork()
    }

    /// Whether the error carries an acknowledgement.
    pub(crate) fn has_ack(&self) -> bool {
        !self.inner.ack.is_none()
    }

    pub(crate) fn take_payload(&mut self) -> Option<Payload> {
        self.inner.item.take()
    }

    /// Attaches an item taken from another error.
    pub(crate) fn with_payload(mut self, payload: Payload) -> Self {
        self.inner.item = Some(payload);
        self
    }

    /// Builds the error for a panic caught while processing an item.
    pub(crate) fn panicked(stage: &str, payload: Box<dyn Any + Send>) -> Self {
        StreamError::new(ErrorKind::Panicked, stage.to_owned())
            .with_source(PanicError::from_payload(payload))
    }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A stage that did not start: its setting says it all, once
        // ("stage `p` not started: Partition `p`: ..." said the stage twice).
        if self.inner.kind == ErrorKind::Config {
            if let Some(config) = self
                .inner
                .source
                .as_deref()
                .and_then(|s| s.downcast_ref::<crate::ConfigError>())
            {
                let operator = config.operator().unwrap_or("stage");
                return write!(
                    f,
                    "{operator} `{}` not started: `{}` {}",
                    self.inner.stage,
                    config.field(),
                    config.reason()
                );
            }
        }
        write!(f, "stage `{}` {}", self.inner.stage, self.inner.kind)?;
        if let Some(source) = &self.inner.source {
            match source.downcast_ref::<PanicError>() {
                // The kind says "panicked" already.
                Some(panic) if self.inner.kind == ErrorKind::Panicked => {
                    write!(f, ": {}", panic.message())?
                }
                _ => write!(f, ": {source}")?,
            }
        }
        if self.inner.attempts > 1 {
            write!(f, " (after {} attempts)", self.inner.attempts)?;
        }
        Ok(())
    }
}

impl fmt::Debug for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamError")
            .field("kind", &self.inner.kind)
            .field("stage", &self.inner.stage)
            .field("source", &self.inner.source)
            .field("attempts", &self.inner.attempts)
            .field("at", &self.inner.at)
            .field("first_at", &self.inner.first_at)
            .field("item", &self.inner.item.as_ref().map(|p| p.type_name))
            .finish()
    }
}

impl std::error::Error for StreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The source of a [`ErrorKind::Panicked`] error: the panic's message.
///
/// ```
/// use streamz::{ErrorKind, PanicError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let out = streamz::iter([1, 2]).map(|x: &i32| if *x == 2 { panic!("two") } else { *x }).collect().await;
/// let err = out[1].as_ref().unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Panicked);
/// let panic = err.cause().unwrap().downcast_ref::<PanicError>().unwrap();
/// assert_eq!(panic.message(), "two");
/// assert_eq!(err.to_string(), "stage `map` panicked: two");
/// # }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[error("panicked: {message}")]
pub struct PanicError {
    message: String,
}

impl PanicError {
    pub(crate) fn from_payload(payload: Box<dyn Any + Send>) -> Self {
        Self::from_payload_ref(&payload)
    }

    pub(crate) fn from_payload_ref(payload: &Box<dyn Any + Send>) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "a non-string panic payload".to_owned()
        };
        PanicError { message }
    }

    /// The panic's message (its `&str` or `String` payload).
    pub fn message(&self) -> &str {
        &self.message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_of_u64_is_two_words() {
        assert_eq!(std::mem::size_of::<StreamError>(), 8);
        assert!(std::mem::size_of::<Result<u64>>() <= 16);
    }

    #[test]
    fn wrong_type_leaves_item_in_place() {
        let mut e = StreamError::failed("s", "boom").with_item(5u64);
        assert_eq!(e.take_item::<String>(), None);
        assert!(e.has_item());
        assert_eq!(e.take_item::<u64>(), Some(5));
        assert_eq!(e.take_item::<u64>(), None);
    }

    #[test]
    fn source_chain_is_preserved() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = StreamError::failed("s", Outer(std::io::Error::other("inner")));
        let outer = std::error::Error::source(&e).unwrap();
        assert_eq!(outer.to_string(), "outer");
        assert_eq!(outer.source().unwrap().to_string(), "inner");
    }
}

/// Why a text is not a value of the type asked for, without quoting it:
/// serde_json's own message quotes the values it could not read, and those
/// are items, which may be personal or secret. Given for a line of a
/// dead-letter file that is not a record ([`DlqError::Corrupt`](crate::dlq::DlqError::Corrupt); the line
/// itself is the item of the error [`Replay`](crate::dlq::Replay) gives for it), a
/// [`Line`](crate::file::Line) that is not the JSON asked for ([`Line::json`](crate::file::Line::json)), and a dead
/// letter's JSON item read back as another type
/// ([`DeadLetter::item_as`](crate::dlq::DeadLetter::item_as)).
///
/// ```
/// use streamz::dlq::{DeadLetter, NotARecord};
///
/// let line = r#"{"sequence": "card 4111 1111 1111 1111"}"#;
/// let e = serde_json::from_str::<DeadLetter<u32>>(line).unwrap_err();
/// assert!(e.to_string().contains("4111"), "serde_json quotes the value");
/// let shown = NotARecord::from(&e);
/// assert!(!shown.to_string().contains("4111"));
/// assert_eq!(shown.to_string(), "JSON, but not a record of the expected type, at column 39");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct NotARecord {
    what: &'static str,
    column: usize,
}

impl NotARecord {
    /// What is wrong, in a few words.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Where on the line the reader stopped, from 1 (0 when the text was
    /// not read from a line: a JSON value).
    pub fn column(&self) -> usize {
        self.column
    }
}

impl std::fmt::Display for NotARecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.what)?;
        if self.column > 0 {
            write!(f, ", at column {}", self.column)?;
        }
        Ok(())
    }
}

impl From<&serde_json::Error> for NotARecord {
    fn from(e: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        let what = match e.classify() {
            Category::Io => "unreadable",
            Category::Syntax => "not JSON",
            Category::Data => "JSON, but not a record of the expected type",
            Category::Eof => "JSON cut short",
        };
        NotARecord {
            what,
            column: e.column(),
        }
    }
}
