//! Kafka (feature `kafka`): scale a pipeline out over machines as members
//! of a consumer group, with a producing sink and a dead-letter topic.
//!
//! - [`KafkaSource`] joins a consumer group and yields [`KafkaRecord`]s
//!   (topic, partition, offset, key, value, headers) in partition order.
//! - [`KafkaSink`] produces [`ProducerRecord`]s and emits a [`Delivered`]
//!   per confirmed write.
//! - [`KafkaDlq`] is a [`DeadLetterSink`](crate::resilience::dlq::DeadLetterSink)
//!   writing dead letters to a topic: the original key and value, with the
//!   error's context in headers.
//!
//! # At least once: the acknowledgement travels with the item
//!
//! Every record carries an acknowledgement ([`Ack`]). An item derived
//! from a record keeps it ([`KafkaRecord::acker`], [`Acked`], or a field
//! of your own type implementing [`Acknowledge`]); whoever makes the
//! item's outcome durable acknowledges it: the sink once the broker
//! confirms the output record, the DLQ once the dead letter is written, a
//! filter when it drops a record on purpose. The source commits each
//! partition's offset up to its first unacknowledged record. Dropping an
//! acknowledgement acknowledges nothing, so an abort or a crash loses no
//! record: the group reads it again (and what followed it, which may
//! produce duplicates). See `docs/scaling.md`.
//!
//! librdkafka is built from source with the crate (the Debian package is
//! too old for current brokers); building needs a C compiler and `make`.

mod dlq;
mod offsets;
mod record;
mod sink;
mod source;

pub use dlq::KafkaDlq;
pub use record::{Ack, Acked, Acknowledge, KafkaRecord};
pub use sink::{Delivered, KafkaSink, ProducerRecord};
pub use source::{KafkaSource, KafkaSourceHandle, KafkaSourceStats};

/// Why a Kafka source, sink or DLQ could not be made, or a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaError {
    /// librdkafka refused a configuration or reported an error.
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    /// The producer was dropped before it reported a delivery.
    #[error("kafka: the producer was dropped before it confirmed the delivery")]
    Canceled,
    /// A setting streamz needs is missing or contradicts its guarantees.
    #[error("kafka setting `{key}` {reason}")]
    Config {
        /// The setting.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A setting of the source itself is out of range (a zero
    /// [`max_unacked`](KafkaSource::with_max_unacked)), found when it starts.
    #[error(transparent)]
    Invalid(#[from] crate::ConfigError),
}
