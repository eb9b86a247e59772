//! The file loaders of zrag-text on arbitrary bytes: txt, md, html, pdf and jsonl through
//! `load_bytes` (the in-memory twin of `load_file`). The first byte picks the format and the
//! lossy-UTF-8 option; the rest is the file.
//!
//! Checks: no panic escapes (the PDF extractor's own panics are caught by zrag and become
//! errors, by design), and every document obeys `Document`'s contract: normalised text
//! (`normalize_text` is idempotent on it), a title that is `None` or normalised and non-empty,
//! a content hash that matches the fields, and no empty document from a single-document file.

#![no_main]

use std::path::Path;
use std::sync::Once;

use libfuzzer_sys::fuzz_target;
use zrag_text::{load_bytes, normalize_text, normalize_title, Format, LoadOptions};

const FORMATS: [(Format, &str); 5] = [
    (Format::Text, "fuzz.txt"),
    (Format::Markdown, "fuzz.md"),
    (Format::Html, "fuzz.html"),
    (Format::Pdf, "fuzz.pdf"),
    (Format::Jsonl, "fuzz.jsonl"),
];

static QUIET: Once = Once::new();

fuzz_target!(|data: &[u8]| {
    // zrag runs pdf-extract under `catch_unwind` (a panic there is an error naming the file),
    // but libfuzzer-sys's panic hook aborts on *every* panic, caught or not. A silent hook
    // keeps caught panics caught; one that escapes zrag still fails the run, because
    // libfuzzer-sys wraps this closure in `catch_unwind` and aborts when it unwinds.
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));

    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let (format, name) = FORMATS[usize::from(selector) % FORMATS.len()];
    let options = LoadOptions {
        lossy_utf8: selector & 0x80 != 0,
        ..LoadOptions::default()
    };
    let Ok(documents) = load_bytes(Path::new(name), format, bytes, &options) else {
        return;
    };
    if format != Format::Jsonl {
        assert!(
            documents.len() <= 1,
            "{} documents from one file",
            documents.len()
        );
    }
    for document in &documents {
        assert_eq!(
            normalize_text(&document.text),
            document.text,
            "text not normalised"
        );
        if format != Format::Jsonl {
            assert!(!document.text.is_empty(), "empty document");
            assert_eq!(document.id, name);
        }
        if let Some(title) = &document.title {
            assert_eq!(
                normalize_title(title).as_deref(),
                Some(title.as_str()),
                "title"
            );
        }
        assert_eq!(document.compute_content_hash(), document.content_hash);
    }
});
