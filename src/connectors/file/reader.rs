//! The blocking side of a [`LineSource`](super::LineSource): reads the
//! files in order on a blocking thread and hands lines over in batches
//! that never span two files, so each batch ends at a position the
//! checkpoint can name.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use super::{Line, LineError};

/// Lines read together, all from one file.
pub(super) struct Batch {
    /// The file's index in the source's list.
    pub(super) file: usize,
    /// The offset just past the batch's last complete line.
    pub(super) end: u64,
    /// The number of that line: lines behind `end` since the source first
    /// started.
    pub(super) behind: u64,
    pub(super) lines: Vec<Result<Line, (LineError, Line)>>,
}

/// A file the reader could not read.
pub(super) enum Failure {
    /// It is gone; the reader went on with the next file.
    Skipped(io::Error),
    /// Reading stopped here.
    Stopped(io::Error),
}

/// What the reader thread needs.
pub(super) struct Reader {
    pub(super) files: Vec<(Arc<str>, PathBuf)>,
    /// Where to start: a file's index and the offset in it.
    pub(super) start: (usize, u64),
    /// The line number of the first line read (counted from the source's
    /// first start, for the items' `number`).
    pub(super) first_number: u64,
    pub(super) batch: usize,
    pub(super) max_line: usize,
    pub(super) tx: mpsc::Sender<Result<Batch, Failure>>,
    pub(super) stop: Arc<AtomicBool>,
}

/// Bytes read from a file at a time.
const READ_BUFFER: usize = 256 * 1024;

impl Reader {
    /// Reads every file from the start position; returns when done, when
    /// told to stop or when the receiver is gone. An I/O error is sent on
    /// and ends the reading.
    pub(super) fn run(self) {
        let mut number = self.first_number;
        let (first, offset) = self.start;
        for (index, (name, path)) in self.files.iter().enumerate().skip(first) {
            let from = if index == first { offset } else { 0 };
            match self.read_file(index, name, path, from, &mut number) {
                Ok(true) => {}
                Ok(false) => return,
                // Gone since the source listed it: reported, and the
                // other files are still read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let e = io::Error::new(e.kind(), format!("{}: {e}", path.display()));
                    if self.tx.blocking_send(Err(Failure::Skipped(e))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let e = io::Error::new(e.kind(), format!("{}: {e}", path.display()));
                    let _ = self.tx.blocking_send(Err(Failure::Stopped(e)));
                    return;
                }
            }
        }
    }

    /// Reads one file from `from`; `Ok(false)` if reading must stop.
    fn read_file(
        &self,
        index: usize,
        name: &Arc<str>,
        path: &std::path::Path,
        from: u64,
        number: &mut u64,
    ) -> io::Result<bool> {
        let mut file = File::open(path)?;
        if from > 0 {
            file.seek(SeekFrom::Start(from))?;
        }
        let mut input = BufReader::with_capacity(READ_BUFFER, file);
        let mut at = from;
        let mut behind = *number;
        let mut lines = Vec::with_capacity(self.batch);
        let mut buf = Vec::new();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let start = at;
            let (len, too_long, ended) = read_line(&mut input, &mut buf, self.max_line)?;
            if len == 0 {
                break;
            }
            *number = number.saturating_add(1);
            // The line without its end ("\n" or "\r\n").
            if buf.last() == Some(&b'\n') {
                buf.pop();
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
            }
            // A last line without its end is handed over, but the
            // checkpoint stays at its start: a writer may still be
            // appending to it, and the next run reads it again, whole.
            // Reading this file stops there, so what is appended now is
            // not taken for a line of its own.
            if ended {
                at += len as u64;
                behind = *number;
            }
            let unfinished = !ended;
            let bytes = std::mem::take(&mut buf);
            let line = |text: String| Line {
                file: name.clone(),
                number: *number,
                offset: start,
                text,
            };
            lines.push(if too_long {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                Err((
                    LineError::TooLong {
                        max: self.max_line,
                        len,
                    },
                    line(text),
                ))
            } else {
                match String::from_utf8(bytes) {
                    Ok(text) => Ok(line(text)),
                    Err(e) => {
                        let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
                        Err((LineError::NotUtf8, line(text)))
                    }
                }
            });
            if unfinished {
                break;
            }
            if lines.len() >= self.batch {
                let full = std::mem::replace(&mut lines, Vec::with_capacity(self.batch));
                if !self.send(index, (at, behind), full) {
                    return Ok(false);
                }
            }
        }
        if !lines.is_empty() && !self.send(index, (at, behind), lines) {
            return Ok(false);
        }
        Ok(true)
    }

    fn send(
        &self,
        file: usize,
        (end, behind): (u64, u64),
        lines: Vec<Result<Line, (LineError, Line)>>,
    ) -> bool {
        self.tx
            .blocking_send(Ok(Batch {
                file,
                end,
                behind,
                lines,
            }))
            .is_ok()
    }
}

/// Reads one line, keeping at most `max` bytes of it: returns the bytes
/// the line took in the file (0 at the end), whether it was longer than
/// `max` (then `buf` holds its first `max` bytes and the rest was skipped)
/// and whether it ended with a newline (not: the file ended first).
fn read_line(
    input: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<(usize, bool, bool)> {
    let mut len = 0;
    let mut too_long = false;
    loop {
        let available = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok((len, too_long, false));
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        // The newline itself does not count against the limit.
        let content = if done { take - 1 } else { take };
        if !too_long {
            // `buf` holds at most `max` bytes of content here.
            if buf.len() + content > max {
                too_long = true;
                let keep = max - buf.len();
                buf.extend_from_slice(&available[..keep]);
            } else {
                buf.extend_from_slice(&available[..take]);
            }
        }
        input.consume(take);
        len += take;
        if done {
            return Ok((len, too_long, true));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[u8], max: usize) -> Vec<(usize, bool, Vec<u8>)> {
        let mut input = BufReader::with_capacity(4, text);
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            let (len, long, ended) = read_line(&mut input, &mut buf, max).unwrap();
            if len == 0 {
                return out;
            }
            assert_eq!(
                ended,
                text[..len
                    + out
                        .iter()
                        .map(|l: &(usize, bool, Vec<u8>)| l.0)
                        .sum::<usize>()]
                    .ends_with(b"\n")
            );
            out.push((len, long, buf));
        }
    }

    #[test]
    fn reads_lines_with_and_without_a_last_newline() {
        let got = lines(b"ab\ncdefg\n\nh", 10);
        assert_eq!(
            got,
            [
                (3, false, b"ab\n".to_vec()),
                (6, false, b"cdefg\n".to_vec()),
                (1, false, b"\n".to_vec()),
                (1, false, b"h".to_vec()),
            ]
        );
    }

    #[test]
    fn a_line_over_the_limit_keeps_its_start_and_skips_the_rest() {
        let got = lines(b"0123456789abc\nok\n", 5);
        assert_eq!(
            got,
            [(14, true, b"01234".to_vec()), (3, false, b"ok\n".to_vec())]
        );
        // Exactly at the limit is fine.
        assert_eq!(lines(b"01234\n", 5), [(6, false, b"01234\n".to_vec())]);
        assert_eq!(lines(b"012345", 5), [(6, true, b"01234".to_vec())]);
    }
}
