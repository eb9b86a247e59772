//! Reading GGUF files: typed metadata access and tensors, with errors that name the file and
//! the key or tensor at fault.
//!
//! The container format itself is parsed by candle (`candle_core::quantized::gguf_file`); this
//! module adds what a user needs when a file is wrong: which file, which key, what was expected.

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use crate::ModelError;

/// Where GGUF bytes come from: a file, or memory ([`GgufFile::from_bytes`]).
trait Source: Read + Seek + Send {}

impl<T: Read + Seek + Send> Source for T {}

/// An open GGUF file: its metadata and tensor directory, and a reader for tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: Box<dyn Source>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ModelError::MissingFile {
                    path: path.to_path_buf(),
                    hint: "no such GGUF file; run `scripts/fetch-models.sh` for the default \
                           generator, or pass the path of a .gguf file"
                        .into(),
                }
            } else {
                ModelError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Self::read(path, Box::new(BufReader::new(file)))
    }

    /// Reads a GGUF image already in memory; `path` only names it in errors. The entry point
    /// of the fuzz target (fuzz/fuzz_targets/gguf.rs) and of tests.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self, ModelError> {
        Self::read(path, Box::new(Cursor::new(bytes)))
    }

    fn read(path: &Path, mut reader: Box<dyn Source>) -> Result<Self, ModelError> {
        let error = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            field: "GGUF header".into(),
            message,
        };
        // candle's reader can panic on a malformed header (found by fuzzing: a
        // `general.alignment` of 0 divides by zero), so a panic there becomes an error naming
        // the file. The reader is dropped afterwards, so its state after a panic is never seen.
        let content = match catch_unwind(AssertUnwindSafe(|| Content::read(&mut reader))) {
            Ok(Ok(content)) => content,
            Ok(Err(e)) => return Err(error(format!("not a readable GGUF file: {e}"))),
            Err(_) => return Err(error("not a readable GGUF file: the reader crashed".into())),
        };
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn value(&self, key: &str) -> Result<&Value, ModelError> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.config_error(key, "missing metadata key".into()))
    }

    pub fn config_error(&self, key: &str, message: String) -> ModelError {
        ModelError::Config {
            path: self.path.clone(),
            field: key.to_string(),
            message,
        }
    }

    /// An unsigned integer of any width (GGUF writers differ in which width they use).
    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        let value = self.value(key)?;
        let n = match value {
            Value::U8(v) => Some(*v as u64),
            Value::U16(v) => Some(*v as u64),
            Value::U32(v) => Some(*v as u64),
            Value::U64(v) => Some(*v),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
            self.config_error(
                key,
                format!("expected an unsigned integer, found {value:?}"),
            )
        })
    }

    pub fn optional_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        if self.has(key) {
            self.usize(key).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn f32(&self, key: &str) -> Result<f32, ModelError> {
        match self.value(key)? {
            Value::F32(v) => Ok(*v),
            Value::F64(v) => Ok(*v as f32),
            other => Err(self.config_error(key, format!("expected a float, found {other:?}"))),
        }
    }

    pub fn bool(&self, key: &str) -> Result<bool, ModelError> {
        match self.value(key)? {
            Value::Bool(v) => Ok(*v),
            other => Err(self.config_error(key, format!("expected a boolean, found {other:?}"))),
        }
    }

    pub fn string(&self, key: &str) -> Result<&str, ModelError> {
        match self.value(key)? {
            Value::String(v) => Ok(v.as_str()),
            other => {
                Err(self.config_error(key, format!("expected a string, found {}", kind(other))))
            }
        }
    }

    pub fn array(&self, key: &str) -> Result<&[Value], ModelError> {
        match self.value(key)? {
            Value::Array(v) => Ok(v.as_slice()),
            other => {
                Err(self.config_error(key, format!("expected an array, found {}", kind(other))))
            }
        }
    }

    pub fn string_array(&self, key: &str) -> Result<Vec<&str>, ModelError> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.config_error(
                    key,
                    format!("element {i}: expected a string, found {}", kind(other)),
                )),
            })
            .collect()
    }

    pub fn int_array(&self, key: &str) -> Result<Vec<i64>, ModelError> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::I8(x) => Ok(*x as i64),
                Value::I16(x) => Ok(*x as i64),
                Value::I32(x) => Ok(*x as i64),
                Value::I64(x) => Ok(*x),
                Value::U8(x) => Ok(*x as i64),
                Value::U16(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                other => Err(self.config_error(
                    key,
                    format!("element {i}: expected an integer, found {}", kind(other)),
                )),
            })
            .collect()
    }

    /// Reads one tensor (quantised or not), checking its shape against `expected` (in the
    /// row-major order candle uses: `[out, in]` for a weight matrix).
    pub fn tensor(&mut self, name: &str, expected: &[usize]) -> Result<QTensor, ModelError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::Weights {
                path: self.path.clone(),
                tensor: name.to_string(),
                message: "missing tensor".into(),
            })?;
        if info.shape.dims() != expected {
            return Err(ModelError::Weights {
                path: self.path.clone(),
                tensor: name.to_string(),
                message: format!("shape {:?}, expected {expected:?}", info.shape.dims()),
            });
        }
        // candle sizes the tensor with unchecked multiplications (a panic in a debug build, a
        // wrapped size that may pass its bounds check in a release one), and the expected
        // shape comes from the same file's metadata: check that the byte size fits first.
        // An empty tensor is refused too: candle views its empty (byte-aligned) buffer as a
        // slice of f32 or blocks, which is undefined behaviour.
        let dtype = info.ggml_dtype;
        let size = expected
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| (n / dtype.block_size()).checked_mul(dtype.type_size()));
        if size.is_none_or(|bytes| bytes == 0) {
            return Err(ModelError::Weights {
                path: self.path.clone(),
                tensor: name.to_string(),
                message: format!("shape {expected:?} of {dtype:?} is empty or too large"),
            });
        }
        info.read(
            &mut self.reader,
            self.content.tensor_data_offset,
            &Device::Cpu,
        )
        .map_err(|e| ModelError::Weights {
            path: self.path.clone(),
            tensor: name.to_string(),
            message: e.to_string(),
        })
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Bool(_) => "a boolean",
        Value::F32(_) | Value::F64(_) => "a float",
        _ => "an integer",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 image with no metadata and one f32 tensor `w` of shape `dims` (GGUF order).
    fn one_tensor(dims: &[u64]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&1u64.to_le_bytes()); // tensors
        out.extend_from_slice(&0u64.to_le_bytes()); // metadata entries
        out.extend_from_slice(&1u64.to_le_bytes());
        out.push(b'w');
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&0u32.to_le_bytes()); // F32
        out.extend_from_slice(&0u64.to_le_bytes()); // offset
        out.resize(out.len().div_ceil(32) * 32 + 16, 0);
        out
    }

    #[test]
    fn reads_from_memory() {
        let mut gguf = GgufFile::from_bytes(Path::new("m.gguf"), one_tensor(&[2, 2])).unwrap();
        assert!(gguf.has_tensor("w"));
        assert_eq!(gguf.tensor("w", &[2, 2]).unwrap().shape().dims(), &[2, 2]);
        let err = GgufFile::from_bytes(Path::new("m.gguf"), b"GGUF".to_vec())
            .err()
            .unwrap();
        assert!(err.to_string().contains("m.gguf"), "{err}");
    }

    /// Found by fuzz/fuzz_targets/gguf.rs: a tensor whose dimensions multiply past
    /// `usize::MAX` overflowed in candle's size computation (a panic in debug builds).
    #[test]
    fn a_tensor_shape_too_large_to_size_is_an_error() {
        let dims = [1u64 << 40, 1 << 40];
        let mut gguf = GgufFile::from_bytes(Path::new("big.gguf"), one_tensor(&dims)).unwrap();
        let err = gguf.tensor("w", &[1 << 40, 1 << 40]).err().unwrap();
        assert!(err.to_string().contains("too large"), "{err}");
    }

    /// Found by fuzz/fuzz_targets/gguf.rs: a `general.alignment` of 0 made candle's header
    /// reader divide by zero.
    #[test]
    fn a_zero_alignment_is_an_error() {
        let mut image = b"GGUF".to_vec();
        image.extend_from_slice(&3u32.to_le_bytes());
        image.extend_from_slice(&0u64.to_le_bytes()); // tensors
        image.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
        let key = b"general.alignment";
        image.extend_from_slice(&(key.len() as u64).to_le_bytes());
        image.extend_from_slice(key);
        image.extend_from_slice(&4u32.to_le_bytes()); // u32
        image.extend_from_slice(&0u32.to_le_bytes());
        let err = GgufFile::from_bytes(Path::new("a.gguf"), image)
            .err()
            .unwrap();
        assert!(err.to_string().contains("a.gguf"), "{err}");
    }

    /// Found by fuzz/fuzz_targets/gguf.rs: reading a tensor with a zero dimension made candle
    /// build a slice of f32 from an unaligned empty buffer (a debug-build UB check fired).
    #[test]
    fn an_empty_tensor_is_an_error() {
        let mut gguf = GgufFile::from_bytes(Path::new("e.gguf"), one_tensor(&[0, 4])).unwrap();
        let err = gguf.tensor("w", &[4, 0]).err().unwrap();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
