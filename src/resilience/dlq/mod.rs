//! Dead-letter queues: route failed items, with the context of their
//! failure, to a sink, and read a file of them back.
//!
//! A [`DeadLetterQueue`] stage lets values pass and turns every error item
//! into a [`DeadLetter`] record for its sink: a bounded [`channel`], an
//! async closure ([`sink_fn`]), a durable file of JSON lines
//! ([`FileSink`]), or any [`DeadLetterSink`]. [`Replay`] reads such a file
//! back as a stream of records, so fixed items can be fed into a pipeline
//! again.
//!
//! Nothing is lost silently: a record the sink cannot take comes back
//! downstream as an error item carrying it, a record dropped by the
//! [`Overflow::DropAndCount`] policy is counted, and the stage's counters
//! keep the law
//!
//! ```text
//! received = emitted + dead_lettered + failed + dropped + aborted
//! ```
//!
//! `docs/errors-and-dlq.md` explains the error model, the record format and
//! the policies.
//!
//! The stage is two tasks: the router (`router.rs`, an operator run by the
//! crate's driver) passes values on and hands records to a bounded buffer;
//! the writer (`writer.rs`) takes them from the buffer in batches and calls
//! the sink. `queue.rs` holds the builder that wires them together.

mod file;
mod json;
mod queue;
mod record;
mod replay;
mod router;
mod sink;
mod writer;

pub use crate::base::error::NotARecord;
pub use file::{FileSink, FileSinkOptions, FileSinkStats, Fsync};
pub use json::JsonItems;
pub use queue::DeadLetterQueue;
pub use record::DeadLetter;
pub use replay::{DEFAULT_MAX_LINE, Replay, ReplayStats};
pub use sink::{
    ChannelSink, DeadLetterReceiver, DeadLetterSink, FnSink, MAX_CHANNEL_CAPACITY, Unwritten,
    channel, sink_fn,
};

use std::path::PathBuf;

use crate::base::config::ConfigError;
use crate::base::error::StreamError;

/// The note of a record whose error carried an item it cannot keep.
pub(crate) fn not_recorded(error: &StreamError, records: &str) -> String {
    format!(
        "the failed item is a `{}`, which this dead-letter queue does not record \
         (it records {records}); its value could not be kept",
        error.item_type_name().unwrap_or("?")
    )
}

/// Takes the item a record keeps out of an error that carries one, with
/// the type tag the user chose for it (if any), or says why it cannot (the
/// record's note).
type TakeItem<R> = Box<dyn Fn(&mut StreamError) -> Result<Taken<R>, String> + Send + Sync>;

/// A redaction applied to every record before it is written
/// ([`DeadLetterQueue::with_redaction`]).
type Redact<R> = std::sync::Arc<dyn Fn(&mut DeadLetter<R>) + Send + Sync>;

/// An item taken for a record, and its user-chosen type tag.
pub(crate) type Taken<R> = (R, Option<std::sync::Arc<str>>);

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DlqError {
    /// The dead-letter file cannot be opened for appending (at
    /// construction, so a bad path never reaches a running pipeline).
    #[error("cannot open the dead-letter file `{}` for appending: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A dead-letter file cannot be read.
    #[error("cannot read the dead-letter file `{}`: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A complete line of a dead-letter file is not a record of the
    /// expected type.
    #[error("line {line} of `{}` is not a dead-letter record: {source}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The line's number, from 1.
        line: u64,
        /// Why it does not parse, without the line's contents.
        source: NotARecord,
    },
    /// The path to read is a directory, not a dead-letter file.
    #[error("`{}` is a directory, not a dead-letter file", path.display())]
    IsADirectory {
        /// The path.
        path: PathBuf,
    },
    /// A rotated set of dead-letter files has a hole: a segment is missing
    /// between the oldest and the newest one present (`<name>.1` and
    /// `<name>.3` exist, `<name>.2` does not), so records would be skipped
    /// without a trace.
    #[error(
        "the rotated dead-letter files of `{}` have a gap: segment {missing} is missing between {first} and {last}",
        path.display()
    )]
    MissingSegment {
        /// The current file's path (segments are `<path>.N`).
        path: PathBuf,
        /// The first missing segment number.
        missing: u64,
        /// The oldest segment present.
        first: u64,
        /// The newest segment present.
        last: u64,
    },
    /// A line of a dead-letter file is longer than the replay's limit
    /// ([`Replay::with_max_line`]); it was skipped without being read
    /// into memory.
    #[error(
        "line {line} of `{}` is longer than the limit of {max} bytes and was skipped",
        path.display()
    )]
    LineTooLong {
        /// The file.
        path: PathBuf,
        /// The line's number, from 1.
        line: u64,
        /// The limit in bytes, newline excluded.
        max: usize,
    },
    /// A setting is invalid (from [`FileSinkOptions::create`]).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The sink was full and the policy is [`Overflow::Fail`]: the stream
    /// ends with this error.
    #[error(
        "the dead-letter sink is full ({buffered} records wait for it) and the overflow policy fails the stream"
    )]
    Overflow {
        /// The stage's buffer: the records between the stage and the sink
        /// ([`DeadLetterQueue::with_buffer`]).
        buffered: usize,
    },
    /// The sink's writer task ended early (it panicked), so records could
    /// not reach it.
    #[error("the dead-letter sink stopped; the record could not reach it")]
    SinkStopped,
}

/// What a [`DeadLetterQueue`] does with a record when its sink is slow and
/// the buffer in front of it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Overflow {
    /// Wait for room (the default): the stage stops taking input, so
    /// upstream feels backpressure. Nothing is dropped.
    #[default]
    Block,
    /// Drop the record and count it in the stage's `dropped` counter; a
    /// warning is logged when dropping starts and when the sink catches up
    /// (with the count). Its sequence number is skipped, so the gap shows
    /// in the sink.
    DropAndCount,
    /// End the stream: the stage sends on the items that came before the
    /// record that did not fit, then an error item of its own whose source
    /// is [`DlqError::Overflow`] and whose item is that record, and stops
    /// taking input (upstream stops as when its output is dropped). No
    /// value that came after the record is emitted: the rest of its chunk
    /// and what upstream held are counted `aborted`. Records already
    /// accepted are still written; one the sink refuses may still come
    /// after the error, as an error item carrying it.
    Fail,
}
