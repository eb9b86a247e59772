//! The [`Document`] every loader produces, the [`Format`]s zrag reads, and the
//! content hash that lets the indexer skip unchanged documents.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::path::Path;

/// One document: a file, or one line of a JSONL corpus.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Document {
    /// The id qrels and search results use: a JSONL line's `_id`, or a file's
    /// path as given (joined under the directory given, `/`-separated, not
    /// canonicalised).
    pub id: String,
    /// The file the document came from (for a JSONL line, the JSONL file).
    pub source: String,
    /// The title, when the format has one (Markdown `# ` heading, HTML
    /// `<title>`, PDF Info title, JSONL `title`); never an empty string.
    pub title: Option<String>,
    /// The normalised text (see [`normalize_text`](crate::normalize_text)).
    pub text: String,
    /// JSONL: every field other than `_id`, `title` and `text`.
    /// Files: `{"format": "txt" | "md" | "html" | "pdf"}`.
    pub metadata: Map<String, Value>,
    /// Hex SHA-256 over a canonical encoding of (title, text, metadata); see
    /// [`content_hash`].
    pub content_hash: String,
}

impl Document {
    /// Builds a document and computes its content hash.
    pub fn new(
        id: impl Into<String>,
        source: impl Into<String>,
        title: Option<String>,
        text: String,
        metadata: Map<String, Value>,
    ) -> Document {
        let content_hash = content_hash(title.as_deref(), &text, &metadata);
        Document {
            id: id.into(),
            source: source.into(),
            title,
            text,
            metadata,
            content_hash,
        }
    }

    /// Recomputes the hash from the current fields (for callers that edit a
    /// document, and to check one read back from disk).
    pub fn compute_content_hash(&self) -> String {
        content_hash(self.title.as_deref(), &self.text, &self.metadata)
    }
}

/// Version tag of the hash encoding: bump it if the encoding ever changes, so
/// that old and new hashes can never be equal by accident.
const HASH_DOMAIN: &[u8] = b"zrag-text/document/v1\n";

/// Hex SHA-256 of a document's content, stable across runs, platforms and
/// serde_json feature flags.
///
/// The encoding: a version tag; the title as a presence byte (0 / 1) followed
/// by its length-prefixed UTF-8; the text length-prefixed; the metadata as
/// canonical JSON (object keys sorted by bytes at every depth, no whitespace,
/// serde_json's escaping and number formatting), length-prefixed. Lengths are
/// u64 big-endian, so no two different triples encode to the same bytes.
/// Keys are sorted here rather than trusted to `Map`'s order because another
/// crate in the build may turn on serde_json's `preserve_order` feature.
pub fn content_hash(title: Option<&str>, text: &str, metadata: &Map<String, Value>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(HASH_DOMAIN);
    match title {
        None => hasher.update([0u8]),
        Some(title) => {
            hasher.update([1u8]);
            update_with_length(&mut hasher, title.as_bytes());
        }
    }
    update_with_length(&mut hasher, text.as_bytes());
    let mut json = String::new();
    write_canonical_json(&Value::Object(metadata.clone()), &mut json);
    update_with_length(&mut hasher, json.as_bytes());
    hex(&hasher.finalize())
}

fn update_with_length(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// JSON with object keys sorted at every depth and no insignificant whitespace.
fn write_canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {
            // Scalars: serde_json's own formatting is deterministic (ryu for floats).
            out.push_str(&value.to_string());
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical_json(item, out);
            }
            out.push('}');
        }
    }
}

/// The file formats zrag reads. Closed on purpose: a new format is a new
/// loader, and every `match` over formats should have to handle it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Text,
    Markdown,
    Html,
    Pdf,
    Jsonl,
}

impl Format {
    /// Every format, in a fixed order.
    pub const ALL: [Format; 5] = [
        Format::Text,
        Format::Markdown,
        Format::Html,
        Format::Pdf,
        Format::Jsonl,
    ];

    /// The format of a path by its extension (ASCII case-insensitive):
    /// `.txt .text .md .markdown .html .htm .pdf .jsonl`.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Format::ALL
            .into_iter()
            .find(|format| format.extensions().contains(&ext.as_str()))
    }

    /// The extensions (lowercase, without the dot) that select this format.
    pub fn extensions(self) -> &'static [&'static str] {
        match self {
            Format::Text => &["txt", "text"],
            Format::Markdown => &["md", "markdown"],
            Format::Html => &["html", "htm"],
            Format::Pdf => &["pdf"],
            Format::Jsonl => &["jsonl"],
        }
    }

    /// The short name stored in a file document's `metadata.format`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "txt",
            Format::Markdown => "md",
            Format::Html => "html",
            Format::Pdf => "pdf",
            Format::Jsonl => "jsonl",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn hash_is_pinned() {
        // A golden value: if this changes, every collection's "unchanged
        // document" check breaks, so it must only change with HASH_DOMAIN.
        let hash = content_hash(Some("T"), "body", &map(json!({"format": "md"})));
        assert_eq!(hash.len(), 64);
        assert_eq!(
            hash,
            content_hash(Some("T"), "body", &map(json!({"format": "md"})))
        );
        assert_eq!(
            hash,
            "2cc3464e9d9f3b3ef65eb57864357bd468eabe4c0bdbeb4899fc7de47e988022"
        );
    }

    #[test]
    fn hash_separates_fields() {
        let empty = Map::new();
        let a = content_hash(Some("ab"), "c", &empty);
        let b = content_hash(Some("a"), "bc", &empty);
        let c = content_hash(None, "abc", &empty);
        let d = content_hash(Some(""), "abc", &empty);
        assert_ne!(a, b);
        assert_ne!(c, d);
        assert_ne!(a, c);
    }

    #[test]
    fn hash_ignores_key_order_but_not_values() {
        let mut one = Map::new();
        one.insert("b".into(), json!(1));
        one.insert("a".into(), json!({"y": [1, 2.5], "x": null}));
        let mut two = Map::new();
        two.insert("a".into(), json!({"x": null, "y": [1, 2.5]}));
        two.insert("b".into(), json!(1));
        assert_eq!(content_hash(None, "t", &one), content_hash(None, "t", &two));
        two.insert("b".into(), json!(2));
        assert_ne!(content_hash(None, "t", &one), content_hash(None, "t", &two));
    }

    #[test]
    fn formats_by_extension() {
        assert_eq!(
            Format::from_path(Path::new("a/b.MD")),
            Some(Format::Markdown)
        );
        assert_eq!(Format::from_path(Path::new("x.htm")), Some(Format::Html));
        assert_eq!(Format::from_path(Path::new("x.text")), Some(Format::Text));
        assert_eq!(Format::from_path(Path::new("c.jsonl")), Some(Format::Jsonl));
        assert_eq!(Format::from_path(Path::new("c.json")), None);
        assert_eq!(Format::from_path(Path::new("Makefile")), None);
        assert_eq!(Format::from_path(Path::new(".md")), None);
    }
}
