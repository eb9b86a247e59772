//! JSONL corpora in BEIR's format: one JSON object per line,
//! `{"_id": ..., "title": ..., "text": ..., <other fields>}`.
//!
//! - `_id` is required; a string, or a number (some BEIR sets write numeric
//!   ids), which is stringified as JSON writes it (`17`, not `17.0`);
//! - `title` may be missing, null or empty (then the document has none);
//! - `text` is required (null counts as empty text);
//! - every other field goes to the document's metadata, unchanged;
//! - blank lines are skipped; a UTF-8 byte-order mark on the first line and a
//!   `\r` before each `\n` are tolerated.
//!
//! A malformed line (bad JSON, not an object, a missing or invalid field, a
//! duplicate `_id`, invalid UTF-8, a NUL byte, a line over the size limit) is
//! an error naming the file and the line, and [`load_file`](crate::load_file)
//! fails the whole file on it: qrels refer to documents by id, and a corpus
//! loaded with holes would score the retriever against documents it never
//! saw. [`JsonlReader`] streams documents for corpora too large to hold in
//! memory and yields the same errors in order.

use crate::document::Document;
use crate::formats::encoding::invalid_utf8;
use crate::normalize::{normalize_text, normalize_title};
use crate::TextError;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::{BufRead, ErrorKind};
use std::path::{Path, PathBuf};

/// Streams the documents of a JSONL corpus, one per non-blank line. After the
/// first error it yields nothing more.
pub struct JsonlReader<R> {
    reader: R,
    path: PathBuf,
    source: String,
    max_line_bytes: u64,
    line_number: usize,
    offset: u64,
    first_line_of_id: HashMap<String, usize>,
    buffer: Vec<u8>,
    finished: bool,
}

impl<R: BufRead> JsonlReader<R> {
    /// `path` names the file in errors; `source` is what documents record as
    /// their source (the path as a string); a line longer than
    /// `max_line_bytes` is an error.
    pub fn new(reader: R, path: &Path, source: String, max_line_bytes: u64) -> Self {
        JsonlReader {
            reader,
            path: path.to_path_buf(),
            source,
            max_line_bytes,
            line_number: 0,
            offset: 0,
            first_line_of_id: HashMap::new(),
            buffer: Vec::new(),
            finished: false,
        }
    }

    fn error(&self, message: impl Into<String>) -> TextError {
        TextError::Jsonl {
            path: self.path.clone(),
            line: self.line_number,
            message: message.into(),
        }
    }

    /// Reads the next line into `self.buffer` (without its `\n`); false at
    /// the end of the input. The read stops at the limit, so one absurd line
    /// cannot exhaust memory.
    fn read_line(&mut self) -> Result<bool, TextError> {
        self.buffer.clear();
        let mut read_any = false;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(available) => available,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(TextError::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
            };
            if available.is_empty() {
                return Ok(read_any);
            }
            read_any = true;
            let (take, done) = match available.iter().position(|&b| b == b'\n') {
                Some(newline) => (newline + 1, true),
                None => (available.len(), false),
            };
            let content = if done { take - 1 } else { take };
            self.buffer.extend_from_slice(&available[..content]);
            self.reader.consume(take);
            if self.buffer.len() as u64 > self.max_line_bytes {
                return Err(TextError::Jsonl {
                    path: self.path.clone(),
                    // The line being read has not been counted yet.
                    line: self.line_number + 1,
                    message: format!(
                        "line longer than the limit of {} bytes",
                        self.max_line_bytes
                    ),
                });
            }
            if done {
                return Ok(true);
            }
        }
    }

    fn next_document(&mut self) -> Result<Option<Document>, TextError> {
        loop {
            let line_offset = self.offset;
            if !self.read_line()? {
                return Ok(None);
            }
            self.line_number += 1;
            self.offset += self.buffer.len() as u64 + 1;
            // Taken out of `self` for the borrow checker; put back below so
            // that its capacity is reused for the next line.
            let buffer = std::mem::take(&mut self.buffer);
            let result = self.parse_line(&buffer, line_offset);
            self.buffer = buffer;
            match result? {
                Some(document) => return Ok(Some(document)),
                None => continue,
            }
        }
    }

    /// One line (without its `\n`): a document, or `None` for a blank line.
    fn parse_line(&mut self, line: &[u8], line_offset: u64) -> Result<Option<Document>, TextError> {
        {
            let mut line = line;
            let mut skipped = 0u64;
            if self.line_number == 1 {
                if let Some(rest) = line.strip_prefix(&[0xEF, 0xBB, 0xBF]) {
                    line = rest;
                    skipped = 3;
                }
            }
            if let Some(rest) = line.strip_suffix(b"\r") {
                line = rest;
            }
            if let Some(nul) = line.iter().position(|&b| b == 0) {
                return Err(TextError::Binary {
                    path: self.path.clone(),
                    offset: line_offset + skipped + nul as u64,
                });
            }
            let text = match std::str::from_utf8(line) {
                Ok(text) => text,
                Err(err) => {
                    let mut error = invalid_utf8(&self.path, line, err.valid_up_to(), 0);
                    if let TextError::InvalidUtf8 { line, offset, .. } = &mut error {
                        *line = self.line_number;
                        *offset += line_offset + skipped;
                    }
                    return Err(error);
                }
            };
            if text.trim().is_empty() {
                return Ok(None);
            }
            self.parse_record(text).map(Some)
        }
    }

    fn parse_record(&mut self, line: &str) -> Result<Document, TextError> {
        let value: Value =
            serde_json::from_str(line).map_err(|e| self.error(format!("malformed JSON: {e}")))?;
        let Value::Object(mut record) = value else {
            return Err(self.error("expected a JSON object"));
        };
        let id = match record.remove("_id") {
            Some(Value::String(id)) if !id.is_empty() => id,
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(_)) => return Err(self.error("\"_id\" is empty")),
            Some(_) => return Err(self.error("\"_id\" must be a string or a number")),
            None => return Err(self.error("missing \"_id\"")),
        };
        let title = match record.remove("title") {
            None => None,
            Some(value) => self.string_field("title", value)?,
        };
        let text = match record.remove("text") {
            None => return Err(self.error("missing \"text\"")),
            Some(value) => self.string_field("text", value)?.unwrap_or_default(),
        };
        if let Some(&first) = self.first_line_of_id.get(&id) {
            return Err(TextError::DuplicateId {
                path: self.path.clone(),
                line: Some(self.line_number),
                id,
                first: format!("on line {first}"),
            });
        }
        self.first_line_of_id.insert(id.clone(), self.line_number);
        let metadata: Map<String, Value> = record;
        Ok(Document::new(
            id,
            self.source.clone(),
            title.as_deref().and_then(normalize_title),
            normalize_text(&text),
            metadata,
        ))
    }

    /// A text field: a string, or a scalar written as JSON; null is absent.
    fn string_field(&self, name: &str, value: Value) -> Result<Option<String>, TextError> {
        match value {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s)),
            Value::Number(n) => Ok(Some(n.to_string())),
            Value::Bool(b) => Ok(Some(b.to_string())),
            Value::Array(_) | Value::Object(_) => {
                Err(self.error(format!("\"{name}\" must be a string")))
            }
        }
    }
}

impl<R: BufRead> Iterator for JsonlReader<R> {
    type Item = Result<Document, TextError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        match self.next_document() {
            Ok(Some(document)) => Some(Ok(document)),
            Ok(None) => {
                self.finished = true;
                None
            }
            Err(error) => {
                self.finished = true;
                Some(Err(error))
            }
        }
    }
}

/// Reads a whole corpus; the first bad line fails it (see the module docs).
pub fn parse<R: BufRead>(
    reader: R,
    path: &Path,
    source: String,
    max_line_bytes: u64,
) -> Result<Vec<Document>, TextError> {
    JsonlReader::new(reader, path, source, max_line_bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(input: &str) -> Result<Vec<Document>, TextError> {
        parse(
            input.as_bytes(),
            Path::new("c.jsonl"),
            "c.jsonl".into(),
            1 << 20,
        )
    }

    #[test]
    fn beir_lines() {
        let docs = load(
            "\u{FEFF}{\"_id\": \"d1\", \"title\": \"T\", \"text\": \"Body\\r\\ntext\", \"url\": \"u\"}\r\n\
             \n   \n\
             {\"_id\": 42, \"text\": \"no title\"}\n\
             {\"_id\": \"d3\", \"title\": \"\", \"text\": null, \"n\": [1]}",
        )
        .unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0].id, "d1");
        assert_eq!(docs[0].source, "c.jsonl");
        assert_eq!(docs[0].title.as_deref(), Some("T"));
        assert_eq!(docs[0].text, "Body\ntext");
        assert_eq!(
            docs[0].metadata.get("url"),
            Some(&Value::String("u".into()))
        );
        assert_eq!(docs[1].id, "42");
        assert_eq!(docs[1].title, None);
        assert_eq!(docs[2].title, None);
        assert_eq!(docs[2].text, "");
        assert_eq!(docs[2].metadata.len(), 1);
    }

    #[test]
    fn bad_lines_name_the_line() {
        let cases = [
            (
                "{\"_id\":\"a\",\"text\":\"x\"}\n{oops}\n",
                2,
                "malformed JSON",
            ),
            ("\n\n[1,2]\n", 3, "expected a JSON object"),
            ("{\"text\":\"x\"}", 1, "missing \"_id\""),
            ("{\"_id\":\"a\"}", 1, "missing \"text\""),
            ("{\"_id\":true,\"text\":\"x\"}", 1, "\"_id\" must be"),
            ("{\"_id\":\"\",\"text\":\"x\"}", 1, "\"_id\" is empty"),
            (
                "{\"_id\":\"a\",\"text\":{}}",
                1,
                "\"text\" must be a string",
            ),
        ];
        for (input, line, message) in cases {
            let err = load(input).unwrap_err();
            assert_eq!(err.line(), Some(line), "{input:?}: {err}");
            assert!(err.to_string().contains(message), "{input:?}: {err}");
            assert!(
                err.to_string().starts_with(&format!("c.jsonl:{line}:")),
                "{err}"
            );
        }
    }

    #[test]
    fn duplicate_ids_fail() {
        let err = load("{\"_id\":1,\"text\":\"a\"}\n{\"_id\":\"1\",\"text\":\"b\"}\n").unwrap_err();
        assert!(
            matches!(err, TextError::DuplicateId { line: Some(2), .. }),
            "{err}"
        );
        assert!(err.to_string().contains("first seen on line 1"), "{err}");
    }

    #[test]
    fn encoding_errors_have_offsets() {
        let input = b"{\"_id\":\"a\",\"text\":\"x\"}\n{\"_id\":\"b\",\"text\":\"\xFF\"}\n";
        let err = parse(&input[..], Path::new("c.jsonl"), "c.jsonl".into(), 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                TextError::InvalidUtf8 {
                    line: 2,
                    offset: 42,
                    ..
                }
            ),
            "{err:?}"
        );
        let input = b"{\"_id\":\"a\",\"text\":\"x\0\"}";
        let err = parse(&input[..], Path::new("c.jsonl"), "c.jsonl".into(), 1 << 20).unwrap_err();
        assert!(
            matches!(err, TextError::Binary { offset: 20, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn line_limit() {
        let input = format!("{{\"_id\":\"a\",\"text\":\"{}\"}}\n", "x".repeat(100));
        let err = parse(input.as_bytes(), Path::new("c.jsonl"), "c.jsonl".into(), 50).unwrap_err();
        assert!(
            err.to_string()
                .contains("longer than the limit of 50 bytes"),
            "{err}"
        );
    }

    #[test]
    fn streaming_stops_after_an_error() {
        let input = "{\"_id\":\"a\",\"text\":\"x\"}\nbad\n{\"_id\":\"c\",\"text\":\"y\"}\n";
        let items: Vec<_> = JsonlReader::new(
            input.as_bytes(),
            Path::new("c.jsonl"),
            "c.jsonl".into(),
            1 << 20,
        )
        .collect();
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        assert!(items[1].is_err());
    }
}
