//! [`Replay`]: a dead-letter file read back as a stream of records.

use std::collections::VecDeque;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;

use crate::base::config::nonzero;
use crate::base::error::{ErrorKind, Result, StreamError};
use crate::flow::Flow;
use crate::resilience::dlq::{DeadLetter, DlqError};

/// The name replay errors carry as their stage.
const STAGE: &str = "replay";

/// The longest line a [`Replay`] reads by default: 4 MiB.
pub const DEFAULT_MAX_LINE: usize = 4 << 20;

/// Reads the records of a [`FileSink`](crate::resilience::dlq::FileSink) file back, in
/// file order, as a `futures::Stream` of `Result<DeadLetter<T>>`: a source
/// for a pipeline that fixes failed items and feeds them in again.
///
/// - A complete line that is not a record of `T` becomes an error item of
///   kind [`Rejected`](ErrorKind::Rejected), stage `replay`, whose source
///   is [`DlqError::Corrupt`] and whose item is the line as a `String`.
/// - A line longer than [`with_max_line`](Replay::with_max_line) (4 MiB by
///   default) becomes one `rejected` error item whose source is
///   [`DlqError::LineTooLong`], without an item: the line is read and
///   discarded in pieces, never held whole, so a huge line cannot exhaust
///   memory. It is counted in [`ReplayStats::too_long`].
/// - A torn last line (no newline at the end of the file, as a crash
///   mid-write leaves it) is skipped with a warning and counted in
///   [`ReplayStats::torn`]; every complete record before it is read.
///
/// Files are opened and read on tokio's blocking pool, one file at a time.
///
/// # Examples
///
/// ```
/// use streamz::dlq::{FileSink, Replay};
/// use streamz::{DeadLetterQueue, StreamError};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("dlq.jsonl");
/// let failures = (1..=3u32).map(|n| Err::<u32, _>(StreamError::failed("load", "timeout").with_item(n)));
/// streamz::try_stream(futures::stream::iter(failures))
///     .pipe(DeadLetterQueue::new(FileSink::<u32>::create(&path).await?))
///     .collect()
///     .await;
///
/// let replay = Replay::<u32>::open(&path).await?;
/// let stats = replay.stats();
/// let items: Vec<u32> = replay
///     .into_flow()
///     .try_map(|letter: &streamz::DeadLetter<u32>| letter.item.ok_or("no item"))
///     .collect()
///     .await
///     .into_iter()
///     .map(Result::unwrap)
///     .collect();
/// assert_eq!(items, [1, 2, 3]);
/// assert_eq!((stats.records(), stats.torn()), (3, 0));
/// # Ok(()) }
/// ```
pub struct Replay<T> {
    inner: Pin<Box<dyn Stream<Item = Result<DeadLetter<T>>> + Send>>,
    max_line: Arc<AtomicUsize>,
    stats: ReplayStats,
}

impl<T> fmt::Debug for Replay<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("max_line", &self.max_line.load(Relaxed))
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned + Send + 'static> Replay<T> {
    /// Reads one file. The file is opened here, on tokio's blocking pool.
    ///
    /// # Errors
    ///
    /// [`DlqError::IsADirectory`] if `path` is a directory;
    /// [`DlqError::Read`] if the file cannot be opened.
    ///
    /// ```
    /// use streamz::dlq::{DlqError, Replay};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let err = Replay::<u32>::open(dir.path()).await.unwrap_err();
    /// assert!(matches!(err, DlqError::IsADirectory { .. }));
    /// let err = Replay::<u32>::open(dir.path().join("missing")).await.unwrap_err();
    /// assert!(matches!(err, DlqError::Read { .. }));
    /// # }
    /// ```
    pub async fn open(path: impl AsRef<Path>) -> std::result::Result<Self, DlqError> {
        let path = path.as_ref().to_path_buf();
        Self::start(move || Ok(vec![path])).await
    }

    /// Reads the rotated files of `path` (`<name>.1`, `<name>.2`, ...)
    /// oldest first, then `path` itself if it exists. The directory is
    /// listed and the oldest file opened here (on tokio's blocking pool);
    /// each further file is opened when its turn comes, so one file handle
    /// is open at a time. A file that cannot be opened then (deleted
    /// meanwhile) becomes a `failed` error item with [`DlqError::Read`],
    /// and reading goes on with the next.
    ///
    /// The segments present must be consecutive. They need not start at 1:
    /// [`FileSink::with_retention`](crate::resilience::dlq::FileSink::with_retention)
    /// deletes the oldest ones, so a set that starts at `<name>.5` is what
    /// a retention limit leaves. A hole between the oldest and the newest
    /// segment present cannot come from retention, and fails.
    ///
    /// # Errors
    ///
    /// - [`DlqError::MissingSegment`] if a segment is missing between the
    ///   oldest and the newest present (`.1` and `.3` exist, `.2` does not);
    /// - [`DlqError::IsADirectory`] if `path` or a segment is a directory;
    /// - [`DlqError::Read`] if the directory cannot be listed, if there is
    ///   neither a segment nor `path` (a `NotFound` error for `path`), or
    ///   if the oldest file cannot be opened.
    ///
    /// ```
    /// use streamz::dlq::{DlqError, Replay};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("dlq.jsonl");
    /// std::fs::write(dir.path().join("dlq.jsonl.1"), "")?;
    /// std::fs::write(dir.path().join("dlq.jsonl.3"), "")?;
    /// let err = Replay::<u32>::open_rotated(&path).await.unwrap_err();
    /// assert!(matches!(err, DlqError::MissingSegment { missing: 2, .. }));
    /// # Ok(()) }
    /// ```
    pub async fn open_rotated(path: impl AsRef<Path>) -> std::result::Result<Self, DlqError> {
        let path = path.as_ref().to_path_buf();
        Self::start(move || rotated_files(&path)).await
    }

    /// Lists the files on the blocking pool, checks them and opens the
    /// first.
    async fn start(
        list: impl FnOnce() -> std::result::Result<Vec<PathBuf>, DlqError> + Send + 'static,
    ) -> std::result::Result<Self, DlqError> {
        let max_line = Arc::new(AtomicUsize::new(DEFAULT_MAX_LINE));
        let stats = ReplayStats::default();
        let reader = {
            let (max_line, stats) = (max_line.clone(), stats.clone());
            let opened = crate::base::blocking::spawn_blocking(move || {
                let paths = list()?;
                for path in &paths {
                    check_file(path)?;
                }
                let mut reader = Reader {
                    files: paths.into(),
                    current: None,
                    line: Vec::new(),
                    max_line,
                    stats,
                };
                if let Some(path) = reader.files.pop_front() {
                    match std::fs::File::open(&path) {
                        Ok(file) => reader.current = Some(Current::new(path, file)),
                        Err(source) => return Err(DlqError::Read { path, source }),
                    }
                }
                Ok(reader)
            })
            .await;
            match opened {
                Ok(r) => r?,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {
                    return Err(DlqError::Read {
                        path: PathBuf::new(),
                        source: std::io::Error::other("the runtime is shutting down"),
                    });
                }
            }
        };
        // Files are read on the blocking pool, a batch of lines at a time,
        // so the runtime's workers never wait on the disk.
        let batches = futures::stream::unfold(Some(reader), |reader| async move {
            let mut reader = reader?;
            let joined = crate::base::blocking::spawn_blocking(move || {
                let batch = reader.next_batch::<T>();
                (reader, batch)
            })
            .await;
            match joined {
                Ok((reader, batch)) if !batch.is_empty() => Some((batch, Some(reader))),
                Ok(_) => None,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => None, // the runtime is shutting down
            }
        });
        let inner = batches.flat_map(futures::stream::iter);
        Ok(Replay {
            inner: Box::pin(inner),
            max_line,
            stats,
        })
    }

    /// The records as a flow on a new [`Pipeline`](crate::Pipeline) (use
    /// [`Pipeline::try_stream`](crate::Pipeline::try_stream) to put them
    /// on your own).
    ///
    /// ```
    /// use streamz::dlq::Replay;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("empty.jsonl");
    /// std::fs::write(&path, "")?;
    /// let out = Replay::<u32>::open(&path).await?.into_flow().collect().await;
    /// assert!(out.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn into_flow(self) -> Flow<DeadLetter<T>> {
        crate::try_stream(self)
    }
}

impl<T> Replay<T> {
    /// A live view of what has been read.
    ///
    /// ```
    /// use streamz::dlq::Replay;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("dlq.jsonl");
    /// std::fs::write(&path, "not a record\n")?;
    /// let replay = Replay::<u32>::open(&path).await?;
    /// let stats = replay.stats();
    /// replay.into_flow().collect().await;
    /// assert_eq!((stats.records(), stats.corrupt()), (0, 1));
    /// # Ok(()) }
    /// ```
    pub fn stats(&self) -> ReplayStats {
        self.stats.clone()
    }

    /// The longest line read, in bytes without its newline
    /// ([`DEFAULT_MAX_LINE`], 4 MiB, by default). A longer line is read
    /// and discarded in pieces, and becomes one `rejected` error item with
    /// [`DlqError::LineTooLong`]; memory for a line stays within the
    /// limit. Takes effect from the next line read.
    ///
    /// Zero is refused when reading starts (there is no operator to pipe):
    /// the replay then yields one error item of kind
    /// [`Config`](ErrorKind::Config), stage `replay`, whose source is a
    /// [`ConfigError`](crate::ConfigError) for the field `max_line`, and ends without reading
    /// a line.
    ///
    /// ```
    /// use streamz::dlq::{DlqError, Replay};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("dlq.jsonl");
    /// std::fs::write(&path, format!("{}\n", "x".repeat(100)))?;
    /// let replay = Replay::<u32>::open(&path).await?.with_max_line(64);
    /// let stats = replay.stats();
    /// let out = replay.into_flow().collect().await;
    /// let err = out[0].as_ref().unwrap_err();
    /// let source = err.cause().unwrap().downcast_ref::<DlqError>().unwrap();
    /// assert!(matches!(source, DlqError::LineTooLong { line: 1, max: 64, .. }));
    /// assert_eq!(stats.too_long(), 1);
    ///
    /// // Zero: one error item, and nothing read.
    /// let out = Replay::<u32>::open(&path).await?.with_max_line(0).into_flow().collect().await;
    /// let err = out[0].as_ref().unwrap_err();
    /// let config = err.cause().unwrap().downcast_ref::<streamz::ConfigError>().unwrap();
    /// assert_eq!(config.to_string(), "Replay `replay`: `max_line` must be greater than zero");
    /// assert_eq!(out.len(), 1);
    /// # Ok(()) }
    /// ```
    pub fn with_max_line(self, bytes: usize) -> Self {
        self.max_line.store(bytes, Relaxed);
        self
    }
}

impl<T> Stream for Replay<T> {
    type Item = Result<DeadLetter<T>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The segments of `path` oldest first, then `path` if it exists; checks
/// that the segments are consecutive.
fn rotated_files(path: &Path) -> std::result::Result<Vec<PathBuf>, DlqError> {
    let read_err = |source| DlqError::Read {
        path: path.to_path_buf(),
        source,
    };
    let segments = crate::resilience::dlq::file::segments(path).map_err(read_err)?;
    if let (Some((first, _)), Some((last, _))) = (segments.first(), segments.last()) {
        for pair in segments.windows(2) {
            let (a, b) = (pair[0].0, pair[1].0);
            if b != a + 1 {
                return Err(DlqError::MissingSegment {
                    path: path.to_path_buf(),
                    missing: a + 1,
                    first: *first,
                    last: *last,
                });
            }
        }
    }
    let mut files: Vec<PathBuf> = segments.into_iter().map(|(_, p)| p).collect();
    match std::fs::symlink_metadata(path) {
        Ok(_) => files.push(path.to_path_buf()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !files.is_empty() => {}
        Err(e) => return Err(read_err(e)),
    }
    Ok(files)
}

/// A typed error for a path that is a directory, or cannot be examined.
fn check_file(path: &Path) -> std::result::Result<(), DlqError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(DlqError::IsADirectory {
            path: path.to_path_buf(),
        }),
        Ok(_) => Ok(()),
        Err(source) => Err(DlqError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Lines read per trip to the blocking pool.
const BATCH: usize = 256;

struct Reader {
    /// The files still to open, in order.
    files: VecDeque<PathBuf>,
    current: Option<Current>,
    line: Vec<u8>,
    max_line: Arc<AtomicUsize>,
    stats: ReplayStats,
}

/// The file being read, its reader and the number of the last line read.
struct Current {
    path: PathBuf,
    reader: BufReader<std::fs::File>,
    number: u64,
}

impl Current {
    fn new(path: PathBuf, file: std::fs::File) -> Self {
        Current {
            path,
            reader: BufReader::with_capacity(64 << 10, file),
            number: 0,
        }
    }
}

/// One line as [`read_line`] found it.
struct Line {
    /// It ends with a newline.
    complete: bool,
    /// It was longer than the limit, and discarded.
    too_long: bool,
}

/// Reads the next line into `line` (newline included), unless it is
/// longer than `max` bytes without its newline: then the line is read and
/// discarded in the reader's pieces and `line` is left empty. `None` at
/// the end of the file.
fn read_line(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<Line>> {
    line.clear();
    let mut read_any = false;
    let mut too_long = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(read_any.then_some(Line {
                complete: false,
                too_long,
            }));
        }
        read_any = true;
        let (take, complete) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if !too_long {
            let content = line.len() + take - usize::from(complete);
            if content > max {
                too_long = true;
                line.clear();
                line.shrink_to(max.min(64 << 10));
            } else {
                line.extend_from_slice(&buf[..take]);
            }
        }
        reader.consume(take);
        if complete {
            return Ok(Some(Line {
                complete: true,
                too_long,
            }));
        }
    }
}

impl Reader {
    /// Up to [`BATCH`] items; empty at the end of the last file.
    fn next_batch<T: DeserializeOwned>(&mut self) -> Vec<Result<DeadLetter<T>>> {
        let mut batch = Vec::with_capacity(BATCH);
        while batch.len() < BATCH {
            match self.next::<T>() {
                Some(item) => batch.push(item),
                None => break,
            }
        }
        batch
    }

    fn next<T: DeserializeOwned>(&mut self) -> Option<Result<DeadLetter<T>>> {
        if self.current.is_none() && self.files.is_empty() {
            return None;
        }
        if let Err(e) = nonzero(self.max_line.load(Relaxed), "max_line") {
            // Refused before another line is read: the replay ends here.
            self.current = None;
            self.files.clear();
            let e = e.in_stage("Replay", STAGE);
            return Some(Err(
                StreamError::new(ErrorKind::Config, STAGE).with_source(e)
            ));
        }
        loop {
            if self.current.is_none() {
                // One file open at a time: the next is opened only now.
                let path = self.files.pop_front()?;
                match std::fs::File::open(&path) {
                    Ok(file) => self.current = Some(Current::new(path, file)),
                    Err(source) => {
                        return Some(Err(StreamError::failed(
                            STAGE,
                            DlqError::Read { path, source },
                        )));
                    }
                }
            }
            let max = self.max_line.load(Relaxed);
            let Current {
                path,
                reader,
                number,
            } = self.current.as_mut()?;
            match read_line(reader, &mut self.line, max) {
                Ok(None) => self.current = None,
                Ok(Some(Line { complete, too_long })) => {
                    *number += 1;
                    if too_long {
                        if !complete {
                            self.stats.inner.torn.fetch_add(1, Relaxed);
                            tracing::warn!(path = %path.display(), line = *number, "skipping the torn (and over-long) last line of a dead-letter file");
                            continue;
                        }
                        self.stats.inner.too_long.fetch_add(1, Relaxed);
                        tracing::warn!(path = %path.display(), line = *number, max, "skipping a dead-letter line longer than the limit");
                        let err = DlqError::LineTooLong {
                            path: path.clone(),
                            line: *number,
                            max,
                        };
                        return Some(Err(
                            StreamError::new(ErrorKind::Rejected, STAGE).with_source(err)
                        ));
                    }
                    let text = self.line.trim_ascii();
                    if text.is_empty() {
                        continue;
                    }
                    match serde_json::from_slice::<DeadLetter<T>>(text) {
                        Ok(record) => {
                            self.stats.inner.records.fetch_add(1, Relaxed);
                            return Some(Ok(record));
                        }
                        Err(e) if !complete => {
                            self.stats.inner.torn.fetch_add(1, Relaxed);
                            let error = super::NotARecord::from(&e);
                            tracing::warn!(path = %path.display(), line = *number, %error, "skipping the torn last line of a dead-letter file");
                        }
                        Err(source) => {
                            self.stats.inner.corrupt.fetch_add(1, Relaxed);
                            let line = String::from_utf8_lossy(text).into_owned();
                            let err = DlqError::Corrupt {
                                path: path.clone(),
                                line: *number,
                                source: super::NotARecord::from(&source),
                            };
                            return Some(Err(StreamError::new(ErrorKind::Rejected, STAGE)
                                .with_source(err)
                                .with_item(line)));
                        }
                    }
                }
                Err(source) => {
                    let path = path.clone();
                    self.current = None;
                    return Some(Err(StreamError::failed(
                        STAGE,
                        DlqError::Read { path, source },
                    )));
                }
            }
        }
    }
}

/// What a [`Replay`] has read, readable while it runs.
#[derive(Debug, Clone, Default)]
pub struct ReplayStats {
    inner: Arc<StatsInner>,
}

#[derive(Debug, Default)]
struct StatsInner {
    records: AtomicU64,
    torn: AtomicU64,
    corrupt: AtomicU64,
    too_long: AtomicU64,
}

impl ReplayStats {
    /// Records read.
    pub fn records(&self) -> u64 {
        self.inner.records.load(Relaxed)
    }

    /// Torn last lines skipped.
    pub fn torn(&self) -> u64 {
        self.inner.torn.load(Relaxed)
    }

    /// Complete lines that were not records (passed on as error items).
    pub fn corrupt(&self) -> u64 {
        self.inner.corrupt.load(Relaxed)
    }

    /// Complete lines longer than [`Replay::with_max_line`], skipped
    /// unread (passed on as error items).
    pub fn too_long(&self) -> u64 {
        self.inner.too_long.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::config::ConfigError;
    use std::io::Read;

    #[test]
    fn an_overlong_line_is_discarded_in_pieces_never_held_whole() {
        // 64 MiB of one line, produced lazily, then a short line.
        let huge = std::io::repeat(b'x').take(64 << 20);
        let input = huge.chain(&b"\n{\"ok\":1}\n"[..]);
        let mut reader = BufReader::with_capacity(64 << 10, input);
        let mut line = Vec::new();
        let max = 1000;
        let first = read_line(&mut reader, &mut line, max).unwrap().unwrap();
        assert!(first.complete && first.too_long);
        assert!(line.is_empty());
        // Never more than the limit (and its first piece) was kept.
        assert!(line.capacity() <= 64 << 10, "{}", line.capacity());
        let second = read_line(&mut reader, &mut line, max).unwrap().unwrap();
        assert!(second.complete && !second.too_long);
        assert_eq!(line, b"{\"ok\":1}\n");
        assert!(read_line(&mut reader, &mut line, max).unwrap().is_none());
    }

    #[test]
    fn a_zero_limit_ends_the_replay_with_one_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        std::fs::write(&path, "x\n").unwrap();
        let mut reader = Reader {
            files: VecDeque::new(),
            current: Some(Current::new(
                path.clone(),
                std::fs::File::open(&path).unwrap(),
            )),
            line: Vec::new(),
            max_line: Arc::new(AtomicUsize::new(0)),
            stats: ReplayStats::default(),
        };
        let err = reader.next::<u32>().unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let config = err.cause().unwrap().downcast_ref::<ConfigError>().unwrap();
        assert_eq!(
            (config.operator(), config.stage(), config.field()),
            (Some("Replay"), Some(STAGE), "max_line")
        );
        assert!(
            reader.next::<u32>().is_none(),
            "nothing read after the error"
        );
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_read() {
        let mut reader = BufReader::with_capacity(4, &b"abcd\nabcde\nab"[..]);
        let mut line = Vec::new();
        let l = read_line(&mut reader, &mut line, 4).unwrap().unwrap();
        assert!(l.complete && !l.too_long);
        assert_eq!(line, b"abcd\n");
        let l = read_line(&mut reader, &mut line, 4).unwrap().unwrap();
        assert!(l.complete && l.too_long);
        let l = read_line(&mut reader, &mut line, 4).unwrap().unwrap();
        assert!(!l.complete && !l.too_long);
        assert_eq!(line, b"ab");
    }
}
