//! Reading files and directories into [`Document`]s.
//!
//! Policies for bad input (each error names the file):
//! - **unknown extension**: skipped when found while walking a directory
//!   (reported in [`LoadReport::skipped`]); an error when the file was named;
//! - **empty file** (or nothing left after extraction, e.g. a PDF without a
//!   text layer): no document and no error; reported in `skipped` with
//!   [`SkipReason::Empty`], so a caller can still tell the user;
//! - **binary file** (a NUL byte in a text format): [`TextError::Binary`];
//! - **non-UTF-8 text**: [`TextError::InvalidUtf8`] with line and byte
//!   offset, unless [`LoadOptions::lossy_utf8`] is set. UTF-16 with a
//!   byte-order mark is decoded; HTML that declares a Western single-byte
//!   charset (ISO-8859-1, Windows-1252) is decoded as Windows-1252;
//! - **huge file**: over [`LoadOptions::max_file_bytes`] (64 MiB by default)
//!   a single-document file is [`TextError::TooLarge`], checked before
//!   reading. A JSONL corpus has no total limit (it is streamed a line at a
//!   time); each of its lines has that limit;
//! - **malformed JSONL**: the whole file fails (see [`crate::formats::jsonl`]);
//! - **malformed PDF**: an error, including when the PDF parser panics;
//! - **duplicate ids** across files: the first document wins, each later one
//!   is dropped and reported as a failure.
//!
//! [`load_paths`] never stops at a bad file: it loads everything it can and
//! lists the rest in [`LoadReport::failures`].

use crate::document::{Document, Format};
use crate::formats::encoding::{decode_text, decode_windows_1252};
use crate::formats::{html, jsonl, markdown, pdf, Extracted};
use crate::normalize::normalize_text;
use crate::TextError;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Options for loading; `LoadOptions::default()` is what [`load_file`] and
/// [`load_paths`] use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Largest single-document file read, and longest JSONL line, in bytes.
    /// Default 64 MiB.
    pub max_file_bytes: u64,
    /// Decode invalid UTF-8 with U+FFFD replacement characters instead of
    /// failing. Default false.
    pub lossy_utf8: bool,
    /// Follow symbolic links while walking directories (directory cycles are
    /// detected and walked once). Default true.
    pub follow_symlinks: bool,
    /// Walk into hidden entries (names starting with `.`, such as `.git` or
    /// `.zrag`). Default false. Paths named explicitly are always loaded.
    pub include_hidden: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_file_bytes: 64 * 1024 * 1024,
            lossy_utf8: false,
            follow_symlinks: true,
            include_hidden: false,
        }
    }
}

/// A file that could not be loaded.
#[derive(Debug)]
pub struct LoadFailure {
    pub path: PathBuf,
    pub error: TextError,
}

/// Why a file gave no documents without being an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Found while walking a directory, with an extension no loader handles.
    UnsupportedExtension,
    /// Empty, or no text left after extraction.
    Empty,
    /// Found while walking a directory: neither a file nor a directory
    /// (FIFO, socket, device).
    NotARegularFile,
}

/// A file that gave no documents, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: SkipReason,
}

/// What [`load_paths`] found.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Documents in a deterministic order: paths in the order given,
    /// directories walked in sorted order, JSONL lines in file order.
    pub documents: Vec<Document>,
    /// Files (and directories) that failed, in the order met.
    pub failures: Vec<LoadFailure>,
    /// Files whose loading was attempted (loaded, empty or failed); skipped
    /// unsupported files are not counted.
    pub files_seen: usize,
    /// Files that gave no documents without an error.
    pub skipped: Vec<Skipped>,
}

/// The files [`discover`] found to load, in load order.
#[derive(Debug, Default)]
pub struct Discovery {
    pub files: Vec<PathBuf>,
    pub failures: Vec<LoadFailure>,
    pub skipped: Vec<Skipped>,
}

/// Loads one file with default options: its documents (one for most formats,
/// one per line for JSONL; none for an empty file).
pub fn load_file(path: &Path) -> Result<Vec<Document>, TextError> {
    load_file_with(path, &LoadOptions::default())
}

/// Loads one file. An unknown extension is an error here.
pub fn load_file_with(path: &Path, options: &LoadOptions) -> Result<Vec<Document>, TextError> {
    let id = path_id(path)?;
    let format = Format::from_path(path).ok_or_else(|| TextError::UnsupportedFormat {
        path: path.to_path_buf(),
    })?;
    let io_error = |source| TextError::Io {
        path: path.to_path_buf(),
        source,
    };
    let metadata = fs::metadata(path).map_err(io_error)?;
    if !metadata.is_file() {
        return Err(TextError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let file = File::open(path).map_err(io_error)?;
    if format == Format::Jsonl {
        let reader = BufReader::with_capacity(1 << 16, file);
        return jsonl::parse(reader, path, id, options.max_file_bytes);
    }
    check_size(path, metadata.len(), options.max_file_bytes)?;
    // Read at most one byte past the limit: the size can change between the
    // metadata call and the read.
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(options.max_file_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    check_size(path, bytes.len() as u64, options.max_file_bytes)?;
    build_documents(path, id, format, &bytes, options)
}

/// Parses bytes already in memory as a file of `format`; `path` gives the
/// document id and source and names errors. This is the entry point for fuzz
/// targets and for callers that have the bytes already.
pub fn load_bytes(
    path: &Path,
    format: Format,
    bytes: &[u8],
    options: &LoadOptions,
) -> Result<Vec<Document>, TextError> {
    let id = path_id(path)?;
    if format == Format::Jsonl {
        return jsonl::parse(bytes, path, id, options.max_file_bytes);
    }
    check_size(path, bytes.len() as u64, options.max_file_bytes)?;
    build_documents(path, id, format, bytes, options)
}

fn check_size(path: &Path, size: u64, limit: u64) -> Result<(), TextError> {
    if size > limit {
        return Err(TextError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit,
        });
    }
    Ok(())
}

/// A single-document file's document (none if it has no text).
fn build_documents(
    path: &Path,
    id: String,
    format: Format,
    bytes: &[u8],
    options: &LoadOptions,
) -> Result<Vec<Document>, TextError> {
    let extracted = match format {
        Format::Text => Extracted {
            title: None,
            text: normalize_text(&decode_text(path, bytes, options.lossy_utf8)?),
        },
        Format::Markdown => markdown::extract(&decode_text(path, bytes, options.lossy_utf8)?),
        Format::Html => {
            let decoded = match decode_text(path, bytes, options.lossy_utf8) {
                Err(TextError::InvalidUtf8 { .. }) if html::declares_windows_1252(bytes) => {
                    decode_windows_1252(bytes)
                }
                other => other?,
            };
            html::extract(&decoded)
        }
        Format::Pdf => pdf::extract(path, bytes)?,
        Format::Jsonl => return jsonl::parse(bytes, path, id, options.max_file_bytes),
    };
    if extracted.text.is_empty() {
        return Ok(Vec::new());
    }
    let mut metadata = Map::new();
    metadata.insert("format".into(), Value::String(format.name().into()));
    Ok(vec![Document::new(
        id.clone(),
        id,
        extracted.title,
        extracted.text,
        metadata,
    )])
}

/// A file's document id: its path as given, `/`-separated.
fn path_id(path: &Path) -> Result<String, TextError> {
    let id = path.to_str().ok_or_else(|| TextError::NonUtf8Path {
        path: path.to_path_buf(),
    })?;
    if cfg!(windows) {
        Ok(id.replace('\\', "/"))
    } else {
        Ok(id.to_owned())
    }
}

/// Loads files and directories with default options.
pub fn load_paths(paths: &[PathBuf]) -> LoadReport {
    load_paths_with(paths, &LoadOptions::default())
}

/// Loads files and directories (recursively), going on past bad files.
pub fn load_paths_with(paths: &[PathBuf], options: &LoadOptions) -> LoadReport {
    let discovery = discover(paths, options);
    let mut report = LoadReport {
        failures: discovery.failures,
        skipped: discovery.skipped,
        ..LoadReport::default()
    };
    // id -> source of the first document with it.
    let mut first_source: HashMap<String, String> = HashMap::new();
    let mut loaded: HashSet<PathBuf> = HashSet::new();
    for path in discovery.files {
        if !loaded.insert(path.clone()) {
            continue; // The same path given twice.
        }
        report.files_seen += 1;
        match load_file_with(&path, options) {
            Ok(documents) if documents.is_empty() => report.skipped.push(Skipped {
                path,
                reason: SkipReason::Empty,
            }),
            Ok(documents) => {
                for document in documents {
                    if let Some(first) = first_source.get(&document.id) {
                        report.failures.push(LoadFailure {
                            path: path.clone(),
                            error: TextError::DuplicateId {
                                path: path.clone(),
                                line: None,
                                id: document.id,
                                first: format!("in {first}"),
                            },
                        });
                        continue;
                    }
                    first_source.insert(document.id.clone(), document.source.clone());
                    report.documents.push(document);
                }
            }
            Err(error) => report.failures.push(LoadFailure { path, error }),
        }
    }
    report
}

/// Lists the files [`load_paths_with`] would load, in its order, without
/// reading them: for progress bars and parallel loading. Named files are
/// listed whatever their extension (an unknown one fails at load time), so
/// that the failure is reported where the file is loaded.
pub fn discover(paths: &[PathBuf], options: &LoadOptions) -> Discovery {
    let mut discovery = Discovery::default();
    let mut visited_dirs: HashSet<PathBuf> = HashSet::new();
    for path in paths {
        match fs::metadata(path) {
            Err(source) => discovery.failures.push(LoadFailure {
                path: path.clone(),
                error: TextError::Io {
                    path: path.clone(),
                    source,
                },
            }),
            Ok(meta) if meta.is_dir() => {
                walk(path, options, &mut visited_dirs, &mut discovery);
            }
            Ok(meta) if meta.is_file() => discovery.files.push(path.clone()),
            Ok(_) => discovery.failures.push(LoadFailure {
                path: path.clone(),
                error: TextError::NotAFile { path: path.clone() },
            }),
        }
    }
    discovery
}

/// Depth-first, entries sorted by name, with an explicit stack (a deep tree
/// must not overflow the call stack) and a set of canonical directory paths
/// (a symlink cycle, or a directory given twice, is walked once).
fn walk(
    root: &Path,
    options: &LoadOptions,
    visited: &mut HashSet<PathBuf>,
    discovery: &mut Discovery,
) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let fail = |discovery: &mut Discovery, source| {
            discovery.failures.push(LoadFailure {
                path: dir.clone(),
                error: TextError::Io {
                    path: dir.clone(),
                    source,
                },
            })
        };
        match fs::canonicalize(&dir) {
            Ok(canonical) => {
                if !visited.insert(canonical) {
                    continue;
                }
            }
            Err(source) => {
                fail(discovery, source);
                continue;
            }
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(source) => {
                fail(discovery, source);
                continue;
            }
        };
        let mut entries: Vec<fs::DirEntry> = entries
            .filter_map(|entry| match entry {
                Ok(entry) => Some(entry),
                Err(source) => {
                    fail(discovery, source);
                    None
                }
            })
            .collect();
        entries.sort_by_key(|entry| entry.file_name());

        let mut subdirectories = Vec::new();
        for entry in entries {
            let name = entry.file_name();
            if !options.include_hidden && name.as_encoded_bytes().first() == Some(&b'.') {
                continue;
            }
            let path = dir.join(&name);
            let file_type = match entry.file_type() {
                Ok(file_type) => file_type,
                Err(source) => {
                    discovery.failures.push(LoadFailure {
                        error: TextError::Io {
                            path: path.clone(),
                            source,
                        },
                        path,
                    });
                    continue;
                }
            };
            let (is_dir, is_file) = if file_type.is_symlink() {
                if !options.follow_symlinks {
                    continue;
                }
                match fs::metadata(&path) {
                    Ok(meta) => (meta.is_dir(), meta.is_file()),
                    Err(source) => {
                        // A dangling link: worth telling, it usually is a mistake.
                        discovery.failures.push(LoadFailure {
                            error: TextError::Io {
                                path: path.clone(),
                                source,
                            },
                            path,
                        });
                        continue;
                    }
                }
            } else {
                (file_type.is_dir(), file_type.is_file())
            };
            if is_dir {
                subdirectories.push(path);
            } else if !is_file {
                discovery.skipped.push(Skipped {
                    path,
                    reason: SkipReason::NotARegularFile,
                });
            } else if Format::from_path(&path).is_some() {
                discovery.files.push(path);
            } else {
                discovery.skipped.push(Skipped {
                    path,
                    reason: SkipReason::UnsupportedExtension,
                });
            }
        }
        // Files of a directory come before its subdirectories' files; those
        // are walked in name order (the stack pops the last pushed first).
        stack.extend(subdirectories.into_iter().rev());
    }
}
