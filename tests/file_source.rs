//! The durable line source: reading, checkpoints, restarts, hostile files
//! and settings, and a crash test with SIGKILL.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use streamz::dlq::{FileSink, Fsync, Replay};
use streamz::file::{Checkpoint, FileSourceError, Line, LineError, LineSource};
use streamz::{AsyncMapper, DeadLetterQueue, Pipeline, Retry, Take};

/// Fails the test if `fut` takes longer than a minute (a hang).
async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within a minute"))
}

/// `files` files of `per_file` lines `id:<n>` in `dir`, numbered on.
fn write_input(dir: &Path, files: usize, per_file: usize) -> usize {
    let mut n = 0;
    for f in 0..files {
        let mut text = String::new();
        for _ in 0..per_file {
            text.push_str(&format!("id:{n}\n"));
            n += 1;
        }
        std::fs::write(dir.join(format!("part-{f:03}.txt")), text).unwrap();
    }
    n
}

fn id_of(text: &str) -> usize {
    text.strip_prefix("id:").unwrap().parse().unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    input: PathBuf,
    checkpoint: PathBuf,
}

fn setup(files: usize, per_file: usize) -> (Setup, usize) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let n = write_input(&input, files, per_file);
    let checkpoint = dir.path().join("in.checkpoint");
    (
        Setup {
            _dir: dir,
            input,
            checkpoint,
        },
        n,
    )
}

/// Reads every line of the source once, to the end.
async fn read_all(s: &Setup) -> (Vec<Line>, streamz::file::LineSourceHandle) {
    let pipeline = Pipeline::new();
    let (lines, handle) = LineSource::new(&s.input, &s.checkpoint)
        .start(&pipeline)
        .unwrap();
    let out = within("reading", lines.collect()).await;
    within("the join", pipeline.join()).await.unwrap();
    (support::values(out), handle)
}

#[tokio::test]
async fn reads_every_file_in_name_order_and_checkpoints_the_end() {
    let (s, n) = setup(3, 1_000);
    let (lines, handle) = read_all(&s).await;
    let ids: Vec<usize> = lines.iter().map(|l| id_of(&l.text)).collect();
    assert_eq!(ids, (0..n).collect::<Vec<_>>());
    assert_eq!(lines[1_000].file.as_ref(), "part-001.txt");
    assert_eq!((lines[1_000].number, lines[1_000].offset), (1_001, 0));
    let c: Checkpoint = handle.checkpoint().unwrap();
    assert_eq!((c.file.as_str(), c.lines), ("part-002.txt", n as u64));
    let len = std::fs::metadata(s.input.join("part-002.txt"))
        .unwrap()
        .len();
    assert_eq!(c.offset, len);
    assert_eq!(handle.stats().unacked, 0);
    // A restart reads nothing again; new files are read from their start.
    let (again, _) = read_all(&s).await;
    assert!(again.is_empty());
    std::fs::write(s.input.join("part-003.txt"), "id:3000\n").unwrap();
    let (more, _) = read_all(&s).await;
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].number, n as u64 + 1);
}

#[tokio::test]
async fn a_restart_resumes_after_the_acknowledged_prefix() {
    let (s, n) = setup(2, 5_000);
    // First run: take 3,000 lines, the rest is never acknowledged.
    let pipeline = Pipeline::new();
    let (lines, handle) = LineSource::new(&s.input, &s.checkpoint)
        .with_checkpoint_after(100)
        .start(&pipeline)
        .unwrap();
    let first = within("the first run", lines.pipe(Take::new(3_000)).collect()).await;
    within("the join", pipeline.join()).await.unwrap();
    let c = handle.checkpoint().unwrap();
    // Only lines a reader was handed are behind the checkpoint, and all
    // of the taken ones are (their chunks were all handed over).
    assert!(c.lines <= 3_000, "{c:?}");
    assert!(c.lines >= 3_000 - 512, "{c:?}");
    let (second, _) = read_all(&s).await;
    let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
    for l in support::values(first).iter().chain(&second) {
        *seen.entry(id_of(&l.text)).or_default() += 1;
    }
    assert_eq!(seen.len(), n, "every line read at least once");
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    assert_eq!(duplicates as u64, 3_000 - c.lines);
}

#[tokio::test]
async fn drops_on_purpose_move_the_checkpoint() {
    let (s, n) = setup(1, 4_000);
    let pipeline = Pipeline::new();
    let (lines, handle) = LineSource::new(&s.input, &s.checkpoint)
        .with_max_unacked(100)
        .start(&pipeline)
        .unwrap();
    let out = lines
        .filter(|l| id_of(&l.text) % 2 == 0)
        .step(
            "dedupe",
            streamz::Dedupe::new(
                |l: &Line| id_of(&l.text) % 1000,
                10_000,
                Duration::from_secs(60),
            ),
        )
        .collect();
    let out = within("the run", out).await;
    within("the join", pipeline.join()).await.unwrap();
    assert_eq!(out.len(), 500);
    assert_eq!(handle.checkpoint().unwrap().lines, n as u64);
}

#[tokio::test]
async fn reading_pauses_at_max_unacked_and_resumes_as_acks_come() {
    let (s, n) = setup(1, 3_000);
    let pipeline = Pipeline::new();
    let (lines, handle) = LineSource::new(&s.input, &s.checkpoint)
        .with_max_unacked(500)
        .start(&pipeline)
        .unwrap();
    let mut lines = lines;
    let mut held = Vec::new();
    let mut read = 0;
    // Hold the acknowledgements: reading stops near the bound.
    while read < 500 {
        let mut chunk = within("a chunk", lines.next_acked_chunk()).await.unwrap();
        read += chunk.len();
        held.extend(chunk.take_acks());
    }
    let waited = tokio::time::timeout(Duration::from_millis(300), lines.next_acked_chunk()).await;
    assert!(waited.is_err(), "reading went on past max_unacked");
    assert!(handle.stats().unacked >= 500);
    held.drain(..).for_each(streamz::Ack::ack);
    let rest = within("the rest", lines.collect()).await;
    assert_eq!(read + rest.len(), n);
    within("the join", pipeline.join()).await.unwrap();
    assert_eq!(handle.checkpoint().unwrap().lines, n as u64);
}

#[tokio::test]
async fn bad_lines_become_error_items_carrying_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    let mut f = std::fs::File::create(&input).unwrap();
    f.write_all(b"ok one\r\n").unwrap();
    f.write_all(&[0xff, 0xfe, b'\n']).unwrap();
    f.write_all(&[b'x'; 100]).unwrap();
    f.write_all(b"\nlast without newline").unwrap();
    drop(f);
    let pipeline = Pipeline::new();
    let (lines, handle) = LineSource::new(&input, dir.path().join("cp"))
        .with_max_line(50)
        .start(&pipeline)
        .unwrap();
    let out = within("reading", lines.collect()).await;
    within("the join", pipeline.join()).await.unwrap();
    let (ok, errors) = support::split(out);
    let texts: Vec<&str> = ok.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["ok one", "last without newline"]);
    assert_eq!(errors.len(), 2);
    let mut errors = errors.into_iter();
    let mut utf8 = errors.next().unwrap();
    assert_eq!(
        utf8.cause().unwrap().to_string(),
        LineError::NotUtf8.to_string()
    );
    assert_eq!(utf8.take_item::<Line>().unwrap().number, 2);
    let mut long = errors.next().unwrap();
    assert!(
        long.to_string()
            .contains("101 bytes is longer than the limit of 50"),
        "{long}"
    );
    assert_eq!(long.take_item::<Line>().unwrap().text.len(), 50);
    // Error items handed over are decided too: the checkpoint is past
    // them, at the start of the last line, which has no end yet.
    assert_eq!(handle.checkpoint().unwrap().lines, 3);
}

#[tokio::test]
async fn hostile_checkpoints_and_inputs_are_refused_with_a_reason() {
    let (s, _) = setup(1, 10);
    let start = |s: &Setup| LineSource::new(&s.input, &s.checkpoint).start(&Pipeline::new());
    std::fs::write(&s.checkpoint, "{ not json").unwrap();
    let e = start(&s).unwrap_err();
    assert!(matches!(e, FileSourceError::Checkpoint { .. }), "{e}");
    assert!(e.to_string().contains("not a checkpoint"), "{e}");

    let past = r#"{"version":1,"file":"part-000.txt","offset":99999,"lines":0}"#;
    std::fs::write(&s.checkpoint, past).unwrap();
    let e = start(&s).unwrap_err();
    assert!(e.to_string().contains("past its end"), "{e}");

    let mid_line = r#"{"version":1,"file":"part-000.txt","offset":3,"lines":0}"#;
    std::fs::write(&s.checkpoint, mid_line).unwrap();
    let e = start(&s).unwrap_err();
    assert!(e.to_string().contains("not the start of a line"), "{e}");

    // A checkpoint whose file is gone resumes at the next file.
    let gone = r#"{"version":1,"file":"part-","offset":3,"lines":7}"#;
    std::fs::write(&s.checkpoint, gone).unwrap();
    let (lines, _) = read_all(&s).await;
    assert_eq!(lines.len(), 10);
    assert_eq!(lines[0].number, 8);

    let e = LineSource::new(s.input.join("missing"), &s.checkpoint)
        .start(&Pipeline::new())
        .unwrap_err();
    assert!(matches!(e, FileSourceError::Io { .. }), "{e}");
}

#[tokio::test]
async fn zero_and_huge_settings_are_refused_by_name() {
    let (s, _) = setup(1, 1);
    let field = |src: LineSource| match src.start(&Pipeline::new()) {
        Err(FileSourceError::Config(e)) => e.field().to_string(),
        other => panic!("accepted: {:?}", other.map(|_| ())),
    };
    let src = || LineSource::new(&s.input, &s.checkpoint);
    assert_eq!(field(src().with_max_unacked(0)), "max_unacked");
    assert_eq!(field(src().with_checkpoint_after(0)), "checkpoint_after");
    assert_eq!(
        field(src().with_checkpoint_interval(Duration::ZERO)),
        "checkpoint_interval"
    );
    assert_eq!(field(src().with_max_line(0)), "max_line");
    assert_eq!(field(src().with_max_line(usize::MAX)), "max_line");
    // MAX means "no limit" where it can.
    let pipeline = Pipeline::new();
    let (lines, handle) = src()
        .with_max_unacked(usize::MAX)
        .with_checkpoint_after(u64::MAX)
        .with_checkpoint_interval(Duration::MAX)
        .with_drain_timeout(Duration::MAX)
        .start(&pipeline)
        .unwrap();
    assert_eq!(within("reading", lines.collect()).await.len(), 1);
    within("the join", pipeline.join()).await.unwrap();
    assert_eq!(handle.checkpoint().unwrap().lines, 1);
}

#[tokio::test]
async fn an_empty_directory_ends_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::new();
    let (lines, handle) = LineSource::new(dir.path(), dir.path().join("cp"))
        .start(&pipeline)
        .unwrap();
    assert!(within("reading", lines.collect()).await.is_empty());
    within("the join", pipeline.join()).await.unwrap();
    assert!(handle.checkpoint().is_none());
}

#[tokio::test]
async fn an_abort_keeps_what_was_decided_and_nothing_more() {
    let (s, n) = setup(1, 2_000);
    let pipeline = Pipeline::new();
    let (lines, handle) = LineSource::new(&s.input, &s.checkpoint)
        .start(&pipeline)
        .unwrap();
    let mut lines = lines;
    let mut read = 0;
    while read < 700 {
        read += within("a chunk", lines.next_chunk()).await.unwrap().len();
    }
    // Read but not handed over: never decided.
    let _held = within("a chunk", lines.next_acked_chunk()).await.unwrap();
    pipeline.abort();
    drop(lines);
    within("the join", pipeline.join()).await.ok();
    assert_eq!(handle.checkpoint().unwrap().lines, read as u64);
    let (rest, _) = read_all(&s).await;
    assert_eq!(rest.len(), n - read);
}

// ---------------------------------------------------------------------
// The crash test.

const CRASH_AFTER: u64 = 50;
const CRASH_UNACKED: usize = 1_000;

/// The pipeline the crash test kills: run only as a child process of
/// `a_pipeline_killed_with_sigkill_loses_nothing`. File source → an
/// `AsyncMapper` failing every tenth line (after a retry) → a file DLQ →
/// an output file written by `for_each_acked`. Prints `written <n>` as it
/// goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of the crash test"]
async fn crash_child_lines() {
    let Ok(dir) = std::env::var("STREAMZ_CRASH_DIR") else {
        return; // run by hand with --ignored: only the crash test starts it
    };
    let dir = PathBuf::from(dir);
    let pipeline = Pipeline::new();
    let (lines, _) = LineSource::new(dir.join("in"), dir.join("in.checkpoint"))
        .with_checkpoint_after(CRASH_AFTER)
        .with_max_unacked(CRASH_UNACKED)
        .start(&pipeline)
        .unwrap();
    let mapper = AsyncMapper::new(|l: &Line| {
        let id = id_of(&l.text);
        async move {
            // Slow enough that lines stay in flight longer than the
            // checkpoint keeper's look period: a source that acknowledged
            // too early would lose them at a kill.
            tokio::time::sleep(Duration::from_millis(20)).await;
            if id % 10 == 0 {
                Err(std::io::Error::other(format!("{id} is refused")))
            } else {
                Ok(id)
            }
        }
    })
    .with_concurrency(32)
    .with_retry(
        Retry::attempts(2).with_backoff(Duration::from_micros(50), Duration::from_micros(50)),
    );
    // A record the sink wrote is in the page cache, which a SIGKILL does
    // not lose (a power loss would: that is what Fsync::EveryRecord, the
    // default, is for); syncing a thousand records one by one would make
    // this test slow.
    let sink = FileSink::<Line>::create(dir.join("dlq.jsonl"))
        .await
        .unwrap()
        .with_fsync(Fsync::Never);
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("out.txt"))
        .unwrap();
    let mut written = 0u64;
    lines
        .pipe(mapper)
        .pipe(DeadLetterQueue::new(sink))
        .for_each_acked(|item| {
            let id = item.unwrap();
            let wrote = out.write_all(format!("{id}\n").as_bytes());
            written += 1;
            if written % 100 == 0 {
                println!("written {written}");
            }
            std::future::ready(wrote)
        })
        .await
        .unwrap();
    pipeline.join().await.unwrap();
    println!("done");
}

/// Killed with SIGKILL three times at different points, then run to the
/// end: every line's outcome is in the output or the dead-letter file,
/// and each crash read again at most what the checkpoint bound says:
/// `with_checkpoint_after` decided lines plus `with_max_unacked` in flight
/// plus one chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_killed_with_sigkill_loses_nothing() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let n = write_input(&dir.path().join("in"), 4, 2_500);
    let kills = [1_500u64, 500, 2_500];
    for (round, after) in kills.iter().chain([&u64::MAX]).enumerate() {
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child_lines", "--ignored", "--nocapture"])
            .env("STREAMZ_CRASH_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let finished = within("the child's progress", async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line == "done" {
                    return true;
                }
                let written: Option<u64> =
                    line.strip_prefix("written ").and_then(|n| n.parse().ok());
                if written.is_some_and(|w| w >= *after) {
                    return false;
                }
            }
            panic!("round {round}: the child exited without finishing");
        })
        .await;
        if finished {
            assert_eq!(*after, u64::MAX, "round {round} finished before its kill");
            child.wait().await.unwrap();
            break;
        }
        child.start_kill().unwrap(); // SIGKILL
        child.wait().await.unwrap();
        eprintln!(
            "after kill {round}: checkpoint {:?}, output lines {}",
            std::fs::read_to_string(dir.path().join("in.checkpoint")).ok(),
            std::fs::read_to_string(dir.path().join("out.txt"))
                .map(|t| t.lines().count())
                .unwrap_or(0)
        );
    }

    let mut outcomes: BTreeMap<usize, usize> = BTreeMap::new();
    let out = std::fs::read_to_string(dir.path().join("out.txt")).unwrap();
    for line in out.lines() {
        *outcomes.entry(line.parse().unwrap()).or_default() += 1;
    }
    let mut dead = 0;
    let replay = Replay::<Line>::open(dir.path().join("dlq.jsonl"))
        .await
        .unwrap();
    for record in support::values(replay.into_flow().collect().await) {
        let line = record.item.expect("the record carries its line");
        assert_eq!(id_of(&line.text) % 10, 0, "{line:?}");
        *outcomes.entry(id_of(&line.text)).or_default() += 1;
        dead += 1;
    }
    let missing: Vec<usize> = (0..n).filter(|i| !outcomes.contains_key(i)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert!(dead >= n / 10);
    let duplicates: usize = outcomes.values().map(|c| c - 1).sum();
    let bound = kills.len() * (CRASH_AFTER as usize + CRASH_UNACKED + 4096);
    eprintln!(
        "crash: {} kills, {duplicates} outcomes repeated (bound {bound})",
        kills.len()
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates, bound {bound}"
    );
}

#[tokio::test]
async fn a_checkpoint_for_another_file_or_an_unwritable_place_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("a.txt");
    std::fs::write(&input, "x\n").unwrap();
    let checkpoint = dir.path().join("cp");
    std::fs::write(
        &checkpoint,
        r#"{"version":1,"file":"b.txt","offset":0,"lines":3}"#,
    )
    .unwrap();
    let e = LineSource::new(&input, &checkpoint)
        .start(&Pipeline::new())
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("it is for b.txt, not for the input a.txt"),
        "{e}"
    );

    let nowhere = dir.path().join("no/such/dir/cp");
    let e = LineSource::new(&input, &nowhere)
        .start(&Pipeline::new())
        .unwrap_err();
    assert!(matches!(e, FileSourceError::Checkpoint { .. }), "{e}");
    assert!(e.to_string().contains("cannot be written"), "{e}");
}

#[tokio::test]
async fn line_numbers_saturate_instead_of_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("a.txt");
    std::fs::write(&input, "1\n2\n3\n").unwrap();
    let checkpoint = dir.path().join("cp");
    let max = format!(
        r#"{{"version":1,"file":"a.txt","offset":2,"lines":{}}}"#,
        u64::MAX - 1
    );
    std::fs::write(&checkpoint, max).unwrap();
    let pipeline = Pipeline::new();
    let (lines, _) = LineSource::new(&input, &checkpoint)
        .start(&pipeline)
        .unwrap();
    let lines = support::values(within("reading", lines.collect()).await);
    within("the join", pipeline.join()).await.unwrap();
    let numbers: Vec<u64> = lines.iter().map(|l| l.number).collect();
    assert_eq!(numbers, [u64::MAX, u64::MAX]);
}

#[tokio::test]
async fn a_last_line_without_its_end_is_read_again_once_complete() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("a.txt");
    std::fs::write(&input, "b1\nb2-partial").unwrap();
    let checkpoint = dir.path().join("cp");
    let read = |input: PathBuf, checkpoint: PathBuf| async move {
        let pipeline = Pipeline::new();
        let (lines, _) = LineSource::new(input, checkpoint).start(&pipeline).unwrap();
        let lines = support::values(within("reading", lines.collect()).await);
        within("the join", pipeline.join()).await.unwrap();
        lines.into_iter().map(|l| l.text).collect::<Vec<_>>()
    };
    assert_eq!(
        read(input.clone(), checkpoint.clone()).await,
        ["b1", "b2-partial"]
    );
    // The checkpoint stayed at the start of the unfinished line.
    let c: Checkpoint = serde_json::from_slice(&std::fs::read(&checkpoint).unwrap()).unwrap();
    assert_eq!((c.offset, c.lines), (3, 1));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .unwrap();
    f.write_all(b"-completed\nb3\n").unwrap();
    assert_eq!(
        read(input, checkpoint).await,
        ["b2-partial-completed", "b3"]
    );
}

#[tokio::test]
async fn a_file_gone_before_it_is_read_is_reported_and_the_rest_is_read() {
    let (s, _) = setup(3, 3_000);
    let pipeline = Pipeline::new();
    let (mut lines, _) = LineSource::new(&s.input, &s.checkpoint)
        .start(&pipeline)
        .unwrap();
    // The reader waits for room after a few chunks of the first file.
    let first = within("a chunk", lines.next_chunk()).await.unwrap();
    std::fs::remove_file(s.input.join("part-001.txt")).unwrap();
    let rest = within("reading", lines.collect()).await;
    within("the join", pipeline.join()).await.unwrap();
    let (values, errors) = support::split(rest);
    assert_eq!(first.len() + values.len(), 6_000);
    assert_eq!(values.last().map(|l| id_of(&l.text)), Some(8_999));
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].to_string().contains("part-001.txt"),
        "{}",
        errors[0]
    );
}

#[tokio::test]
async fn a_dead_letter_names_the_file_line_and_offset_its_item_was_read_at() {
    let (s, n) = setup(2, 50);
    let dlq_path = s.checkpoint.with_extension("dlq.jsonl");
    let pipeline = Pipeline::new();
    let (lines, _handle) = LineSource::new(&s.input, &s.checkpoint)
        .with_positions(true)
        .start(&pipeline)
        .unwrap();
    let out = lines
        // From here on the item is a number, not a line.
        .map(|l: &Line| id_of(&l.text))
        .try_map(|id: &usize| {
            if id % 20 == 7 {
                Err(format!("no price for {id}"))
            } else {
                Ok(*id)
            }
        })
        .pipe(DeadLetterQueue::new(
            FileSink::<usize>::create(&dlq_path).await.unwrap(),
        ))
        .collect();
    let out = within("reading", out).await;
    assert_eq!(out.len(), n - 5);
    let letters = support::dead_letters::<usize>(&dlq_path).await;
    let places: Vec<(usize, Option<streamz::SourcePosition>)> = letters
        .into_iter()
        .map(|l| (l.item.unwrap(), l.source))
        .collect();
    let expected: Vec<(usize, Option<streamz::SourcePosition>)> = [7usize, 27, 47, 67, 87]
        .into_iter()
        .map(|id| {
            let (file, index) = (id / 50, id % 50);
            let at = streamz::SourcePosition::Line {
                file: format!("part-{file:03}.txt").into(),
                line: id as u64 + 1,
                // Lines "id:0".."id:9" take 5 bytes, "id:10".."id:99" 6.
                offset: (0..index)
                    .map(|i| format!("id:{}\n", file * 50 + i).len() as u64)
                    .sum(),
            };
            (id, Some(at))
        })
        .collect();
    assert_eq!(places, expected);
}
