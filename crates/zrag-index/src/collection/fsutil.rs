//! Durable file writing: the primitives every commit is built from.
//!
//! A commit only ever creates new files; the single mutable name is `MANIFEST`, replaced by
//! rename. Each new file is fsynced before the manifest that names it, and the directory is
//! fsynced after the rename, so a crash at any point leaves either the old or the new manifest,
//! and whichever it is, every file it names is complete.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{IndexError, Result};

/// Checksum and length of a file as recorded in the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileCheck {
    pub len: u64,
    pub crc32: u32,
}

impl FileCheck {
    pub fn of_bytes(bytes: &[u8]) -> Self {
        FileCheck {
            len: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        }
    }

    /// Verifies `bytes`, read from `path`, against this record.
    pub fn verify(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 != self.len {
            return Err(IndexError::corrupt(
                path,
                format!(
                    "length is {} bytes, the manifest recorded {} (truncated or overwritten)",
                    bytes.len(),
                    self.len
                ),
            ));
        }
        let crc = crc32fast::hash(bytes);
        if crc != self.crc32 {
            return Err(IndexError::corrupt(
                path,
                format!(
                    "checksum {crc:08x} does not match the manifest's {:08x}",
                    self.crc32
                ),
            ));
        }
        Ok(())
    }
}

/// Writes `bytes` to a new file at `path` and fsyncs it. Fails if the file exists: committed
/// files are immutable, and a name collision means a bug or a concurrent writer.
pub fn write_new_file(path: &Path, bytes: &[u8]) -> Result<FileCheck> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| IndexError::io(path, e))?;
    file.write_all(bytes).map_err(|e| IndexError::io(path, e))?;
    file.sync_all().map_err(|e| IndexError::io(path, e))?;
    Ok(FileCheck::of_bytes(bytes))
}

/// Atomically replaces `path` with `bytes`: write a temporary sibling, fsync, rename, fsync dir.
pub fn replace_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    write_new_file(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|e| IndexError::io(path, e))?;
    sync_dir(dir)
}

/// Makes the directory entries (creations, renames) in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IndexError::io(dir, e))
}

pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| IndexError::io(path, e))
}
