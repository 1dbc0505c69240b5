//! [`KafkaSink`]: produce each item to a topic and confirm its delivery.

use std::borrow::Cow;
use std::sync::Arc;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::KafkaError;
use super::record::{Ack, Acknowledge, KafkaRecord};
use crate::base::config::{ConfigError, nonzero};
use crate::flow::Flow;
use crate::flow::processor::Processor;
use crate::resilience::async_mapper::AsyncMapper;

/// A record to produce: an optional topic (the sink's by default), key,
/// value, headers, and the acknowledgement of the record it came from.
///
/// ```
/// use streamz::kafka::ProducerRecord;
///
/// let r = ProducerRecord::new(b"{\"total\":42}".to_vec())
///     .key(b"order-7".to_vec())
///     .header("content-type", b"application/json".to_vec());
/// assert_eq!(r.value.as_deref(), Some(&b"{\"total\":42}"[..]));
/// ```
#[derive(Debug, Default)]
pub struct ProducerRecord {
    /// The topic, or `None` for the sink's.
    pub topic: Option<String>,
    /// The key (partitioning uses it).
    pub key: Option<Vec<u8>>,
    /// The value; `None` produces a tombstone.
    pub value: Option<Vec<u8>>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// A handle on the record it came from, for a
    /// [`KafkaDlq`](super::KafkaDlq) that writes the original when this
    /// record cannot be produced. (The acknowledgement itself travels
    /// beside the item: see [`crate::Ack`].)
    pub ack: Option<Ack>,
}

impl ProducerRecord {
    /// A record with `value`.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        ProducerRecord {
            value: Some(value.into()),
            ..ProducerRecord::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// Sends it to `topic` instead of the sink's.
    pub fn to(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Keeps a handle on the record it came from (see the `ack` field).
    /// Not needed for the acknowledgement, which is automatic.
    pub fn acking(mut self, ack: Ack) -> Self {
        self.ack = Some(ack);
        self
    }
}

/// A read record produced again as it is (key, value, headers with a
/// value), acknowledging it once written: a pass-through.
impl From<KafkaRecord> for ProducerRecord {
    fn from(r: KafkaRecord) -> Self {
        ProducerRecord::from(&r)
    }
}

/// A read record produced again as it is, acknowledging it once written
/// (for `flow.map(|r: &KafkaRecord| ProducerRecord::from(r))`).
impl From<&KafkaRecord> for ProducerRecord {
    fn from(r: &KafkaRecord) -> Self {
        ProducerRecord {
            topic: None,
            key: r.key().map(<[u8]>::to_vec),
            value: r.value().map(<[u8]>::to_vec),
            headers: r
                .headers()
                .iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (k.clone(), v.clone())))
                .collect(),
            ack: Some(r.acker()),
        }
    }
}

impl Acknowledge for ProducerRecord {
    fn acknowledgement(&self) -> Option<&Ack> {
        self.ack.as_ref()
    }
}

/// Where a record was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
}

/// Produces each [`ProducerRecord`] and emits a [`Delivered`] once the
/// broker confirms it. The item's acknowledgement ([`crate::Ack`]) goes
/// with the `Delivered`, so the source record is decided when the
/// `Delivered` is read (or dropped on purpose) downstream: after the
/// broker confirmed the write.
///
/// Runs like an ordered [`AsyncMapper`]: records are handed to the
/// producer in input order (so a partition receives them in that order)
/// with up to `concurrency` awaiting confirmation, and [`Delivered`]s
/// leave in input order. A record the producer refuses or cannot deliver
/// (after librdkafka's own retries, within its `delivery.timeout.ms`)
/// becomes a `failed` error item carrying the record and its
/// acknowledgement: route it to a [`DeadLetterQueue`](crate::resilience::dlq::DeadLetterQueue)
/// with a [`KafkaDlq`](super::KafkaDlq) so it is written and acknowledged
/// there. An error item handed to the flow's reader counts as decided
/// (the reader owns it); read with
/// [`Flow::for_each_acked`](crate::Flow::for_each_acked) to decide
/// otherwise.
///
/// # Defaults
///
/// Concurrency 1,000 (below librdkafka's default queue of 100,000
/// messages), `enable.idempotence=true` (librdkafka's retries keep order
/// and write no duplicates), named `kafka_sink`.
///
/// # Validation
///
/// [`new`](KafkaSink::new) and [`with_config`](KafkaSink::with_config)
/// create the producer, so they fail at once on a configuration librdkafka
/// refuses. The sink's own settings are checked when it is piped: a zero
/// concurrency is refused with a [`ConfigError`] naming `KafkaSink`, the
/// stage and the field `concurrency`.
///
/// # Examples
///
/// ```no_run
/// use streamz::kafka::{KafkaSink, ProducerRecord};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let sink = KafkaSink::new("127.0.0.1:9092", "greetings")?;
/// let delivered = streamz::iter(["hello", "world"])
///     .map(|s| ProducerRecord::new(s.as_bytes().to_vec()))
///     .pipe(sink)
///     .collect()
///     .await;
/// assert!(delivered.iter().all(Result::is_ok));
/// # Ok(()) }
/// ```
pub struct KafkaSink {
    producer: FutureProducer,
    topic: Arc<str>,
    concurrency: usize,
    name: Cow<'static, str>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.topic)
            .field("concurrency", &self.concurrency)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// A sink writing to `topic` on the cluster at `brokers`.
    ///
    /// # Errors
    ///
    /// [`KafkaError::Client`] if librdkafka refuses the configuration.
    pub fn new(brokers: &str, topic: &str) -> Result<Self, KafkaError> {
        Self::with_config(&brokers_at(brokers), topic)
    }

    /// A sink with a producer made from `config` (any librdkafka producer
    /// properties; `bootstrap.servers` at least).
    ///
    /// # Errors
    ///
    /// [`KafkaError::Client`] if librdkafka refuses the configuration.
    ///
    /// [`KafkaError::Config`] for `acks` other than `all` (`-1`): a write
    /// confirmed by the leader alone can vanish with it after the source
    /// committed past the record. `enable.idempotence` is set to `true`
    /// unless given.
    pub fn with_config(config: &ClientConfig, topic: &str) -> Result<Self, KafkaError> {
        Ok(KafkaSink {
            producer: durable_producer(config)?,
            topic: Arc::from(topic),
            concurrency: 1000,
            name: Cow::Borrowed("kafka_sink"),
        })
    }

    /// How many records may await their confirmation at once (1,000 by
    /// default). Zero is refused when the sink is piped ([`ConfigError`],
    /// field `concurrency`).
    ///
    /// ```
    /// use streamz::kafka::{KafkaSink, ProducerRecord};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Creating the producer does not contact the brokers.
    /// let sink = KafkaSink::new("127.0.0.1:9092", "greetings")?.with_concurrency(0);
    /// let err = streamz::iter([ProducerRecord::new(b"hi".to_vec())]).try_pipe(sink).unwrap_err();
    /// assert_eq!(err.to_string(), "KafkaSink `kafka_sink`: `concurrency` must be greater than zero");
    /// # Ok(()) }
    /// ```
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Names the stage (for counters, spans and errors).
    pub fn named(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }
}

/// A producer configuration for the cluster at `brokers`.
pub(crate) fn brokers_at(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    config
}

/// A producer from `config` with what a write must have to count as
/// durable: all in-sync replicas confirm it (`acks=all`, implied by
/// idempotence), so an acknowledgement is never given for a write a leader
/// failover can lose. Shared by the sink and the DLQ.
pub(crate) fn durable_producer(config: &ClientConfig) -> Result<FutureProducer, KafkaError> {
    let mut config = config.clone();
    match config.get("acks") {
        None | Some("all" | "-1") => {}
        Some(_) => {
            return Err(KafkaError::Config {
                key: "acks".into(),
                reason: "must be `all`: the source commits past a record once its write is confirmed",
            });
        }
    }
    if config.get("enable.idempotence").is_none() {
        config.set("enable.idempotence", "true");
    }
    Ok(config.create()?)
}

/// Headers for librdkafka from `(key, value)` pairs.
pub(crate) fn headers<'a>(
    pairs: impl ExactSizeIterator<Item = (&'a str, &'a [u8])>,
) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(pairs.len());
    for (key, value) in pairs {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}

impl Processor<ProducerRecord, Delivered> for KafkaSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), ConfigError> {
        nonzero(self.concurrency, "concurrency").map_err(|e| e.in_stage("KafkaSink", &self.name))
    }

    fn process(self, input: Flow<ProducerRecord>) -> Flow<Delivered> {
        let KafkaSink {
            producer,
            topic: default_topic,
            concurrency,
            name,
        } = self;
        let produce = move |r: &ProducerRecord| {
            let topic: Arc<str> = match &r.topic {
                Some(t) => Arc::from(t.as_str()),
                None => default_topic.clone(),
            };
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic);
            if let Some(key) = &r.key {
                record = record.key(key.as_slice());
            }
            if let Some(value) = &r.value {
                record = record.payload(value.as_slice());
            }
            if !r.headers.is_empty() {
                record = record.headers(headers(
                    r.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                ));
            }
            // Handed to the producer now, in input order.
            let sent = producer.send_result(record).map_err(|(e, _)| e);
            // The item's acknowledgement (`crate::Ack`) goes with the
            // `Delivered` this makes once the broker confirmed the write.
            async move {
                let delivery = sent?.await.map_err(|_| KafkaError::Canceled)?;
                let (partition, offset) = match delivery {
                    Ok(d) => (d.partition, d.offset),
                    Err((e, _)) => return Err(KafkaError::Client(e)),
                };
                Ok(Delivered {
                    topic,
                    partition,
                    offset,
                })
            }
        };
        AsyncMapper::new(produce)
            .named(name)
            .with_concurrency(concurrency)
            .process(input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_zero_concurrency_is_refused_when_piped() {
        // Creating a producer does not contact the brokers.
        let sink = KafkaSink::new("127.0.0.1:9", "out")
            .unwrap()
            .named("produce");
        assert_eq!(Processor::validate(&sink), Ok(()));
        let err = crate::iter([ProducerRecord::new(b"x".to_vec())])
            .try_pipe(sink.with_concurrency(0))
            .map(drop)
            .unwrap_err();
        assert_eq!(
            (err.operator(), err.stage(), err.field()),
            (Some("KafkaSink"), Some("produce"), "concurrency")
        );
    }
}
