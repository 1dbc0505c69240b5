//! [`FileSink`]: a durable, append-only file of JSON lines.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::base::config::{ConfigError, nonzero};
use crate::base::error::{BoxError, PanicError};
use crate::base::telemetry::{self, Counter};
use crate::resilience::dlq::{DeadLetter, DeadLetterSink, DlqError, Unwritten};

/// When a [`FileSink`] forces its writes to disk (`fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fsync {
    /// Before any record counts as dead-lettered, it is on disk (the
    /// default). Records written together share one `fsync` (group
    /// commit). If the sync fails, the batch comes back downstream as
    /// error items (the records may also be in the file). After a failed
    /// `fsync`, Linux may report a later one as successful although the
    /// pages it failed to write are gone; treat a sync failure as a disk
    /// that needs attention ([`FileSinkStats::sync_failures`]).
    #[default]
    EveryRecord,
    /// After every `n` records. A crash loses at most the last `n - 1`.
    EveryN(u64),
    /// At most this long after a record was written, and at rotation and
    /// close. An interval too long to add to the clock (such as
    /// `Duration::MAX`) means "never by time": the file is then synced only
    /// at rotation and close, as with [`Fsync::Never`].
    Interval(Duration),
    /// Only at rotation and close; between, the operating system decides.
    Never,
}

/// A dead-letter sink that appends each record as one line of JSON to a
/// file, with an [`Fsync`] policy and optional size-based rotation.
///
/// The file is opened (created if missing) when the sink is built, on
/// tokio's blocking pool, so an unwritable path fails there with
/// [`DlqError::Open`]. If the file ends in
/// a torn line (a crash mid-write), a newline closes it first, so the next
/// record starts on a line of its own; [`Replay`](crate::resilience::dlq::Replay)
/// reports the torn line as an error item.
///
/// A write that fails (disk full, for example) truncates the file back to
/// its last complete record, and the records come back downstream as error
/// items carrying them; [`FileSinkStats`] counts the failures.
///
/// # Permissions
///
/// The records hold failed payloads, so a file the sink creates gets mode
/// `0o600` (owner read and write only) unless
/// [`FileSinkOptions::with_mode`] says otherwise. The mode is applied exactly,
/// whatever the process's umask, to every file the sink creates, the new
/// file after a rotation included; a rotated segment is renamed, so it
/// keeps its mode. A file that already exists keeps its permissions. On
/// platforms other than Unix the mode is ignored.
///
/// # Rotation
///
/// With [`with_rotation`](FileSink::with_rotation), a record that would
/// take the file past the limit goes to a new file: the full one is synced
/// and renamed to `<name>.1` (then `.2`, ...). By default nothing is ever
/// deleted; [`with_retention`](FileSink::with_retention) keeps only the
/// newest rotated segments.
/// [`Replay::open_rotated`](crate::resilience::dlq::Replay::open_rotated) reads them
/// all in order.
///
/// # Validation
///
/// The setters never fail; the settings are checked
/// ([`validate`](FileSink::validate)) when the
/// [`DeadLetterQueue`](crate::DeadLetterQueue) writing to the sink is
/// piped, which refuses to start with a [`ConfigError`] naming the field:
/// `sink.fsync.every_n`, `sink.fsync.interval`, `sink.rotation` or
/// `sink.retention`. ([`FileSinkOptions::create`] checks its settings
/// before it creates the file.)
///
/// # Examples
///
/// ```
/// use streamz::dlq::{FileSink, Fsync};
/// use streamz::{DeadLetterQueue, StreamError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let sink = FileSink::<u32>::create(dir.path().join("failed.jsonl"))
///     .await?
///     .with_fsync(Fsync::EveryN(100));
/// let stats = sink.stats();
/// let out = streamz::try_stream(futures::stream::iter([
///     Ok(1),
///     Err(StreamError::failed("load", "no such row").with_item(2u32)),
/// ]))
/// .pipe(DeadLetterQueue::new(sink))
/// .collect()
/// .await;
/// assert_eq!(out.len(), 1);
/// assert_eq!(stats.records(), 1);
/// let text = std::fs::read_to_string(dir.path().join("failed.jsonl"))?;
/// assert!(text.contains(r#""message":"no such row""#));
/// # Ok(()) }
/// ```
pub struct FileSink<T> {
    path: PathBuf,
    /// Shared with the blocking task that works on it: if the writer drops
    /// a write (an abort), the task still finishes and hands the file back
    /// to the next operation (the sync at close).
    state: Arc<Mutex<State>>,
    fsync: Fsync,
    max_bytes: Option<u64>,
    /// Rotated segments kept (`None`: all).
    keep: Option<usize>,
    /// Since when written records wait for a sync (interval policy).
    unsynced_since: Option<Instant>,
    stats: FileSinkStats,
    _items: PhantomData<fn(T)>,
}

impl<T> fmt::Debug for FileSink<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSink")
            .field("path", &self.path)
            .field("fsync", &self.fsync)
            .field("max_bytes", &self.max_bytes)
            .field("keep", &self.keep)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// The open file and what the writer knows about it.
struct State {
    file: File,
    path: PathBuf,
    len: u64,
    /// Records written since the last sync.
    unsynced: u64,
    next_segment: u64,
    buf: Vec<u8>,
    /// The file may end in a partial line (a failed write whose truncation
    /// failed too): the next append starts with a newline.
    torn: bool,
    /// `file` is a rotated segment, renamed away; open `path` anew before
    /// writing (a rotation whose reopen failed).
    reopen: bool,
    /// The permissions of the files the sink creates (Unix).
    mode: u32,
}

impl<T: Serialize + Send + 'static> FileSink<T> {
    /// Opens `path` for appending, creating the file if it is missing (its
    /// directory must exist), with the default [`FileSinkOptions`] (mode
    /// `0o600`). The file work runs on tokio's blocking pool, so it does
    /// not hold up the runtime's workers.
    ///
    /// # Errors
    ///
    /// [`DlqError::Open`] if the file cannot be opened for appending, with
    /// the path and the operating system's reason.
    ///
    /// ```
    /// use streamz::dlq::{DlqError, FileSink};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let err = FileSink::<u32>::create("/no/such/dir/dlq.jsonl").await.unwrap_err();
    /// assert!(matches!(err, DlqError::Open { .. }));
    /// assert!(err.to_string().starts_with("cannot open the dead-letter file `/no/such/dir/dlq.jsonl`"));
    /// # }
    /// ```
    pub async fn create(path: impl AsRef<Path>) -> Result<Self, DlqError> {
        FileSinkOptions::new().create(path).await
    }

    /// Sets the sync policy ([`Fsync::EveryRecord`] by default).
    /// `Fsync::Interval(Duration::MAX)` is accepted and means "never by
    /// time" (see [`Fsync::Interval`]). `EveryN(0)` and a zero interval
    /// are refused when the dead-letter queue writing to the sink is piped
    /// ([`ConfigError`], field `sink.fsync.every_n` or
    /// `sink.fsync.interval`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamz::dlq::{FileSink, Fsync};
    /// use streamz::DeadLetterQueue;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let sink = FileSink::<u32>::create(dir.path().join("dlq.jsonl")).await?;
    /// let sink = sink.with_fsync(Fsync::Interval(Duration::from_secs(1)));
    /// assert!(sink.validate().is_ok());
    ///
    /// let sink = sink.with_fsync(Fsync::EveryN(0));
    /// let err = streamz::iter([1u32]).try_pipe(DeadLetterQueue::new(sink)).unwrap_err();
    /// assert_eq!(err.to_string(), "DeadLetterQueue `dead_letter_queue`: `sink.fsync.every_n` must be greater than zero");
    /// # Ok(()) }
    /// ```
    pub fn with_fsync(mut self, fsync: Fsync) -> Self {
        self.fsync = fsync;
        self
    }

    /// Starts a new file when a record would take the current one past
    /// `max_bytes` (a record larger than that gets a file of its own).
    /// Zero is refused when the dead-letter queue writing to the sink is
    /// piped ([`ConfigError`], field `sink.rotation`).
    ///
    /// ```
    /// use streamz::dlq::FileSink;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let sink = FileSink::<u32>::create(dir.path().join("dlq.jsonl"))
    ///     .await?
    ///     .with_rotation(64 << 20); // 64 MiB per file
    /// # drop(sink);
    /// # Ok(()) }
    /// ```
    pub fn with_rotation(mut self, max_bytes: u64) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    /// Keeps at most `segments` rotated files: after each rotation the
    /// oldest segments beyond that are deleted (the current file is not
    /// counted). Without it (the default) nothing is ever deleted, because
    /// deleting a segment loses records that the queue already counted as
    /// dead-lettered: that is a choice only you can make, for example to
    /// bound the disk a dead-letter file may take
    /// (`segments × max_bytes` plus the current file).
    ///
    /// Deletion happens at rotation only, so it needs
    /// [`with_rotation`](FileSink::with_rotation); failures to delete are
    /// logged and retried at the next rotation.
    ///
    /// Zero (which would delete each segment as it is rotated out) is
    /// refused when the dead-letter queue writing to the sink is piped
    /// ([`ConfigError`], field `sink.retention`).
    ///
    /// ```
    /// use streamz::dlq::FileSink;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let sink = FileSink::<u32>::create(dir.path().join("dlq.jsonl"))
    ///     .await?
    ///     .with_rotation(64 << 20)
    ///     .with_retention(10); // at most 10 × 64 MiB of old records
    /// # drop(sink);
    /// # Ok(()) }
    /// ```
    pub fn with_retention(mut self, segments: usize) -> Self {
        self.keep = Some(segments);
        self
    }
}

impl<T> FileSink<T> {
    /// Checks the settings; the [`DeadLetterQueue`](crate::DeadLetterQueue)
    /// writing to the sink calls it when it is piped.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for the field `sink.fsync.every_n` (`EveryN(0)`),
    /// `sink.fsync.interval` (a zero interval), `sink.rotation` (a zero
    /// size) or `sink.retention` (zero segments).
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(self.fsync, self.max_bytes, self.keep)
    }
}

/// The checks of [`FileSink::validate`].
fn check(fsync: Fsync, max_bytes: Option<u64>, keep: Option<usize>) -> Result<(), ConfigError> {
    match fsync {
        Fsync::EveryN(n) => nonzero(n, "sink.fsync.every_n")?,
        Fsync::Interval(d) => nonzero(d, "sink.fsync.interval")?,
        Fsync::EveryRecord | Fsync::Never => {}
    }
    if let Some(max_bytes) = max_bytes {
        nonzero(max_bytes, "sink.rotation")?;
    }
    if let Some(keep) = keep {
        nonzero(keep, "sink.retention")?;
    }
    Ok(())
}

/// How to create a [`FileSink`]: the mode of the files it creates, its
/// sync policy, rotation and retention. Setters cannot fail;
/// [`create`](FileSinkOptions::create), which opens the file and so
/// returns a `Result` anyway, checks the values before it creates
/// anything (as [`FileSink::validate`] does when the queue is piped).
///
/// # Default
///
/// | setting | default |
/// |---|---|
/// | [`mode`](FileSinkOptions::with_mode) | `0o600` (Unix; ignored elsewhere) |
/// | [`fsync`](FileSinkOptions::with_fsync) | [`Fsync::EveryRecord`] |
/// | [`rotation`](FileSinkOptions::with_rotation) | none: one file that grows |
/// | [`retention`](FileSinkOptions::with_retention) | none: every rotated segment is kept |
///
/// # Examples
///
/// ```
/// use streamz::dlq::{FileSinkOptions, Fsync};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let sink = FileSinkOptions::new()
///     .with_mode(0o640) // the group may read the failed payloads too
///     .with_fsync(Fsync::EveryN(100))
///     .with_rotation(64 << 20)
///     .with_retention(8)
///     .create::<u32>(dir.path().join("dlq.jsonl"))
///     .await?;
/// assert_eq!(sink.path(), dir.path().join("dlq.jsonl"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSinkOptions {
    mode: u32,
    fsync: Fsync,
    max_bytes: Option<u64>,
    keep: Option<usize>,
}

impl Default for FileSinkOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl FileSinkOptions {
    /// The defaults (see the table above).
    ///
    /// ```
    /// use streamz::dlq::FileSinkOptions;
    ///
    /// assert_eq!(FileSinkOptions::new(), FileSinkOptions::default());
    /// ```
    pub const fn new() -> Self {
        FileSinkOptions {
            mode: 0o600,
            fsync: Fsync::EveryRecord,
            max_bytes: None,
            keep: None,
        }
    }

    /// The permission bits of every file the sink creates (`0o600` by
    /// default), applied exactly, whatever the umask. A file that already
    /// exists keeps its permissions. Only the permission bits (`0o777`)
    /// count: setuid, setgid and sticky bits mean nothing for a data file
    /// and are dropped. On platforms other than Unix this is ignored.
    ///
    /// ```
    /// use streamz::dlq::{FileSink, FileSinkOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let sink: FileSink<u32> = FileSinkOptions::new()
    ///     .with_mode(0o640)
    ///     .create(dir.path().join("dlq.jsonl"))
    ///     .await?;
    /// # #[cfg(unix)] {
    /// use std::os::unix::fs::PermissionsExt;
    /// let mode = std::fs::metadata(sink.path())?.permissions().mode();
    /// assert_eq!(mode & 0o777, 0o640);
    /// # }
    /// # Ok(()) }
    /// ```
    pub const fn with_mode(mut self, mode: u32) -> Self {
        self.mode = mode & 0o777;
        self
    }

    /// The sync policy; see [`FileSink::with_fsync`].
    ///
    /// ```
    /// use streamz::dlq::{FileSinkOptions, Fsync};
    ///
    /// let options = FileSinkOptions::new().with_fsync(Fsync::Never);
    /// # drop(options);
    /// ```
    pub const fn with_fsync(mut self, fsync: Fsync) -> Self {
        self.fsync = fsync;
        self
    }

    /// Rotation by size; see [`FileSink::with_rotation`].
    ///
    /// ```
    /// use streamz::dlq::FileSinkOptions;
    ///
    /// let options = FileSinkOptions::new().with_rotation(1 << 30);
    /// # drop(options);
    /// ```
    pub const fn with_rotation(mut self, max_bytes: u64) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    /// Rotated segments to keep; see [`FileSink::with_retention`].
    ///
    /// ```
    /// use streamz::dlq::FileSinkOptions;
    ///
    /// let options = FileSinkOptions::new().with_rotation(1 << 30).with_retention(4);
    /// # drop(options);
    /// ```
    pub const fn with_retention(mut self, segments: usize) -> Self {
        self.keep = Some(segments);
        self
    }

    /// Creates the sink: opens `path` for appending, creating the file if
    /// it is missing (its directory must exist), on tokio's blocking pool.
    ///
    /// # Errors
    ///
    /// [`DlqError::Config`] for a zero size, count or interval, naming the
    /// field as [`FileSink::validate`] does (nothing is created then);
    /// [`DlqError::Open`] if the file cannot be opened for appending, with
    /// the path and the operating system's reason.
    ///
    /// ```
    /// use streamz::dlq::{DlqError, FileSinkOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let err = FileSinkOptions::new()
    ///     .with_rotation(0)
    ///     .create::<u32>(dir.path().join("dlq.jsonl"))
    ///     .await
    ///     .unwrap_err();
    /// assert!(matches!(&err, DlqError::Config(e) if e.field() == "sink.rotation"));
    /// assert!(!dir.path().join("dlq.jsonl").exists());
    /// # Ok(()) }
    /// ```
    pub async fn create<T: Serialize + Send + 'static>(
        &self,
        path: impl AsRef<Path>,
    ) -> Result<FileSink<T>, DlqError> {
        check(self.fsync, self.max_bytes, self.keep)?;
        let path = path.as_ref().to_path_buf();
        let mode = self.mode;
        let opened = {
            let path = path.clone();
            crate::base::blocking::spawn_blocking(move || State::open(path, mode)).await
        };
        let state = match opened {
            Ok(Ok(state)) => state,
            Ok(Err(source)) => return Err(DlqError::Open { path, source }),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {
                return Err(DlqError::Open {
                    path,
                    source: std::io::Error::other("the runtime is shutting down"),
                });
            }
        };
        Ok(FileSink {
            state: Arc::new(Mutex::new(state)),
            stats: FileSinkStats::for_file(&path),
            path,
            fsync: self.fsync,
            max_bytes: self.max_bytes,
            keep: self.keep,
            unsynced_since: None,
            _items: PhantomData,
        })
    }
}

impl<T> FileSink<T> {
    /// The file records are appended to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A live view of what the sink has done.
    pub fn stats(&self) -> FileSinkStats {
        self.stats.clone()
    }

    /// Runs `f` on the file state on the blocking pool (file writes and
    /// syncs block); `None` if the runtime shut down before it ran.
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> R + Send + 'static,
    ) -> Option<R> {
        let state = self.state.clone();
        let joined = crate::base::blocking::spawn_blocking(move || {
            // Serialisation panics are caught inside, so a poisoned lock
            // means a bug in this file; the state is still usable.
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut state)
        })
        .await;
        match joined {
            Ok(r) => Some(r),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => None,
        }
    }

    async fn sync(&mut self) -> Result<(), BoxError> {
        let stats = self.stats.clone();
        let result = match self.blocking(move |s| s.sync(&stats)).await {
            Some(r) => r.map_err(Into::into),
            None => Err("the runtime shut down before the dead-letter file was synced".into()),
        };
        // A failed interval sync is tried again an interval later.
        self.unsynced_since = match (&result, self.fsync) {
            (Err(_), Fsync::Interval(_)) => Some(Instant::now()),
            _ => None,
        };
        result
    }
}

impl<T: Serialize + Send + 'static> DeadLetterSink<T> for FileSink<T> {
    fn validate(&self) -> Result<(), ConfigError> {
        FileSink::validate(self)
    }

    async fn write(&mut self, records: Vec<DeadLetter<T>>) -> Result<(), Vec<Unwritten<T>>> {
        let n = records.len() as u64;
        let (fsync, stats) = (self.fsync, self.stats.clone());
        let rotation = self.max_bytes.map(|max| (max, self.keep));
        let written = self
            .blocking(move |s| s.write(records, fsync, rotation, &stats))
            .await;
        let Some((written, result)) = written else {
            // The runtime shut down before the blocking task ran; the
            // records went with it. The writer reports them as lost.
            panic!("the runtime shut down before {n} dead-letter records were written");
        };
        if written > 0 && matches!(self.fsync, Fsync::Interval(_)) {
            self.unsynced_since.get_or_insert_with(Instant::now);
        }
        result
    }

    fn flush_at(&self) -> Option<Instant> {
        match self.fsync {
            // Never, if the interval does not fit on the clock.
            Fsync::Interval(d) => self
                .unsynced_since
                .and_then(|t| crate::base::time::after(t, d)),
            _ => None,
        }
    }

    async fn flush(&mut self) -> Result<(), BoxError> {
        self.sync().await
    }

    async fn close(&mut self) -> Result<(), BoxError> {
        self.sync().await
    }
}

impl State {
    /// Opens (or creates, with `mode`) the file at `path`.
    fn open(path: PathBuf, mode: u32) -> std::io::Result<Self> {
        let (file, len, created) = open_append(&path, mode)?;
        if created {
            sync_dir(&path)?;
        }
        let next_segment = segments(&path)?.last().map_or(1, |(n, _)| n + 1);
        Ok(State {
            file,
            path,
            len,
            unsynced: 0,
            next_segment,
            buf: Vec::new(),
            torn: false,
            reopen: false,
            mode,
        })
    }

    /// Appends `records`; returns how many were written, and the ones that
    /// were not. `rotation` is the size limit and the segments to keep.
    fn write<T: Serialize>(
        &mut self,
        records: Vec<DeadLetter<T>>,
        fsync: Fsync,
        rotation: Option<(u64, Option<usize>)>,
        stats: &FileSinkStats,
    ) -> (u64, Result<(), Vec<Unwritten<T>>>) {
        let mut failed = Vec::new();
        // Serialize every record into one buffer, one line each.
        self.buf.clear();
        let mut lines = Vec::with_capacity(records.len());
        for record in records {
            let start = self.buf.len();
            // A `Serialize` impl may panic; the record is only borrowed, so
            // it goes back downstream with the panic as its reason.
            let serialized = catch_unwind(AssertUnwindSafe(|| {
                serde_json::to_writer(&mut self.buf, &record)
            }));
            match serialized {
                Ok(Ok(())) => {
                    self.buf.push(b'\n');
                    lines.push((start, self.buf.len(), record));
                }
                Ok(Err(e)) => {
                    self.buf.truncate(start);
                    failed.push(Unwritten::new(record, e));
                }
                Err(payload) => {
                    self.buf.truncate(start);
                    failed.push(Unwritten::new(record, PanicError::from_payload(payload)));
                }
            }
        }
        // Write them in runs that stay within the rotation limit.
        let mut written = 0u64;
        let mut run_start = 0; // index into `lines`
        let mut i = 0;
        let mut error: Option<std::io::Error> = None;
        while run_start < lines.len() {
            let from = lines[run_start].0;
            // Extend the run while it fits (a run holds at least one line).
            i = i.max(run_start + 1);
            if let Some((max, keep)) = rotation {
                if self.len > 0 && self.len + (lines[run_start].1 - from) as u64 > max {
                    if let Err(e) = self.rotate(keep, stats) {
                        error = Some(e);
                        break;
                    }
                }
                while i < lines.len() && self.len + (lines[i].1 - from) as u64 <= max {
                    i += 1;
                }
            } else {
                i = lines.len();
            }
            let to = lines[i - 1].1;
            let buf = std::mem::take(&mut self.buf);
            let appended = self.append(&buf[from..to]);
            self.buf = buf;
            if let Err(e) = appended {
                error = Some(e);
                break;
            }
            written += (i - run_start) as u64;
            run_start = i;
        }
        let mut unwritten: Vec<(usize, usize, DeadLetter<T>)> = lines.split_off(run_start);
        if let Some(e) = error {
            stats.inner.write_failures.fetch_add(1, Relaxed);
            stats.inner.exported.write_failed.increment(1);
            tracing::error!(path = %self.path.display(), error = %e, records = unwritten.len(), "cannot append to the dead-letter file");
            failed.extend(
                unwritten.drain(..).map(|(_, _, r)| {
                    Unwritten::new(r, std::io::Error::new(e.kind(), e.to_string()))
                }),
            );
        }
        self.unsynced += written;
        stats.inner.records.fetch_add(written, Relaxed);
        let due = match fsync {
            Fsync::EveryRecord => written > 0,
            Fsync::EveryN(n) => self.unsynced >= n,
            Fsync::Interval(_) | Fsync::Never => false,
        };
        if due {
            if let Err(e) = self.sync(stats) {
                if fsync == Fsync::EveryRecord {
                    // Not durable, so not dead-lettered: they go downstream.
                    let reason = format!("the records were written but the sync failed: {e}");
                    failed.extend(
                        lines
                            .into_iter()
                            .map(|(_, _, r)| Unwritten::new(r, reason.clone())),
                    );
                    return (0, Err(failed));
                }
            }
        }
        if failed.is_empty() {
            (written, Ok(()))
        } else {
            (written, Err(failed))
        }
    }

    /// Appends `bytes` whole, or truncates back to the last complete line.
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.reopen {
            let (file, len, _) = open_append(&self.path, self.mode)?;
            self.file = file;
            self.len = len;
            self.reopen = false;
        }
        if self.torn {
            self.file.write_all(b"\n")?;
            self.len += 1;
            self.torn = false;
        }
        if let Err(e) = self.file.write_all(bytes) {
            // Drop the partial line so the next record starts clean. If
            // even that fails, learn where the file ends and start the next
            // record on a new line.
            if self.file.set_len(self.len).is_err() {
                if let Ok(meta) = self.file.metadata() {
                    self.len = meta.len();
                }
                self.torn = true;
            }
            return Err(e);
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn sync(&mut self, stats: &FileSinkStats) -> std::io::Result<()> {
        if self.unsynced == 0 {
            return Ok(());
        }
        match self.file.sync_data() {
            Ok(()) => {
                self.unsynced = 0;
                stats.inner.syncs.fetch_add(1, Relaxed);
                stats.inner.exported.synced.increment(1);
                Ok(())
            }
            Err(e) => {
                stats.inner.sync_failures.fetch_add(1, Relaxed);
                stats.inner.exported.sync_failed.increment(1);
                tracing::error!(path = %self.path.display(), error = %e, "cannot sync the dead-letter file");
                Err(e)
            }
        }
    }

    /// Syncs and renames the full file to the next segment name, opens a
    /// new one and deletes the oldest segments beyond `keep`.
    fn rotate(&mut self, keep: Option<usize>, stats: &FileSinkStats) -> std::io::Result<()> {
        self.sync(stats)?;
        let segment = segment_path(&self.path, self.next_segment);
        std::fs::rename(&self.path, &segment)?;
        self.next_segment += 1;
        stats.inner.rotations.fetch_add(1, Relaxed);
        tracing::info!(segment = %segment.display(), "dead-letter file rotated");
        // From here `file` is the segment: never write to it again.
        self.reopen = true;
        let (file, len, _) = open_append(&self.path, self.mode)?;
        self.file = file;
        self.len = len;
        self.reopen = false;
        if let Some(keep) = keep {
            self.prune(keep, stats);
        }
        // Make the rename, the new file's name and deletions durable too.
        if let Err(e) = sync_dir(&self.path) {
            stats.inner.sync_failures.fetch_add(1, Relaxed);
            stats.inner.exported.sync_failed.increment(1);
            tracing::error!(path = %self.path.display(), error = %e, "cannot sync the dead-letter file's directory");
        }
        Ok(())
    }
}

impl State {
    /// Deletes the oldest rotated segments beyond `keep`. A failure is
    /// logged; the next rotation tries again.
    fn prune(&mut self, keep: usize, stats: &FileSinkStats) {
        let found = match segments(&self.path) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot list the rotated dead-letter files to delete old ones");
                return;
            }
        };
        let excess = found.len().saturating_sub(keep);
        for (_, segment) in &found[..excess] {
            match std::fs::remove_file(segment) {
                Ok(()) => {
                    stats.inner.deleted.fetch_add(1, Relaxed);
                    tracing::info!(segment = %segment.display(), keep, "old dead-letter segment deleted by the retention limit");
                }
                Err(e) => {
                    tracing::warn!(segment = %segment.display(), error = %e, "cannot delete an old dead-letter segment");
                }
            }
        }
    }
}

/// Opens `path` for appending and makes sure it ends with a newline; a
/// file it creates gets exactly `mode` (Unix). Also says whether it
/// created the file.
fn open_append(path: &Path, mode: u32) -> std::io::Result<(File, u64, bool)> {
    let mut options = OpenOptions::new();
    options.read(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Created with at most `mode` from the start: no moment in which
        // the file is readable by others.
        options.mode(mode);
    }
    let (mut file, created) = match options.clone().create_new(true).open(path) {
        Ok(file) => (file, true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (options.open(path)?, false),
        Err(e) => return Err(e),
    };
    if created {
        // The umask may have taken bits away from `mode`: set it exactly.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        #[cfg(not(unix))]
        let _ = mode;
    }
    let mut len = file.metadata()?.len();
    if len > 0 {
        let mut last = [0u8];
        file.seek(SeekFrom::End(-1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            tracing::warn!(path = %path.display(), "the dead-letter file ends in a torn line; closing it with a newline");
            file.write_all(b"\n")?;
            len += 1;
        }
    }
    Ok((file, len, created))
}

/// Syncs the directory holding `path`, so a new or renamed name in it
/// survives a crash (a no-op where directories cannot be opened).
fn sync_dir(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn segment_path(path: &Path, n: u64) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{n}"));
    path.with_file_name(name)
}

/// The rotated segments of `path` (`<name>.1`, `<name>.2`, ...), oldest
/// first.
pub(crate) fn segments(path: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(rest) = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(name))
            .and_then(|r| r.strip_prefix('.'))
        else {
            continue;
        };
        if let Ok(n) = rest.parse::<u64>() {
            found.push((n, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// What a [`FileSink`] has done, readable while it runs.
#[derive(Debug, Clone, Default)]
pub struct FileSinkStats {
    inner: Arc<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    records: AtomicU64,
    syncs: AtomicU64,
    sync_failures: AtomicU64,
    write_failures: AtomicU64,
    rotations: AtomicU64,
    deleted: AtomicU64,
    /// Exported (feature `metrics`): fsyncs by result, failed appends.
    exported: FileSeries,
}

/// A dead-letter file's exported series, labelled with its path.
#[derive(Debug)]
struct FileSeries {
    synced: Counter,
    sync_failed: Counter,
    write_failed: Counter,
}

impl Default for FileSeries {
    fn default() -> Self {
        FileSeries {
            synced: Counter::noop(),
            sync_failed: Counter::noop(),
            write_failed: Counter::noop(),
        }
    }
}

impl FileSinkStats {
    /// Stats whose series are exported with the file's path as a label.
    fn for_file(path: &Path) -> Self {
        let file = path.display().to_string();
        let fsyncs = |result| {
            telemetry::counter(
                telemetry::DLQ_FSYNCS,
                &[("file", file.clone()), ("result", String::from(result))],
            )
        };
        FileSinkStats {
            inner: Arc::new(StatsInner {
                exported: FileSeries {
                    synced: fsyncs("ok"),
                    sync_failed: fsyncs("failed"),
                    write_failed: telemetry::counter(
                        telemetry::DLQ_WRITE_FAILURES,
                        &[("file", file.clone())],
                    ),
                },
                ..StatsInner::default()
            }),
        }
    }

    /// Records appended to the file.
    pub fn records(&self) -> u64 {
        self.inner.records.load(Relaxed)
    }

    /// Successful `fsync`s.
    pub fn syncs(&self) -> u64 {
        self.inner.syncs.load(Relaxed)
    }

    /// Failed `fsync`s. With [`Fsync::EveryN`] or [`Fsync::Interval`] the
    /// records written since the previous sync may not be durable.
    pub fn sync_failures(&self) -> u64 {
        self.inner.sync_failures.load(Relaxed)
    }

    /// Failed appends (their records went downstream as error items).
    pub fn write_failures(&self) -> u64 {
        self.inner.write_failures.load(Relaxed)
    }

    /// Files rotated out.
    pub fn rotations(&self) -> u64 {
        self.inner.rotations.load(Relaxed)
    }

    /// Rotated segments deleted by the retention limit
    /// ([`FileSink::with_retention`]).
    pub fn segments_deleted(&self) -> u64 {
        self.inner.deleted.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeadLetterQueue;

    #[test]
    fn each_setting_is_checked_under_its_name() {
        assert_eq!(check(Fsync::EveryRecord, None, None), Ok(()));
        assert_eq!(
            check(Fsync::Interval(Duration::MAX), Some(1), Some(1)),
            Ok(())
        );
        let field = |f, m, k| check(f, m, k).unwrap_err().field();
        assert_eq!(field(Fsync::EveryN(0), None, None), "sink.fsync.every_n");
        assert_eq!(
            field(Fsync::Interval(Duration::ZERO), None, None),
            "sink.fsync.interval"
        );
        assert_eq!(field(Fsync::Never, Some(0), None), "sink.rotation");
        assert_eq!(field(Fsync::Never, None, Some(0)), "sink.retention");
    }

    #[tokio::test]
    async fn the_queue_refuses_a_sink_with_a_zero_setting_when_piped() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::<u32>::create(dir.path().join("dlq.jsonl"))
            .await
            .unwrap()
            .with_rotation(1 << 20)
            .with_retention(0);
        let dlq = DeadLetterQueue::new(sink).named("failed");
        let err = crate::iter([1u32]).try_pipe(dlq).map(drop).unwrap_err();
        assert_eq!(
            (err.operator(), err.stage(), err.field()),
            (Some("DeadLetterQueue"), Some("failed"), "sink.retention")
        );
    }

    #[tokio::test]
    async fn options_are_checked_before_the_file_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        let err = FileSinkOptions::new()
            .with_fsync(Fsync::EveryN(0))
            .create::<u32>(&path)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DlqError::Config(e) if *e == ConfigError::zero("sink.fsync.every_n"))
        );
        assert!(!path.exists());
    }
}
