//! A durable local source: lines of a file, or of a directory of files,
//! read at least once across crashes and restarts, with no server.
//!
//! [`LineSource`] reads the files in name order and keeps a
//! [`Checkpoint`] file of how far every line's outcome is decided. Each
//! line carries an [`Ack`](crate::Ack) (see `Ack` for when one is met: a
//! line handed to the reader, dropped on purpose by a filter, written by a
//! dead-letter queue). The checkpoint moves only past the contiguous
//! prefix of acknowledged lines, and is replaced atomically (write, fsync,
//! rename), so after a crash the source resumes at a line whose outcome
//! was not yet decided: nothing is lost, and what is read again is bounded
//! (see [`LineSource`]).
//!
//! JSON-lines are read as lines and parsed in the chain
//! ([`Line::json`]), so a line that does not parse becomes an error item
//! carrying the line, for a dead-letter queue.

mod checkpoint;
mod reader;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use checkpoint::Checkpoint;

use crate::base::ack::{Ack, SourcePosition, Watermarks};
use crate::base::chunk::Chunk;
use crate::base::config::{ConfigError, nonzero};
use crate::base::counters::Counters;
use crate::base::error::StreamError;
use crate::base::signal::Watch;
use crate::base::time;
use crate::flow::Flow;
use crate::flow::pipeline::Pipeline;
use crate::flow::source::ChunkSource;
use reader::{Batch, Failure, Reader};

/// One line of a [`LineSource`]: its text (without the line end), the
/// file it came from and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Line {
    /// The file's name (within the source's directory).
    pub file: Arc<str>,
    /// The line's number, from 1, counted over every file since the
    /// source first started (a line read again after a restart has the
    /// same number).
    pub number: u64,
    /// The byte offset of the line's start in its file.
    pub offset: u64,
    /// The text, without "\n" or "\r\n".
    pub text: String,
}

impl Line {
    /// The line parsed as JSON.
    ///
    /// # Errors
    ///
    /// [`NotARecord`](crate::dlq::NotARecord) for a line that is not a `T`
    /// in JSON: what is wrong and at which column, without quoting the
    /// line (serde_json's own message quotes the values it could not read,
    /// and would carry them into logs and dead letters).
    ///
    /// ```
    /// # use streamz::file::Line;
    /// # fn parse(line: &Line) {
    /// #[derive(serde::Deserialize)]
    /// struct Order { id: u64 }
    /// let order: Result<Order, _> = line.json();
    /// # }
    /// ```
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, crate::dlq::NotARecord> {
        serde_json::from_str(&self.text).map_err(|e| crate::dlq::NotARecord::from(&e))
    }
}

/// Why a line became an error item (it carries the [`Line`], its text made
/// valid UTF-8 and cut at the limit, and its acknowledgement).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LineError {
    /// The line is longer than [`LineSource::with_max_line`].
    #[error("a line of {len} bytes is longer than the limit of {max} bytes")]
    TooLong {
        /// The limit.
        max: usize,
        /// The line's length in the file, with its end.
        len: usize,
    },
    /// The line is not valid UTF-8.
    #[error("the line is not valid UTF-8")]
    NotUtf8,
}

/// Why a [`LineSource`] did not start, or stopped reading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileSourceError {
    /// A setting is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The checkpoint file cannot be used: unreadable, or it does not fit
    /// the files (a file it names was replaced by a shorter one). The
    /// source does not guess: remove the checkpoint to read from the
    /// start, or restore the files.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Reads the lines of a file, or of every file of a directory in name
/// order, at least once across crashes, resuming from a checkpoint file.
///
/// **The guarantee.** A line's outcome is decided when its
/// [`Ack`](crate::Ack) is met: handed to the flow's reader, written by a
/// dead-letter queue, dropped on purpose and counted by an operator. The
/// checkpoint is written only past lines that are all decided, so after a
/// crash (even `SIGKILL`) nothing is lost. What is read again after a
/// crash is at most the lines decided since the last checkpoint (at most
/// [`with_checkpoint_after`](LineSource::with_checkpoint_after), 5,000 by
/// default, or what was decided in the last [`with_checkpoint_interval`]
/// if that is more) plus the lines in flight (at most
/// [`with_max_unacked`](LineSource::with_max_unacked), 10,000 by default,
/// plus one chunk).
///
/// Lines are read on a blocking thread, in chunks of the pipeline's
/// `max_chunk` that never span two files; **the checkpoint moves by
/// chunks**: past a chunk once all its lines, and every line before, are
/// decided (a `Take(3)` at the head of a chunk leaves it where it was). A
/// last line without a newline is handed over, but the checkpoint stays at
/// its start, so a file still being written is read on whole next time.
///
/// Reading pauses while `max_unacked` lines wait for their acknowledgement
/// ([`LineSourceStats::stalled`]): **leave room for what the chain holds**
/// (a `Batcher`'s batch, a window's lines), or it waits for lines that
/// never come. The source ends at the end of the last file; then, or at a
/// graceful shutdown, or when its flow is no longer read, it waits for the
/// lines still in the chain to be decided (up to [`with_drain_timeout`],
/// or until none was decided for a quiet period) and writes the last
/// checkpoint. An abort writes what is decided and stops.
///
/// A directory's files are read in byte order of their names; hidden
/// files, subdirectories and symlinks are skipped, and a file whose name
/// is not UTF-8 is refused at start. A file that goes away before it is
/// read is reported as an error item; the others are still read.
///
/// A line longer than [`with_max_line`](LineSource::with_max_line) (1 MiB)
/// or not UTF-8 becomes an error item ([`LineError`]) carrying the line.
///
/// [`with_checkpoint_interval`]: LineSource::with_checkpoint_interval
/// [`with_drain_timeout`]: LineSource::with_drain_timeout
///
/// # Examples
///
/// ```
/// use streamz::file::LineSource;
/// use streamz::Pipeline;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// std::fs::write(dir.path().join("orders.jsonl"), "{\"id\":1}\n{\"id\":2}\nnot json\n")?;
/// let checkpoint = dir.path().join("orders.checkpoint");
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: u64 }
///
/// let pipeline = Pipeline::new();
/// let (lines, handle) = LineSource::new(dir.path().join("orders.jsonl"), &checkpoint)
///     .start(&pipeline)?;
/// let out = lines.try_map(|line| line.json::<Order>()).collect().await;
/// pipeline.join().await?;
/// assert_eq!(out.len(), 3);
/// assert!(out[2].is_err()); // "not json", carrying its line
///
/// // Every line was handed over: the checkpoint is at the end, and a
/// // restarted source reads nothing again.
/// assert_eq!(handle.checkpoint().unwrap().lines, 3);
/// let pipeline = Pipeline::new();
/// let (lines, _) = LineSource::new(dir.path().join("orders.jsonl"), &checkpoint)
///     .start(&pipeline)?;
/// assert!(lines.collect().await.is_empty());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LineSource {
    input: PathBuf,
    checkpoint: PathBuf,
    name: String,
    max_unacked: usize,
    checkpoint_after: u64,
    checkpoint_every: Duration,
    drain_for: Duration,
    max_line: usize,
    positions: bool,
}

/// The longest line limit accepted (1 GiB).
const MAX_LINE_LIMIT: usize = 1 << 30;

/// How often the checkpoint keeper looks at the acknowledgements.
const LOOK: Duration = Duration::from_millis(100);

/// How often it looks while the reader waits for acknowledgements or the
/// source drains.
const SETTLE_CHECK: Duration = Duration::from_millis(20);

impl LineSource {
    /// Lines of `input` (a file, or a directory whose files are read in
    /// name order; hidden files are skipped), resuming from the checkpoint
    /// file `checkpoint` (created on the first checkpoint; its directory
    /// must exist).
    pub fn new(input: impl Into<PathBuf>, checkpoint: impl AsRef<Path>) -> Self {
        LineSource {
            input: input.into(),
            checkpoint: checkpoint.as_ref().to_path_buf(),
            name: "lines".into(),
            max_unacked: 10_000,
            checkpoint_after: 5_000,
            checkpoint_every: Duration::from_secs(1),
            drain_for: Duration::from_secs(30),
            max_line: 1 << 20,
            positions: false,
        }
    }

    /// Gives each line's acknowledgement the line's position
    /// ([`SourcePosition::Line`](crate::SourcePosition::Line): file, line
    /// number, offset), so that the dead-letter record of whatever the line
    /// became says where it was read ([`DeadLetter::source`](crate::DeadLetter::source)).
    /// Off by default: it costs an allocation per line, which took reading
    /// 1.32x to 1.39x as long (`scripts/bench-compare.sh HEAD line_source`
    /// against the same tree without positions, both runtimes). Without
    /// it, an error that still carries the [`Line`] has its file and
    /// number in the item itself.
    ///
    /// ```
    /// use streamz::file::LineSource;
    ///
    /// let source = LineSource::new("orders.jsonl", "orders.checkpoint").with_positions(true);
    /// # let _ = source;
    /// ```
    pub fn with_positions(mut self, on: bool) -> Self {
        self.positions = on;
        self
    }

    /// Names the source's stage (default `lines`).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// At most this many lines wait for their acknowledgement before
    /// reading pauses (default 10,000): with the checkpoint settings, it
    /// bounds what is read again after a crash. It must exceed what the
    /// chain's stages hold at once (batches, windows). Zero is refused by
    /// [`start`](LineSource::start).
    pub fn with_max_unacked(mut self, n: usize) -> Self {
        self.max_unacked = n;
        self
    }

    /// Writes the checkpoint once this many more lines are decided (default
    /// 5,000), besides every [`with_checkpoint_interval`]: the bound on
    /// lines decided but read again after a crash. Zero is refused.
    ///
    /// [`with_checkpoint_interval`]: LineSource::with_checkpoint_interval
    pub fn with_checkpoint_after(mut self, lines: u64) -> Self {
        self.checkpoint_after = lines;
        self
    }

    /// Writes the checkpoint at least this often while lines are being
    /// decided (default 1 s; `Duration::MAX`: only by count and at the
    /// end; zero is refused). The keeper looks every 100 ms, so a shorter
    /// interval acts as 100 ms.
    pub fn with_checkpoint_interval(mut self, every: Duration) -> Self {
        self.checkpoint_every = every;
        self
    }

    /// How long the source waits, after its last line or at a graceful
    /// shutdown, for the lines in the chain to be decided before it writes
    /// the last checkpoint (default 30 s; `Duration::MAX`: until they are,
    /// or until none was decided for a quiet period of the checkpoint
    /// interval, 1 to 10 s). It bounds only the source's own wait: the
    /// chain's stages finish on their own, and `Pipeline::join` waits for
    /// them.
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_for = timeout;
        self
    }

    /// The longest line kept whole, in bytes (default 1 MiB, at most 1
    /// GiB; zero is refused): a longer one becomes an error item carrying
    /// its first `bytes` bytes (made valid UTF-8, so a character cut in
    /// half becomes U+FFFD).
    pub fn with_max_line(mut self, bytes: usize) -> Self {
        self.max_line = bytes;
        self
    }

    /// Checks the settings ([`start`](LineSource::start) does too).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let check = || -> Result<(), ConfigError> {
            nonzero(self.max_unacked, "max_unacked")?;
            nonzero(self.checkpoint_after, "checkpoint_after")?;
            nonzero(self.checkpoint_every, "checkpoint_interval")?;
            nonzero(self.max_line, "max_line")?;
            if self.max_line > MAX_LINE_LIMIT {
                return Err(ConfigError::new(
                    "max_line",
                    format!("must be at most {MAX_LINE_LIMIT} bytes"),
                ));
            }
            Ok(())
        };
        check().map_err(|e| e.in_stage("LineSource", &self.name))
    }

    /// Starts reading on `pipeline`: the flow of lines, and a handle to
    /// watch the source.
    ///
    /// # Errors
    ///
    /// [`FileSourceError::Config`] for a setting out of range,
    /// [`FileSourceError::Io`] if the input cannot be listed or opened,
    /// [`FileSourceError::Checkpoint`] if the checkpoint cannot be read or
    /// does not fit the files.
    pub fn start(
        self,
        pipeline: &Pipeline,
    ) -> Result<(Flow<Line>, LineSourceHandle), FileSourceError> {
        self.validate()?;
        let files = list(&self.input, &self.checkpoint)?;
        let saved =
            Checkpoint::load(&self.checkpoint).map_err(|reason| FileSourceError::Checkpoint {
                path: self.checkpoint.clone(),
                reason,
            })?;
        let (start, base) = match &saved {
            None => ((0, 0), 0),
            Some(c) => {
                if self.input.is_file() && *files[0].0 != *c.file {
                    return Err(FileSourceError::Checkpoint {
                        path: self.checkpoint.clone(),
                        reason: format!("it is for {}, not for the input {}", c.file, files[0].0),
                    });
                }
                (resume_at(&files, c, &self.checkpoint)?, c.lines)
            }
        };
        writable(&self.checkpoint)?;
        let counters = pipeline.register_source(self.name.clone());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                marks: Watermarks::default(),
                passed: 0,
                waker: None,
            }),
            done: AtomicBool::new(false),
            ended: Notify::new(),
            read: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            checkpoint_errors: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            last: Mutex::new(saved),
        });
        let (tx, rx) = mpsc::channel(2);
        let tx_for_panic = tx.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let names: Vec<Arc<str>> = files.iter().map(|(n, _)| n.clone()).collect();
        let reader = Reader {
            files,
            start,
            first_number: base,
            batch: pipeline.edge().max_chunk().clamp(1, 4096),
            max_line: self.max_line,
            tx,
            stop: stop.clone(),
        };
        let panic_tx = tx_for_panic;
        // Not in the caller's span: this runs from the application's setup
        // code, and the reader, which logs nothing, would hold that span
        // open for as long as the input lasts.
        tokio::task::spawn_blocking(move || {
            // A panic on the reader thread must not look like the end of
            // the input.
            if let Err(payload) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.run()))
            {
                let why = crate::base::error::PanicError::from_payload(payload);
                let _ = panic_tx.blocking_send(Err(Failure::Stopped(io::Error::other(format!(
                    "the reader panicked: {why}"
                )))));
            }
        });
        let keeper = Keeper {
            shared: shared.clone(),
            path: self.checkpoint.clone(),
            names,
            written: (start.0, start.1, base),
            passed_written: 0,
            after: self.checkpoint_after,
            every: self.checkpoint_every,
            drain_for: self.drain_for,
            abort: pipeline.abort_token(),
            max_unacked: self.max_unacked,
            name: self.name.clone(),
        };
        pipeline.spawn(
            format!("{}.checkpoint", counters.name()).into(),
            keeper.run(),
        );
        let source = Lines {
            rx,
            shared: shared.clone(),
            stage: counters.name().clone(),
            counters: counters.clone(),
            shutdown: pipeline.shutdown_signal().watch(),
            stop,
            max_unacked: self.max_unacked,
            positions: self.positions,
            done: false,
        };
        let flow = Flow::from_source(pipeline.clone(), Box::new(source)).produced_by(counters);
        Ok((flow, LineSourceHandle { shared }))
    }
}

/// The files to read, by name.
fn list(input: &Path, checkpoint: &Path) -> Result<Vec<(Arc<str>, PathBuf)>, FileSourceError> {
    let io_error = |source| FileSourceError::Io {
        path: input.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(input).map_err(io_error)?;
    let name_of = |path: &Path| -> Result<Arc<str>, FileSourceError> {
        path.file_name()
            .and_then(|n| n.to_str())
            .map(Arc::from)
            .ok_or_else(|| FileSourceError::Io {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "the file's name is not UTF-8"),
            })
    };
    if meta.is_file() {
        return Ok(vec![(name_of(input)?, input.to_path_buf())]);
    }
    let checkpoint_name = checkpoint.file_name();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(input).map_err(io_error)? {
        let entry = entry.map_err(io_error)?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        let is_checkpoint = checkpoint.parent() == Some(input)
            && (Some(entry.file_name().as_os_str()) == checkpoint_name
                || checkpoint_name.is_some_and(|c| {
                    entry
                        .file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{}.tmp-", c.to_string_lossy()))
                }));
        if hidden || is_checkpoint || !entry.file_type().map_err(io_error)?.is_file() {
            continue;
        }
        files.push((name_of(&path)?, path));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// Refuses a checkpoint that could never be written (its directory is
/// missing or read-only), instead of finding out at the first write: the
/// way checkpoints are written (a temporary file beside it) is tried now.
fn writable(checkpoint: &Path) -> Result<(), FileSourceError> {
    let dir = match checkpoint.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = checkpoint
        .file_name()
        .ok_or_else(|| FileSourceError::Checkpoint {
            path: checkpoint.to_path_buf(),
            reason: "the path names no file".into(),
        })?;
    let mut probe = name.to_os_string();
    probe.push(format!(".tmp-{}", std::process::id()));
    let probe = dir.join(probe);
    std::fs::File::create(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| FileSourceError::Checkpoint {
            path: checkpoint.to_path_buf(),
            reason: format!("it cannot be written in {}: {e}", dir.display()),
        })
}

/// Where a checkpoint says to resume, checked against the files.
fn resume_at(
    files: &[(Arc<str>, PathBuf)],
    c: &Checkpoint,
    path: &Path,
) -> Result<(usize, u64), FileSourceError> {
    let refuse = |reason: String| FileSourceError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let Some(index) = files.iter().position(|(name, _)| **name >= *c.file) else {
        return Ok((files.len(), 0)); // every file is behind it
    };
    if *files[index].0 != *c.file {
        return Ok((index, 0)); // its file is gone: the next one from its start
    }
    let file = &files[index].1;
    let len = std::fs::metadata(file)
        .map_err(|e| refuse(format!("{}: {e}", file.display())))?
        .len();
    if c.offset > len {
        return Err(refuse(format!(
            "it resumes {} at byte {}, past its end ({len} bytes): was the file replaced?",
            c.file, c.offset
        )));
    }
    if c.offset > 0 {
        // A checkpoint is always at the start of a line.
        use std::io::{Read, Seek, SeekFrom};
        let mut f =
            std::fs::File::open(file).map_err(|e| refuse(format!("{}: {e}", file.display())))?;
        let mut byte = [0u8];
        f.seek(SeekFrom::Start(c.offset - 1))
            .and_then(|_| f.read_exact(&mut byte))
            .map_err(|e| refuse(format!("{}: {e}", file.display())))?;
        if byte[0] != b'\n' && c.offset != len {
            return Err(refuse(format!(
                "byte {} of {} is not the start of a line: was the file replaced?",
                c.offset, c.file
            )));
        }
    }
    Ok((index, c.offset))
}

/// A position the checkpoint can name: a file's index, an offset in it,
/// and the lines behind it since the source first started.
type Pos = (usize, u64, u64);

/// What the source, its checkpoint keeper and the handle share.
struct Shared {
    state: Mutex<State>,
    /// The source has ended (its last line, a shutdown, or its flow
    /// stopped reading).
    done: AtomicBool,
    ended: Notify,
    read: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_errors: AtomicU64,
    stalled: AtomicBool,
    last: Mutex<Option<Checkpoint>>,
}

struct State {
    marks: Watermarks<(), Pos>,
    /// Lines the watermark passed in this run.
    passed: u64,
    /// The source, waiting for acknowledgements to read on.
    waker: Option<Waker>,
}

impl State {
    fn advance(&mut self) {
        self.passed += self.marks.advance() as u64;
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn finish(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.ended.notify_one();
        }
    }
}

/// The source as the first stage pulls it.
struct Lines {
    rx: mpsc::Receiver<Result<Batch, Failure>>,
    shared: Arc<Shared>,
    stage: Arc<str>,
    counters: Counters,
    shutdown: Watch,
    stop: Arc<AtomicBool>,
    max_unacked: usize,
    /// Each line's ack carries its position (`with_positions`).
    positions: bool,
    done: bool,
}

impl Lines {
    fn finish(&mut self) {
        self.done = true;
        self.stop.store(true, Ordering::Relaxed);
        self.rx.close();
        self.shared.finish();
    }

    fn chunk(&self, batch: Batch) -> Chunk<Line> {
        let n = batch.lines.len();
        let progress =
            self.shared
                .state()
                .marks
                .track(&(), (batch.file, batch.end, batch.behind), n);
        let mut chunk = Chunk::with_capacity(n);
        for line in batch.lines {
            let ack = if self.positions {
                // The line's ack carries where it was read, for its dead
                // letter.
                let read = match &line {
                    Ok(line) | Err((_, line)) => line,
                };
                let at = SourcePosition::Line {
                    file: read.file.clone(),
                    line: read.number,
                    offset: read.offset,
                };
                Ack::of_at(&progress, at)
            } else {
                Ack::of(&progress)
            };
            match line {
                Ok(line) => chunk.push_acked(line, ack),
                Err((why, line)) => chunk.push_error(
                    StreamError::failed(self.stage.to_string(), why)
                        .with_item(line)
                        .with_ack(ack),
                ),
            }
        }
        self.shared.read.fetch_add(n as u64, Ordering::Relaxed);
        self.counters.add_produced(&chunk);
        chunk
    }
}

impl ChunkSource<Line> for Lines {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk<Line>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.shutdown.is_raised() {
            self.finish();
            return Poll::Ready(None);
        }
        {
            let mut state = self.shared.state();
            if state.marks.outstanding() >= self.max_unacked {
                state.advance();
                if state.marks.outstanding() >= self.max_unacked {
                    state.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(batch))) => Poll::Ready(Some(self.chunk(batch))),
            Poll::Ready(Some(Err(failure))) => {
                let e = match failure {
                    Failure::Skipped(e) => {
                        tracing::warn!(source = %self.stage, error = %e, "a file went away before it was read; the others are read");
                        e
                    }
                    Failure::Stopped(e) => {
                        // The reading ends here; the checkpoint stays
                        // before what could not be read, so a restart
                        // tries again.
                        tracing::error!(source = %self.stage, error = %e, "reading the input failed");
                        self.finish();
                        e
                    }
                };
                let mut chunk = Chunk::default();
                chunk.push_error(StreamError::failed(self.stage.to_string(), e));
                self.counters.add_produced(&chunk);
                Poll::Ready(Some(chunk))
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn abandon(&mut self) -> u64 {
        self.finish();
        0
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The task that writes the checkpoint as acknowledgements arrive.
struct Keeper {
    shared: Arc<Shared>,
    path: PathBuf,
    names: Vec<Arc<str>>,
    /// The position last written (or resumed from).
    written: Pos,
    /// Lines the watermark had passed at the last write.
    passed_written: u64,
    after: u64,
    every: Duration,
    drain_for: Duration,
    abort: CancellationToken,
    max_unacked: usize,
    name: String,
}

impl Keeper {
    async fn run(mut self) {
        let mut look = tokio::time::interval(LOOK);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_write = Instant::now();
        while !self.shared.done.load(Ordering::Acquire) {
            let waiting = self.shared.state().waker.is_some();
            tokio::select! {
                biased;
                () = self.abort.cancelled() => {
                    // What is decided is durable: keep it.
                    self.write().await;
                    return;
                }
                () = self.shared.ended.notified() => break,
                _ = look.tick() => {}
                // The reader waits for acknowledgements: look more often.
                () = tokio::time::sleep(SETTLE_CHECK), if waiting => {}
            }
            let pending = self.advance() - self.passed_written;
            let due = time::after(last_write, self.every).is_some_and(|at| Instant::now() >= at);
            if pending >= self.after || (pending > 0 && due) {
                self.write().await;
                last_write = Instant::now();
            }
        }
        self.settle().await;
        self.write().await;
    }

    /// Moves the watermark and wakes the source if it waits and may read
    /// on. Returns the lines passed in this run so far.
    fn advance(&self) -> u64 {
        let mut state = self.shared.state();
        state.advance();
        let over = state.marks.outstanding() >= self.max_unacked;
        if !over {
            if let Some(waker) = state.waker.take() {
                waker.wake();
            }
            self.shared.stalled.store(false, Ordering::Relaxed);
        } else if state.waker.is_some() && !self.shared.stalled.swap(true, Ordering::Relaxed) {
            tracing::warn!(source = %self.name, max_unacked = self.max_unacked, "reading paused: too many lines wait for their acknowledgement");
        }
        state.passed
    }

    /// After the source ended: waits for the lines in the chain to be
    /// decided, writing as they are, until none is left, none was decided
    /// for a quiet period (the rest were refused downstream, as a `Take`
    /// refuses what follows its count, and are read again next time), the
    /// drain period passes, or the pipeline aborts.
    async fn settle(&mut self) {
        let quiet = self
            .every
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        let deadline = time::after(Instant::now(), self.drain_for);
        let mut moved_at = Instant::now();
        let mut last = self.advance();
        loop {
            let passed = self.advance();
            let left = self.shared.state().marks.outstanding();
            if left == 0 {
                return;
            }
            if passed != last {
                last = passed;
                moved_at = Instant::now();
                if passed - self.passed_written >= self.after {
                    self.write().await;
                }
            } else if moved_at.elapsed() >= quiet {
                tracing::info!(source = %self.name, unacked = left, "the flow stopped taking lines; the ones never acknowledged are read again next time");
                return;
            }
            tokio::select! {
                () = self.abort.cancelled() => return,
                () = time::sleep_until(deadline) => {
                    tracing::warn!(source = %self.name, unacked = left, "lines still unacknowledged after the drain period; they are read again next time");
                    return;
                }
                () = tokio::time::sleep(SETTLE_CHECK) => {}
            }
        }
    }

    /// Writes the checkpoint if the watermark moved since the last write.
    async fn write(&mut self) {
        let passed = self.advance();
        let Some(at) = self.shared.state().marks.watermark(&()) else {
            return;
        };
        if at == self.written {
            return;
        }
        let checkpoint = Checkpoint {
            version: Checkpoint::VERSION,
            file: self.names[at.0].to_string(),
            offset: at.1,
            lines: at.2,
        };
        let path = self.path.clone();
        let to_save = checkpoint.clone();
        let saved = crate::base::blocking::spawn_blocking(move || to_save.save(&path)).await;
        match saved {
            Ok(Ok(())) => {
                self.written = at;
                self.passed_written = passed;
                self.shared.checkpoints.fetch_add(1, Ordering::Relaxed);
                *self
                    .shared
                    .last
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(checkpoint);
            }
            Ok(Err(e)) => {
                self.shared
                    .checkpoint_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(source = %self.name, path = %self.path.display(), error = %e, "the checkpoint could not be written; it is tried again");
            }
            Err(e) => {
                self.shared
                    .checkpoint_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(source = %self.name, error = %e, "the checkpoint writer failed");
            }
        }
    }
}

/// Watches a running [`LineSource`].
#[derive(Clone)]
pub struct LineSourceHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for LineSourceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineSourceHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

/// A [`LineSource`]'s counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct LineSourceStats {
    /// Lines read in this run.
    pub read: u64,
    /// Lines read and not yet behind the watermark (decided with every
    /// line before them).
    pub unacked: u64,
    /// Checkpoints written in this run.
    pub checkpoints: u64,
    /// Checkpoint writes that failed (each is tried again; the previous
    /// checkpoint stays in place).
    pub checkpoint_errors: u64,
    /// Reading is paused because `max_unacked` lines wait for their
    /// acknowledgement.
    pub stalled: bool,
}

impl LineSourceHandle {
    /// The source's counts now.
    pub fn stats(&self) -> LineSourceStats {
        let unacked = {
            let mut state = self.shared.state();
            state.advance();
            state.marks.outstanding() as u64
        };
        LineSourceStats {
            read: self.shared.read.load(Ordering::Relaxed),
            unacked,
            checkpoints: self.shared.checkpoints.load(Ordering::Relaxed),
            checkpoint_errors: self.shared.checkpoint_errors.load(Ordering::Relaxed),
            stalled: self.shared.stalled.load(Ordering::Relaxed),
        }
    }

    /// The checkpoint last written in this run (or resumed from).
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.shared
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
