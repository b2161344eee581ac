//! A /proc file kept open and re-read from offset 0 on every sample.
//!
//! Opening a /proc file costs about as much as generating its text; keeping
//! the descriptor and reading it again with `pread` from offset 0 halves the
//! cost of a sample (docs/performance.md). A read error drops the descriptor so the next
//! read opens the file afresh (the file may have appeared since, as `pressure/*`
//! does when PSI is enabled at runtime).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Largest /proc file we accept; a larger one is treated as malformed rather
/// than growing memory without bound.
pub const MAX_PROC_FILE_SIZE: usize = 4 << 20;

/// One file under the proc root, opened lazily and kept open.
#[derive(Debug)]
pub struct ProcFile {
    path: PathBuf,
    file: Option<File>,
    buf: Vec<u8>,
}

impl ProcFile {
    /// A handle on `root/rel`; nothing is opened until the first read.
    pub fn new(root: &Path, rel: &str) -> Self {
        ProcFile {
            path: root.join(rel),
            file: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// The file's full path, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the whole current content of the file.
    pub fn read(&mut self) -> Result<&[u8]> {
        match self.read_once() {
            Ok(()) => Ok(&self.buf),
            Err(e) => {
                self.file = None;
                Err(Error::Read {
                    path: self.path.clone(),
                    source: e,
                })
            }
        }
    }

    fn read_once(&mut self) -> std::io::Result<()> {
        if self.file.is_none() {
            self.file = Some(File::open(&self.path)?);
        }
        let Some(file) = self.file.as_ref() else {
            unreachable!("file opened above")
        };
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            let n = file.read_at(&mut chunk, self.buf.len() as u64)?;
            if n == 0 {
                return Ok(());
            }
            if self.buf.len() + n > MAX_PROC_FILE_SIZE {
                return Err(std::io::Error::other(format!(
                    "larger than {MAX_PROC_FILE_SIZE} bytes"
                )));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads the file and parses it with `parse`, naming the file in any error.
    pub fn parse<T>(
        &mut self,
        parse: impl FnOnce(&[u8]) -> std::result::Result<T, procfs::ProcError>,
    ) -> Result<T> {
        self.read()?;
        parse(&self.buf).map_err(|e| Error::from_proc(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rereads_changed_content_through_the_same_descriptor() {
        let dir = std::env::temp_dir().join(format!("ga-procfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x"), "first").unwrap();
        let mut f = ProcFile::new(&dir, "x");
        assert_eq!(f.read().unwrap(), b"first");
        std::fs::write(dir.join("x"), "second, longer").unwrap();
        assert_eq!(f.read().unwrap(), b"second, longer");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_names_the_path_and_is_not_found() {
        let mut f = ProcFile::new(Path::new("/nonexistent-proc-root"), "pressure/cpu");
        let err = f.read().unwrap_err();
        assert!(err.is_not_found());
        assert!(
            err.to_string()
                .contains("/nonexistent-proc-root/pressure/cpu")
        );
    }
}
