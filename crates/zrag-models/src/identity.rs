//! Which model produced a vector: [`ModelIdentity`] and the cached checksum behind it.
//!
//! An index records the identity of the encoder that built it, so vectors from different
//! weights are never mixed. The identity includes the SHA-256 of `model.safetensors`; hashing
//! 90 MB on every load would be wasteful, so the digest is cached in a sidecar file next to the
//! weights, keyed by the file's size and modification time (the same staleness test `make`
//! uses). If the sidecar cannot be written (read-only model directory) the digest is simply
//! recomputed on the next load.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ModelError;

/// Identifies an encoder's weights.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModelIdentity {
    /// The model directory's name, e.g. `all-MiniLM-L6-v2`.
    pub name: String,
    /// Lower-case hex SHA-256 of `model.safetensors`.
    pub sha256: String,
    /// Embedding dimension.
    pub dim: usize,
}

/// Name of the sidecar cache written beside `model.safetensors`.
pub const SHA256_SIDECAR: &str = ".model.safetensors.sha256.json";

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Sidecar {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

/// The SHA-256 of `weights_path`, whose content the caller has already read into `bytes`.
///
/// Uses the sidecar when its size and mtime match the file, otherwise hashes `bytes` and
/// (best effort) refreshes the sidecar.
pub(crate) fn weights_sha256(weights_path: &Path, bytes: &[u8]) -> Result<String, ModelError> {
    let metadata = std::fs::metadata(weights_path).map_err(|source| ModelError::Io {
        path: weights_path.to_path_buf(),
        source,
    })?;
    let size = metadata.len();
    let mtime_ns = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos());
    let sidecar_path = sidecar_path(weights_path);

    // A file whose mtime is unknown is never trusted to the cache.
    if let Some(mtime_ns) = mtime_ns {
        if let Some(cached) = read_sidecar(&sidecar_path) {
            if cached.size == size && cached.mtime_ns == mtime_ns && size == bytes.len() as u64 {
                return Ok(cached.sha256);
            }
        }
    }

    let sha256 = hex(&Sha256::digest(bytes));
    if let Some(mtime_ns) = mtime_ns {
        let sidecar = Sidecar {
            size,
            mtime_ns,
            sha256: sha256.clone(),
        };
        // Best effort: a read-only model directory only costs a re-hash next time. Written to
        // a temporary name and renamed so a concurrent loader never reads half a file.
        let tmp = sidecar_path.with_extension(format!("tmp{}", std::process::id()));
        if let Ok(json) = serde_json::to_vec(&sidecar) {
            if std::fs::write(&tmp, json).is_ok() && std::fs::rename(&tmp, &sidecar_path).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
    Ok(sha256)
}

fn sidecar_path(weights_path: &Path) -> PathBuf {
    weights_path.with_file_name(SHA256_SIDECAR)
}

fn read_sidecar(path: &Path) -> Option<Sidecar> {
    let text = std::fs::read(path).ok()?;
    let sidecar: Sidecar = serde_json::from_slice(&text).ok()?;
    let well_formed = sidecar.sha256.len() == 64
        && sidecar
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    well_formed.then_some(sidecar)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_is_used_when_fresh_and_ignored_when_stale() {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("model.safetensors");
        std::fs::write(&weights, b"first").unwrap();
        let first = weights_sha256(&weights, b"first").unwrap();
        assert_eq!(first, hex(&Sha256::digest(b"first")));
        assert!(dir.path().join(SHA256_SIDECAR).exists());

        // A fresh sidecar is trusted: passing other bytes of the same length returns the cache.
        assert_eq!(weights_sha256(&weights, b"xxxxx").unwrap(), first);

        // Changing the file (size and mtime) invalidates it.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&weights, b"second!").unwrap();
        let second = weights_sha256(&weights, b"second!").unwrap();
        assert_eq!(second, hex(&Sha256::digest(b"second!")));

        // A corrupt sidecar is ignored.
        std::fs::write(dir.path().join(SHA256_SIDECAR), b"{not json").unwrap();
        assert_eq!(weights_sha256(&weights, b"second!").unwrap(), second);
    }
}
