//! [`DeadLetter`]: what a dead-letter sink receives for each failed item.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::base::error::{ErrorKind, StreamError};

/// One failed item with the context of its failure, as a dead-letter sink
/// receives it and as the file sink stores it (one JSON object per line).
///
/// The item keeps its own type `T`. An error that carried an item of
/// another type, or no item, is still recorded: `item` is `None` and
/// `note` says why.
///
/// # Format
///
/// With `serde_json`, a record of a `u32` item reads:
///
/// ```text
/// {"sequence":1,"pipeline":"orders","source":{"kind":"kafka","topic":"orders",
///  "partition":3,"offset":1207},"stage":"parse","kind":"failed",
///  "message":"bad digit","causes":[],"attempts":1,
///  "first_failure":"2026-11-30T16:00:00.5Z","last_failure":"2026-11-30T16:00:00.5Z",
///  "item_type":"u32","item":7,"note":null}
/// ```
///
/// Times are RFC 3339 in UTC; `kind` is [`ErrorKind::as_str`]. `pipeline`
/// and `source` are `null` when unknown, and may be missing altogether
/// from records written before they existed (read as `None`).
///
/// # Examples
///
/// ```
/// use streamz::{DeadLetter, ErrorKind, StreamError};
///
/// let err = StreamError::failed("parse", "bad digit").with_item(7u32);
/// let record = DeadLetter::<u32>::from_error(1, err);
/// assert_eq!(record.kind, ErrorKind::Failed);
/// assert_eq!(record.stage, "parse");
/// assert_eq!(record.message, "bad digit");
/// assert_eq!(record.item, Some(7));
///
/// // An item of another type is noted, not lost without a trace.
/// let err = StreamError::failed("parse", "bad digit").with_item("seven");
/// let record = DeadLetter::<u32>::from_error(2, err);
/// assert_eq!(record.item, None);
/// assert_eq!(record.item_type.as_deref(), Some("&str"));
/// assert!(record.note.unwrap().contains("it records `u32`"));
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeadLetter<T> {
    /// The failure's number among all errors the dead-letter queue stage
    /// received in this run, from 1. A gap means records were dropped by
    /// the [`Overflow::DropAndCount`](crate::resilience::dlq::Overflow) policy.
    pub sequence: u64,
    /// The name of the pipeline the dead-letter queue ran in
    /// ([`PipelineBuilder::with_name`](crate::PipelineBuilder::with_name)),
    /// if it has one.
    #[serde(default)]
    pub pipeline: Option<String>,
    /// Where the failed item was read, if its source said
    /// ([`StreamError::source_position`]): for a Kafka record its topic,
    /// partition and offset, also after maps turned it into something else.
    #[serde(default)]
    pub source: Option<crate::SourcePosition>,
    /// The stage that produced the error.
    pub stage: String,
    /// What went wrong.
    pub kind: ErrorKind,
    /// The error's message: its source's text, or the kind if it had none.
    pub message: String,
    /// The source's own sources, outermost first.
    #[serde(default)]
    pub causes: Vec<String>,
    /// How many attempts were made.
    pub attempts: u32,
    /// When the first attempt failed.
    #[serde(with = "humantime_serde")]
    pub first_failure: SystemTime,
    /// When the last attempt failed.
    #[serde(with = "humantime_serde")]
    pub last_failure: SystemTime,
    /// The type of the item the error carried, if any: the tag chosen for
    /// it ([`DeadLetterQueue::with_item_tag`](crate::DeadLetterQueue::with_item_tag),
    /// [`JsonItems::with_tag`](crate::dlq::JsonItems::with_tag)), else its Rust
    /// type name, which is fine for reading in a log but not stable across
    /// compiler versions: give a tag to what a program reads back.
    pub item_type: Option<String>,
    /// The failed item, if the error carried one of type `T`.
    pub item: Option<T>,
    /// Why `item` is missing, when it is.
    #[serde(default)]
    pub note: Option<String>,
}

/// Shows the record's context but not its item, which may be personal or
/// secret data: `item: Some(<order.v1 not shown>)`. Print
/// [`item`](DeadLetter::item) yourself where you mean to.
///
/// ```
/// use streamz::StreamError;
/// use streamz::dlq::DeadLetter;
///
/// let error = StreamError::failed("charge", "card declined").with_item(String::from("4111 1111 1111 1111"));
/// let record = DeadLetter::<String>::from_error(1, error);
/// let shown = format!("{record:?}");
/// assert!(shown.contains("card declined"));
/// assert!(!shown.contains("4111"));
/// ```
impl<T> fmt::Debug for DeadLetter<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Hidden<'a>(Option<&'a str>);
        impl fmt::Debug for Hidden<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "<{} not shown>", self.0.unwrap_or("item"))
            }
        }
        f.debug_struct("DeadLetter")
            .field("sequence", &self.sequence)
            .field("pipeline", &self.pipeline)
            .field("source", &self.source)
            .field("stage", &self.stage)
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("causes", &self.causes)
            .field("attempts", &self.attempts)
            .field("first_failure", &self.first_failure)
            .field("last_failure", &self.last_failure)
            .field("item_type", &self.item_type)
            .field(
                "item",
                &self
                    .item
                    .as_ref()
                    .map(|_| Hidden(self.item_type.as_deref())),
            )
            .field("note", &self.note)
            .finish()
    }
}

impl<T: 'static> DeadLetter<T> {
    /// The record of `error`, numbered `sequence`; takes the item out of
    /// the error if it is a `T`.
    pub fn from_error(sequence: u64, error: StreamError) -> Self {
        Self::from_error_with(sequence, error, |e: &mut StreamError| {
            e.take_item::<T>().map(|item| (item, None)).ok_or_else(|| {
                crate::resilience::dlq::not_recorded(
                    e,
                    &format!("`{}`", std::any::type_name::<T>()),
                )
            })
        })
    }
}

impl DeadLetter<serde_json::Value> {
    /// The record's item read back as a `T`: `None` without an item,
    /// otherwise the value or why it is not a `T`. With items of several
    /// types in one queue, check [`item_type`](DeadLetter::item_type)
    /// (their tags) first.
    ///
    /// ```
    /// use streamz::dlq::{DeadLetter, JsonItems};
    /// use streamz::{DeadLetterQueue, StreamError};
    ///
    /// #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    /// struct Order { id: u32 }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (sink, letters) = streamz::dlq::channel(16);
    /// let items = JsonItems::new().with_tag::<Order>("order.v1").with_tag::<String>("line");
    /// let failures = vec![
    ///     Err(StreamError::failed("parse", "not json").with_item(String::from("{oops"))),
    ///     Err(StreamError::failed("price", "no price").with_item(Order { id: 7 })),
    /// ];
    /// let out = streamz::try_stream::<_, Order>(futures::stream::iter(failures))
    ///     .pipe(DeadLetterQueue::json(sink, items))
    ///     .collect()
    ///     .await;
    /// assert!(out.is_empty());
    /// for _ in 0..2 {
    ///     let letter: DeadLetter<serde_json::Value> = letters.recv().await?;
    ///     match letter.item_type.as_deref() {
    ///         Some("order.v1") => assert_eq!(letter.item_as::<Order>().unwrap()?, Order { id: 7 }),
    ///         Some("line") => assert_eq!(letter.item_as::<String>().unwrap()?, "{oops"),
    ///         other => panic!("unexpected item type {other:?}"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn item_as<T: serde::de::DeserializeOwned>(&self) -> Option<Result<T, super::NotARecord>> {
        self.item
            .as_ref()
            .map(|value| T::deserialize(value).map_err(|e| super::NotARecord::from(&e)))
    }
}

impl<T> DeadLetter<T> {
    /// The record of `error`, whose item `take` takes with its type tag
    /// (or explains, in the record's note, why it cannot).
    pub(crate) fn from_error_with(
        sequence: u64,
        mut error: StreamError,
        take: impl FnOnce(&mut StreamError) -> Result<super::Taken<T>, String>,
    ) -> Self {
        let mut item_type = error.item_type_name().map(str::to_owned);
        let (item, note) = match item_type {
            None => (None, Some("the error carried no item".to_owned())),
            Some(_) => match take(&mut error) {
                Ok((item, tag)) => {
                    if let Some(tag) = tag {
                        item_type = Some(tag.to_string());
                    }
                    (Some(item), None)
                }
                Err(note) => (None, Some(note)),
            },
        };
        let (message, causes) = match error.cause() {
            Some(cause) => {
                let mut causes = Vec::new();
                let mut next = cause.source();
                while let Some(e) = next {
                    causes.push(e.to_string());
                    next = e.source();
                }
                (cause.to_string(), causes)
            }
            None => (error.kind().as_str().to_owned(), Vec::new()),
        };
        DeadLetter {
            sequence,
            pipeline: None,
            source: error.source_position().cloned(),
            stage: error.stage().to_owned(),
            kind: error.kind(),
            message,
            causes,
            attempts: error.attempts(),
            first_failure: error.first_time(),
            last_failure: error.time(),
            item_type,
            item,
            note,
        }
    }

    /// A copy of the record's context without its item, with `note`.
    pub(crate) fn without_item(&self, note: &str) -> Self {
        DeadLetter {
            sequence: self.sequence,
            pipeline: self.pipeline.clone(),
            source: self.source.clone(),
            stage: self.stage.clone(),
            kind: self.kind,
            message: self.message.clone(),
            causes: self.causes.clone(),
            attempts: self.attempts,
            first_failure: self.first_failure,
            last_failure: self.last_failure,
            item_type: self.item_type.clone(),
            item: None,
            note: Some(note.to_owned()),
        }
    }
}
