//! A streamz pipeline as a member of a Kafka consumer group: read orders,
//! price them, write the priced orders to a topic and the malformed ones
//! to a dead-letter topic, committing offsets only past orders whose
//! outcome is written (at least once).
//!
//! Needs a broker. With the Tansu broker (no Java; see the README):
//!
//! ```sh
//! pid=$(scripts/tansu.sh start 9092)
//! STREAMZ_KAFKA_BROKERS=127.0.0.1:9092 cargo run --example kafka_pipeline --features kafka
//! kill $pid
//! ```
//!
//! Start it twice at once (same `STREAMZ_KAFKA_GROUP`) to watch the two
//! members share the partitions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use streamz::Pipeline;
use streamz::dlq::DeadLetterQueue;
use streamz::kafka::{KafkaDlq, KafkaRecord, KafkaSink, KafkaSource, ProducerRecord};

const ORDERS: usize = 1_000;

/// An order line is `id,quantity,unit price in cents`.
fn price(record: &KafkaRecord) -> Result<ProducerRecord, String> {
    let line =
        std::str::from_utf8(record.value().unwrap_or_default()).map_err(|e| e.to_string())?;
    let fields: Vec<&str> = line.split(',').collect();
    let [id, quantity, cents] = fields[..] else {
        return Err(format!("expected `id,quantity,cents`, got {line:?}"));
    };
    let quantity: u64 = quantity.parse().map_err(|e| format!("quantity: {e}"))?;
    let cents: u64 = cents.parse().map_err(|e| format!("price: {e}"))?;
    // The order's acknowledgement travels beside its output by itself
    // (`streamz::Ack`): the order counts as done once the broker has the
    // priced order and its `Delivered` is read below. `acking` keeps a
    // handle on the order, so a priced order the sink cannot write reaches
    // the dead-letter topic with the order's own key and value.
    Ok(ProducerRecord::new(format!("{id},{}", quantity * cents))
        .key(id.as_bytes())
        .acking(record.acker()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let brokers =
        std::env::var("STREAMZ_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let group = std::env::var("STREAMZ_KAFKA_GROUP").unwrap_or_else(|_| format!("pricing-{run}"));
    let (orders, priced, dead) = (
        format!("orders-{group}"),
        format!("priced-{group}"),
        format!("orders-dlq-{group}"),
    );

    // Topics and some orders, one in fifty malformed.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let topics = [
        NewTopic::new(&orders, 4, TopicReplication::Fixed(1)),
        NewTopic::new(&priced, 4, TopicReplication::Fixed(1)),
        NewTopic::new(&dead, 1, TopicReplication::Fixed(1)),
    ];
    for made in admin.create_topics(&topics, &AdminOptions::new()).await? {
        if let Err((topic, e)) = made {
            if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                return Err(format!("creating {topic}: {e}").into());
            }
        }
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    for i in 0..ORDERS {
        let line = if i % 50 == 49 {
            format!("order-{i},many,199")
        } else {
            format!("order-{i},{},199", i % 7 + 1)
        };
        let key = format!("order-{i}");
        producer
            .send(
                FutureRecord::to(&orders).key(&key).payload(&line),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    println!("produced {ORDERS} orders to `{orders}` on {brokers}");

    // The member: source -> price -> DLQ for malformed orders -> sink.
    let pipeline = Pipeline::new();
    let (records, mut source) = KafkaSource::new(&brokers, &group)
        .topics([orders.as_str()])
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .start(&pipeline)?;
    let dlq = DeadLetterQueue::<_, KafkaRecord, _>::new(KafkaDlq::new(&brokers, &dead)?);
    let sink = KafkaSink::new(&brokers, &priced)?;
    let mut delivered = records.try_map(price).pipe(dlq).pipe(sink);

    // Stop once every order's outcome is written, priced or dead-lettered:
    // all of them read, none waiting for its acknowledgement.
    let mut written = 0;
    let mut check = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            chunk = delivered.next_chunk() => match chunk {
                Some(chunk) => written += chunk.values().len(),
                None => break,
            },
            _ = check.tick() => {
                let s = source.stats();
                if s.read >= ORDERS as u64 && s.unacked == 0 {
                    pipeline.shutdown();
                }
            }
        }
    }
    pipeline.join().await?;
    source.stopped().await;

    let stats = source.stats();
    let letters = pipeline
        .stage_metrics("dead_letter_queue")
        .map_or(0, |m| m.dead_lettered);
    println!(
        "group `{group}`: read {}, priced {written} into `{priced}`, {letters} malformed into `{dead}`, {} offset commits, {} unacknowledged",
        stats.read, stats.commits, stats.unacked
    );
    assert_eq!(
        written as u64 + letters,
        stats.read,
        "every order read is accounted for"
    );
    Ok(())
}
