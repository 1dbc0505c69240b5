//! Consume -> map -> produce through Kafka, at least once, two ways on the
//! same input: a streamz pipeline (`KafkaSource` -> `map` -> `KafkaSink`)
//! and the loop one would write by hand with rdkafka for the same
//! guarantee (produce each record, commit a partition's offset only past
//! records whose delivery the broker confirmed, at most 1,000 deliveries
//! in flight, like the sink's default). Prints each one's records per
//! second and CPU time per record, and the ratio.
//!
//! Needs a broker (see the README; CI starts one and runs this with a
//! small count):
//!
//! ```sh
//! pid=$(scripts/tansu.sh start 9092)
//! STREAMZ_KAFKA_BROKERS=127.0.0.1:9092 STREAMZ_KAFKA_RECORDS=200000 \
//!     cargo run --release --example kafka_throughput --features kafka
//! kill $pid
//! ```

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use streamz::Pipeline;
use streamz::kafka::{KafkaRecord, KafkaSink, KafkaSource, ProducerRecord};

const PARTITIONS: i32 = 3;
/// Deliveries in flight in the hand-written loop (the sink's default).
const IN_FLIGHT: usize = 1_000;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Per partition: the offsets read and not yet behind the watermark (in
/// order), the confirmed ones among them, and the watermark (the next
/// offset to commit).
type Pending = HashMap<i32, (VecDeque<i64>, BTreeSet<i64>, Option<i64>)>;

/// The work per record: upper-case the value.
fn transform(value: &[u8]) -> Vec<u8> {
    value.to_ascii_uppercase()
}

/// Seconds of CPU this process has used (Linux; `None` elsewhere).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

struct Run {
    seconds: f64,
    cpu: Option<f64>,
}

impl Run {
    fn report(&self, name: &str, records: usize) {
        let rate = records as f64 / self.seconds;
        let cpu = self.cpu.map_or("n/a".to_owned(), |c| {
            format!("{:.1} µs CPU/record", c * 1e6 / records as f64)
        });
        println!(
            "{name:>12}: {records} records in {:.2} s = {rate:>9.0} records/s, {cpu}",
            self.seconds
        );
    }
}

async fn measure<F: std::future::Future<Output = Result<(), Error>>>(f: F) -> Result<Run, Error> {
    let cpu = cpu_seconds();
    let start = Instant::now();
    f.await?;
    Ok(Run {
        seconds: start.elapsed().as_secs_f64(),
        cpu: cpu.zip(cpu_seconds()).map(|(a, b)| b - a),
    })
}

/// The streamz member: reads `input` as group `group`, writes to `output`,
/// stops once `records` are written and acknowledged.
async fn streamz(
    brokers: &str,
    group: &str,
    input: &str,
    output: &str,
    records: usize,
) -> Result<(), Error> {
    let pipeline = Pipeline::new();
    let (flow, mut source) = KafkaSource::new(brokers, group)
        .topics([input])
        .start(&pipeline)?;
    let sink = KafkaSink::new(brokers, output)?;
    let mut delivered = flow
        .map(|r: &KafkaRecord| {
            // The record's acknowledgement travels beside its output by
            // itself (`streamz::Ack`).
            let out = ProducerRecord::new(transform(r.value().unwrap_or_default()));
            match r.key() {
                Some(key) => out.key(key),
                None => out,
            }
        })
        .pipe(sink);
    let mut written = 0;
    while let Some(chunk) = delivered.next_chunk().await {
        assert!(!chunk.has_errors(), "{chunk:?}");
        written += chunk.values().len();
        if written >= records {
            pipeline.shutdown();
        }
    }
    pipeline.join().await?;
    source.stopped().await;
    assert_eq!(written, records);
    Ok(())
}

/// The same by hand: produce each record; on each confirmed delivery mark
/// its offset done and move the partition's watermark over the done
/// prefix; commit the watermarks every second and at the end.
async fn by_hand(
    brokers: &str,
    group: &str,
    input: &str,
    output: &str,
    records: usize,
) -> Result<(), Error> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[input])?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()?;
    let mut pending: Pending = HashMap::new();
    let mut deliveries = futures::stream::FuturesUnordered::new();
    let mut commit = tokio::time::interval(Duration::from_secs(1));
    let (mut read, mut written) = (0, 0);
    let commit_now = |pending: &Pending, mode: CommitMode| -> Result<(), Error> {
        let mut tpl = TopicPartitionList::new();
        for (&p, (_, _, mark)) in pending {
            if let Some(next) = mark {
                tpl.add_partition_offset(input, p, Offset::Offset(*next))?;
            }
        }
        if tpl.count() > 0 {
            consumer.commit(&tpl, mode)?;
        }
        Ok(())
    };
    while written < records {
        tokio::select! {
            m = consumer.recv(), if read < records && deliveries.len() < IN_FLIGHT => {
                let m = m?;
                let (partition, offset) = (m.partition(), m.offset());
                let value = transform(m.payload().unwrap_or_default());
                let mut record = FutureRecord::to(output).payload(&value);
                if let Some(key) = m.key() {
                    record = record.key(key);
                }
                let delivery = producer.send_result(record).map_err(|(e, _)| e)?;
                pending.entry(partition).or_default().0.push_back(offset);
                deliveries.push(async move { (partition, offset, delivery.await) });
                read += 1;
            }
            Some((partition, offset, result)) = deliveries.next() => {
                result?.map_err(|(e, _)| e)?;
                written += 1;
                let (order, done, mark) = pending.get_mut(&partition).expect("tracked when read");
                done.insert(offset);
                while let Some(&first) = order.front() {
                    if !done.remove(&first) {
                        break;
                    }
                    order.pop_front();
                    *mark = Some(first + 1);
                }
            }
            _ = commit.tick() => commit_now(&pending, CommitMode::Async)?,
        }
    }
    commit_now(&pending, CommitMode::Sync)?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let brokers =
        std::env::var("STREAMZ_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let records: usize = std::env::var("STREAMZ_KAFKA_RECORDS")
        .ok()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(5_000);
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let input = format!("throughput-in-{run}");
    let (out_a, out_b) = (
        format!("throughput-streamz-{run}"),
        format!("throughput-hand-{run}"),
    );

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let topics: Vec<NewTopic<'_>> = [&input, &out_a, &out_b]
        .iter()
        .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    for made in admin.create_topics(&topics, &AdminOptions::new()).await? {
        made.map_err(|(t, e)| format!("creating {t}: {e}"))?;
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let sends: Vec<_> = (0..records)
        .map(|i| {
            let key = format!("k{i}");
            let value = format!("record {i} of the throughput run");
            producer
                .send_result(FutureRecord::to(&input).key(&key).payload(&value))
                .map_err(|(e, _)| e)
        })
        .collect::<Result<_, _>>()?;
    for d in sends {
        d.await?.map_err(|(e, _)| e)?;
    }
    println!("{records} records in `{input}` ({PARTITIONS} partitions) on {brokers}");

    // One after the other, on the same input and broker.
    let a = measure(streamz(
        &brokers,
        &format!("streamz-{run}"),
        &input,
        &out_a,
        records,
    ))
    .await?;
    let b = measure(by_hand(
        &brokers,
        &format!("hand-{run}"),
        &input,
        &out_b,
        records,
    ))
    .await?;
    a.report("streamz", records);
    b.report("by hand", records);
    println!(
        "streamz / by hand: {:.2}x the throughput{}",
        b.seconds / a.seconds,
        match (a.cpu, b.cpu) {
            (Some(x), Some(y)) if y > 0.0 => format!(", {:.2}x the CPU per record", x / y),
            _ => String::new(),
        }
    );
    Ok(())
}
