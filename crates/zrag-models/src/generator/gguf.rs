//! Reading GGUF files: typed metadata access and tensors, with errors that name the file and
//! the key or tensor at fault.
//!
//! The container format itself is parsed by candle (`candle_core::quantized::gguf_file`); this
//! module adds what a user needs when a file is wrong: which file, which key, what was expected.

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek};
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
        let content = Content::read(&mut reader).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            field: "GGUF header".into(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
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
