//! The checkpoint file: where a [`LineSource`](super::LineSource) resumes.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::base::atomic_file;

/// How far a [`LineSource`](super::LineSource) got: every line before
/// `offset` in `file`, and every line of the files whose names sort
/// before it, has its outcome decided (acknowledged). A restarted source
/// reads from here.
///
/// Written as JSON, atomically (a temporary file, fsync, rename, fsync of
/// the directory): a crash leaves the previous checkpoint or this one.
///
/// ```
/// use streamz::file::Checkpoint;
///
/// let text = r#"{"version":1,"file":"orders-0002.jsonl","offset":4096,"lines":7000}"#;
/// let c: Checkpoint = serde_json::from_str(text).unwrap();
/// assert_eq!(c.file, "orders-0002.jsonl");
/// assert_eq!(c.offset, 4096);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Checkpoint {
    /// The format's version, 1.
    pub version: u32,
    /// The file to resume in: its name within the source's directory (or
    /// the source file's own name).
    pub file: String,
    /// The byte offset to resume from in `file`: the start of the first
    /// line not yet acknowledged.
    pub offset: u64,
    /// Lines acknowledged since the source first started (over all runs).
    pub lines: u64,
}

impl Checkpoint {
    pub(crate) const VERSION: u32 = 1;

    /// Reads the checkpoint at `path`; `Ok(None)` if there is none yet.
    pub(crate) fn load(path: &Path) -> Result<Option<Checkpoint>, String> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read it: {e}")),
        };
        let c: Checkpoint =
            serde_json::from_slice(&bytes).map_err(|e| format!("not a checkpoint: {e}"))?;
        if c.version != Self::VERSION {
            return Err(format!(
                "version {} is not one this streamz reads ({})",
                c.version,
                Self::VERSION
            ));
        }
        Ok(Some(c))
    }

    /// Replaces the checkpoint at `path` atomically. Blocking.
    pub(crate) fn save(&self, path: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(io::Error::other)?;
        atomic_file::replace(path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_and_refuses_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.json");
        assert_eq!(Checkpoint::load(&path), Ok(None));
        let c = Checkpoint {
            version: 1,
            file: "a.jsonl".into(),
            offset: 10,
            lines: 2,
        };
        c.save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path), Ok(Some(c)));
        std::fs::write(&path, b"{\"version\":1,").unwrap();
        assert!(
            Checkpoint::load(&path)
                .unwrap_err()
                .contains("not a checkpoint")
        );
        std::fs::write(&path, br#"{"version":9,"file":"a","offset":0,"lines":0}"#).unwrap();
        assert!(Checkpoint::load(&path).unwrap_err().contains("version 9"));
    }
}
