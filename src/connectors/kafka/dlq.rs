//! [`KafkaDlq`]: dead letters to a Kafka topic.

use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::KafkaError;
use super::record::{Acknowledge, KafkaRecord};
use super::sink::{brokers_at, durable_producer, headers};
use crate::base::ack::SourcePosition;
use crate::resilience::dlq::{DeadLetter, DeadLetterSink, Unwritten};

/// A [`DeadLetterSink`] writing each dead letter to a Kafka topic, in the
/// spirit of Kafka Connect's dead-letter queue: the record's **original
/// key and value** (of the Kafka record the failed item came from, found
/// through its acknowledgement, [`Acknowledge`]), and the error's context
/// in headers:
///
/// | header | value |
/// |---|---|
/// | `streamz.errors.topic`, `.partition`, `.offset` | where the original record was read: from the failed record itself, or from the position its acknowledgement carried ([`DeadLetter::source`]) when maps turned it into something else |
/// | `streamz.errors.source` | the failed item's position at its source as JSON ([`SourcePosition`]: a Kafka record, a file line, a sequence), if known |
/// | `streamz.errors.pipeline` | the pipeline's name, if it has one |
/// | `streamz.errors.item.type` | the item's type tag ([`DeadLetterQueue::with_item_tag`](crate::DeadLetterQueue::with_item_tag)), or its Rust type name |
/// | `streamz.errors.stage` | the stage that failed the item |
/// | `streamz.errors.kind` | `failed`, `timed_out`, `panicked`... |
/// | `streamz.errors.message` | the error's message |
/// | `streamz.errors.causes` | its cause chain, one per line |
/// | `streamz.errors.attempts` | attempts made |
/// | `streamz.errors.first.failure.ms`, `.last.failure.ms` | when, in ms since the epoch |
/// | `streamz.errors.sequence` | the dead letter's sequence number in its queue |
/// | `streamz.errors.redaction` | `panicked`, when [`with_redaction`](KafkaDlq::with_redaction) panicked (the value is then left out) |
///
/// A dead letter whose item has no acknowledgement (an upstream error
/// without an item, an item not from Kafka) is written with headers only.
///
/// Once the broker confirms a dead letter, the dead-letter queue meets the
/// failed item's acknowledgement ([`crate::Ack`]), so the original
/// record's offset can be committed: a failed record counts as handled
/// once it is safely in the DLQ topic. A dead letter the broker
/// refuses comes back as [`Unwritten`] (the queue sends it downstream as an
/// error item; its offset is not committed past).
///
/// # Examples
///
/// ```no_run
/// use streamz::dlq::DeadLetterQueue;
/// use streamz::kafka::{KafkaDlq, KafkaRecord};
///
/// # fn run() -> Result<(), streamz::kafka::KafkaError> {
/// let dlq = DeadLetterQueue::<KafkaRecord, KafkaRecord, _>::new(
///     KafkaDlq::new("127.0.0.1:9092", "orders.dlq")?,
/// );
/// # let _ = dlq; Ok(()) }
/// ```
pub struct KafkaDlq {
    producer: FutureProducer,
    topic: String,
    /// What replaces the original value ([`KafkaDlq::with_redaction`]).
    redact: Option<RedactValue>,
}

/// Makes the value written for an original record.
type RedactValue = Box<dyn Fn(&KafkaRecord) -> Option<Vec<u8>> + Send + Sync>;

impl std::fmt::Debug for KafkaDlq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDlq")
            .field("topic", &self.topic)
            .field("redacts", &self.redact.is_some())
            .finish_non_exhaustive()
    }
}

impl KafkaDlq {
    /// Writes to `topic` on the cluster at `brokers`.
    ///
    /// # Errors
    ///
    /// [`KafkaError::Client`] if librdkafka refuses the configuration.
    pub fn new(brokers: &str, topic: &str) -> Result<Self, KafkaError> {
        Self::with_config(&brokers_at(brokers), topic)
    }

    /// Writes to `topic` with a producer made from `config`.
    ///
    /// # Errors
    ///
    /// [`KafkaError::Client`] if librdkafka refuses the configuration.
    ///
    /// [`KafkaError::Config`] for `acks` other than `all`, as for
    /// [`KafkaSink::with_config`](super::KafkaSink::with_config).
    pub fn with_config(config: &ClientConfig, topic: &str) -> Result<Self, KafkaError> {
        Ok(KafkaDlq {
            producer: durable_producer(config)?,
            topic: topic.to_owned(),
            redact: None,
        })
    }

    /// Writes `redact(original)` as each dead letter's value instead of the
    /// original record's value (`None`: no value, headers only). The key
    /// is kept: it decides the partition, and a replay by key needs it.
    ///
    /// The value this sink writes is the *original* record's, not the
    /// failed item: a [`DeadLetterQueue::with_redaction`](crate::DeadLetterQueue::with_redaction)
    /// on the queue rewrites the record's item and error text (the
    /// `streamz.errors.message` and `.causes` headers), and this rewrites
    /// the payload. A redaction that panics fails closed: the dead letter
    /// is written without a value, with the header
    /// `streamz.errors.redaction: panicked`.
    ///
    /// ```no_run
    /// use streamz::kafka::KafkaDlq;
    ///
    /// # fn run() -> Result<(), streamz::kafka::KafkaError> {
    /// // Keep the record's shape for replay, without the card number.
    /// let dlq = KafkaDlq::new("127.0.0.1:9092", "payments.dlq")?.with_redaction(|original| {
    ///     let mut order: serde_json::Value = serde_json::from_slice(original.value()?).ok()?;
    ///     order["card"] = serde_json::Value::from("<redacted>");
    ///     serde_json::to_vec(&order).ok()
    /// });
    /// # let _ = dlq; Ok(()) }
    /// ```
    pub fn with_redaction<F>(mut self, redact: F) -> Self
    where
        F: Fn(&KafkaRecord) -> Option<Vec<u8>> + Send + Sync + 'static,
    {
        self.redact = Some(Box::new(redact));
        self
    }
}

fn millis(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        .to_string()
}

/// The context headers of `letter`, whose original record is `origin`.
fn context<T>(
    letter: &DeadLetter<T>,
    origin: Option<&KafkaRecord>,
) -> Vec<(&'static str, Vec<u8>)> {
    let mut h: Vec<(&'static str, Vec<u8>)> = Vec::with_capacity(13);
    let read_at = match (origin, &letter.source) {
        (Some(o), _) => Some((o.topic(), o.partition(), o.offset())),
        (
            None,
            Some(SourcePosition::Kafka {
                topic,
                partition,
                offset,
            }),
        ) => Some((&**topic, *partition, *offset)),
        _ => None,
    };
    if let Some((topic, partition, offset)) = read_at {
        h.push(("streamz.errors.topic", topic.as_bytes().to_vec()));
        h.push((
            "streamz.errors.partition",
            partition.to_string().into_bytes(),
        ));
        h.push(("streamz.errors.offset", offset.to_string().into_bytes()));
    }
    if let Some(source) = &letter.source {
        // Any kind of position (a file line, a sequence), as in the file
        // sink's records.
        if let Ok(json) = serde_json::to_vec(source) {
            h.push(("streamz.errors.source", json));
        }
    }
    if let Some(pipeline) = &letter.pipeline {
        h.push(("streamz.errors.pipeline", pipeline.clone().into_bytes()));
    }
    if let Some(item_type) = &letter.item_type {
        h.push(("streamz.errors.item.type", item_type.clone().into_bytes()));
    }
    let kind = serde_json::to_value(letter.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    h.push(("streamz.errors.stage", letter.stage.clone().into_bytes()));
    h.push(("streamz.errors.kind", kind.into_bytes()));
    h.push((
        "streamz.errors.message",
        letter.message.clone().into_bytes(),
    ));
    h.push((
        "streamz.errors.causes",
        letter.causes.join("\n").into_bytes(),
    ));
    h.push((
        "streamz.errors.attempts",
        letter.attempts.to_string().into_bytes(),
    ));
    h.push((
        "streamz.errors.first.failure.ms",
        millis(letter.first_failure).into_bytes(),
    ));
    h.push((
        "streamz.errors.last.failure.ms",
        millis(letter.last_failure).into_bytes(),
    ));
    h.push((
        "streamz.errors.sequence",
        letter.sequence.to_string().into_bytes(),
    ));
    h
}

impl<T: Acknowledge + Send + 'static> DeadLetterSink<T> for KafkaDlq {
    async fn write(&mut self, records: Vec<DeadLetter<T>>) -> Result<(), Vec<Unwritten<T>>> {
        // Hand every record to the producer first, then wait for the
        // confirmations: one round trip for the batch.
        let mut sent = Vec::with_capacity(records.len());
        for letter in records {
            let origin = letter
                .item
                .as_ref()
                .and_then(|i| i.acknowledgement())
                .map(super::Ack::record);
            let mut context = context(&letter, origin.as_ref());
            let redacted = match (&self.redact, origin.as_ref()) {
                (Some(redact), Some(original)) => {
                    let made =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| redact(original)));
                    Some(made.unwrap_or_else(|_| {
                        tracing::error!(
                            topic = %self.topic,
                            sequence = letter.sequence,
                            "the dead-letter value redaction panicked; the dead letter is written without a value"
                        );
                        context.push(("streamz.errors.redaction", b"panicked".to_vec()));
                        None
                    }))
                }
                _ => None,
            };
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
                .headers(headers(context.iter().map(|(k, v)| (*k, v.as_slice()))));
            if let Some(key) = origin.as_ref().and_then(KafkaRecord::key) {
                record = record.key(key);
            }
            match &redacted {
                Some(value) => {
                    if let Some(value) = value {
                        record = record.payload(value.as_slice());
                    }
                }
                None => {
                    if let Some(value) = origin.as_ref().and_then(KafkaRecord::value) {
                        record = record.payload(value);
                    }
                }
            }
            let delivery = self.producer.send_result(record).map_err(|(e, _)| e);
            sent.push((letter, delivery));
        }
        let mut unwritten = Vec::new();
        for (letter, delivery) in sent {
            let outcome = match delivery {
                Ok(d) => match d.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(KafkaError::Client(e)),
                    Err(_) => Err(KafkaError::Canceled),
                },
                Err(e) => Err(KafkaError::Client(e)),
            };
            // A written letter's record is acknowledged by the queue once
            // this returns (see `crate::Ack`); a refused one comes back.
            if let Err(e) = outcome {
                unwritten.push(Unwritten::new(letter, e));
            }
        }
        if unwritten.is_empty() {
            Ok(())
        } else {
            Err(unwritten)
        }
    }
}
