//! [`Replay`]: a dead-letter file read back as a stream of records.

use std::collections::VecDeque;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;

use crate::dlq::{DeadLetter, DlqError};
use crate::error::{ErrorKind, Result, StreamError};
use crate::flow::Flow;

/// The name replay errors carry as their stage.
const STAGE: &str = "replay";

/// Reads the records of a [`FileSink`](crate::dlq::FileSink) file back, in
/// file order, as a `futures::Stream` of `Result<DeadLetter<T>>`: a source
/// for a pipeline that fixes failed items and feeds them in again.
///
/// - A complete line that is not a record of `T` becomes an error item of
///   kind [`Rejected`](ErrorKind::Rejected), stage `replay`, whose source
///   is [`DlqError::Corrupt`] and whose item is the line as a `String`.
/// - A torn last line (no newline at the end of the file, as a crash
///   mid-write leaves it) is skipped with a warning and counted in
///   [`ReplayStats::torn`]; every complete record before it is read.
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
///     .pipe(DeadLetterQueue::new(FileSink::<u32>::create(&path)?))
///     .collect()
///     .await;
///
/// let replay = Replay::<u32>::open(&path)?;
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
    stats: ReplayStats,
}

impl<T> fmt::Debug for Replay<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned + Send + 'static> Replay<T> {
    /// Reads one file.
    ///
    /// # Errors
    ///
    /// [`DlqError::Read`] if the file cannot be opened.
    pub fn open(path: impl AsRef<Path>) -> std::result::Result<Self, DlqError> {
        Self::from_files(vec![path.as_ref().to_path_buf()])
    }

    /// Reads the rotated files of `path` (`<name>.1`, `<name>.2`, ...)
    /// oldest first, then `path` itself if it exists.
    ///
    /// # Errors
    ///
    /// [`DlqError::Read`] if the directory or a file cannot be read.
    pub fn open_rotated(path: impl AsRef<Path>) -> std::result::Result<Self, DlqError> {
        let path = path.as_ref();
        let read_err = |source| DlqError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut files: Vec<PathBuf> = crate::dlq::file::segments(path)
            .map_err(read_err)?
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        if path.exists() {
            files.push(path.to_path_buf());
        }
        Self::from_files(files)
    }

    fn from_files(paths: Vec<PathBuf>) -> std::result::Result<Self, DlqError> {
        let mut files = VecDeque::with_capacity(paths.len());
        for path in paths {
            match std::fs::File::open(&path) {
                Ok(file) => files.push_back((path, file)),
                Err(source) => return Err(DlqError::Read { path, source }),
            }
        }
        let stats = ReplayStats::default();
        let reader = Reader {
            files,
            current: None,
            line: Vec::new(),
            stats: stats.clone(),
        };
        // Files are read on the blocking pool, a batch of lines at a time,
        // so the runtime's workers never wait on the disk.
        let batches = futures::stream::unfold(Some(reader), |reader| async move {
            let mut reader = reader?;
            let joined = tokio::task::spawn_blocking(move || {
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
            stats,
        })
    }

    /// The records as a flow on a new [`Pipeline`](crate::Pipeline) (use
    /// [`Pipeline::try_stream`](crate::Pipeline::try_stream) to put them
    /// on your own).
    pub fn into_flow(self) -> Flow<DeadLetter<T>> {
        crate::try_stream(self)
    }
}

impl<T> Replay<T> {
    /// A live view of what has been read.
    pub fn stats(&self) -> ReplayStats {
        self.stats.clone()
    }
}

impl<T> Stream for Replay<T> {
    type Item = Result<DeadLetter<T>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Lines read per trip to the blocking pool.
const BATCH: usize = 256;

struct Reader {
    files: VecDeque<(PathBuf, std::fs::File)>,
    /// The file being read, its reader and the number of the last line read.
    current: Option<(PathBuf, BufReader<std::fs::File>, u64)>,
    line: Vec<u8>,
    stats: ReplayStats,
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
        loop {
            if self.current.is_none() {
                let (path, file) = self.files.pop_front()?;
                let reader = BufReader::with_capacity(64 << 10, file);
                self.current = Some((path, reader, 0));
            }
            let (path, reader, number) = self.current.as_mut()?;
            self.line.clear();
            match reader.read_until(b'\n', &mut self.line) {
                Ok(0) => self.current = None,
                Ok(_) => {
                    *number += 1;
                    let complete = self.line.last() == Some(&b'\n');
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
                            tracing::warn!(path = %path.display(), line = *number, error = %e, "skipping the torn last line of a dead-letter file");
                        }
                        Err(source) => {
                            self.stats.inner.corrupt.fetch_add(1, Relaxed);
                            let line = String::from_utf8_lossy(text).into_owned();
                            let err = DlqError::Corrupt {
                                path: path.clone(),
                                line: *number,
                                source,
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
}
