//! The parsers and the chunker on arbitrary input: random bytes and random
//! "markup soup". Nothing may panic, and whatever comes out must still meet
//! the documented guarantees. (Proper fuzz targets come later; this keeps the
//! code honest meanwhile.)

mod common;

use common::{check_chunks, Rng};
use std::path::Path;
use zrag_text::{
    load_bytes, normalize_text, Chunker, ChunkerConfig, Format, LoadOptions, WhitespaceCounter,
};

const FORMATS: [Format; 4] = [Format::Text, Format::Markdown, Format::Html, Format::Jsonl];

/// Fragments that exercise the parsers' special cases.
const SOUP: &[&str] = &[
    "<",
    ">",
    "</",
    "<p>",
    "</p>",
    "<div class=\"",
    "\"",
    "'",
    "=",
    "<script>",
    "</script>",
    "<style>",
    "<!--",
    "-->",
    "<![CDATA[",
    "]]>",
    "<title>",
    "</title>",
    "<head>",
    "<pre>",
    "</pre>",
    "<br/>",
    "<h2>",
    "</h2>",
    "<td>",
    "<svg>",
    "&",
    "&amp;",
    "&#",
    "&#x",
    "&#1234;",
    "&#xFFFFFFFF;",
    "&eacute",
    ";",
    "*",
    "**",
    "_",
    "__",
    "~~",
    "`",
    "```",
    "~~~",
    "[",
    "]",
    "(",
    ")",
    "![",
    "](",
    "#",
    "## ",
    "\n",
    "\n\n",
    "\r\n",
    "\t",
    " ",
    "  ",
    "---",
    "+++",
    "> ",
    "- ",
    "1. ",
    "|",
    "|---|",
    "\\",
    "e.g.",
    "Mr.",
    ". ",
    "! ",
    "? ",
    "3.14",
    "…",
    "。",
    "word",
    "Word",
    "café",
    "日本",
    "😀",
    "\u{0}",
    "\u{7}",
    "\u{FEFF}",
    "\u{2028}",
    "{",
    "}",
    "\"_id\"",
    ":",
    ",",
    "\"text\"",
    "\"title\"",
    "null",
    "123",
    "[1]",
    "title: x",
];

fn soup(rng: &mut Rng, pieces: usize) -> String {
    (0..pieces).map(|_| *rng.pick(SOUP)).collect()
}

fn check_output(path: &Path, format: Format, bytes: &[u8], options: &LoadOptions) {
    let Ok(documents) = load_bytes(path, format, bytes, options) else {
        return;
    };
    let counter = WhitespaceCounter;
    let chunker = Chunker::new(
        &counter,
        ChunkerConfig {
            max_tokens: 7,
            overlap_tokens: 2,
        },
    );
    for document in documents {
        assert_eq!(normalize_text(&document.text), document.text, "{bytes:?}");
        assert_eq!(document.content_hash, document.compute_content_hash());
        if let Some(title) = &document.title {
            assert!(!title.is_empty() && title.trim() == title);
        }
        let chunks = chunker.chunk(&document);
        check_chunks(&document.text, &document.id, &chunks, &counter, 7, 2, true);
    }
}

#[test]
fn random_bytes_through_every_text_loader() {
    let mut rng = Rng::new(1);
    let lossy = LoadOptions {
        lossy_utf8: true,
        ..LoadOptions::default()
    };
    for round in 0..3000 {
        let len = rng.below(400);
        let mut bytes = rng.bytes(len);
        // NUL bytes make nearly every input "binary"; keep some past that check.
        if round % 2 == 0 {
            bytes.retain(|&b| b != 0);
        }
        let format = FORMATS[round % FORMATS.len()];
        let path = Path::new("random.bin");
        check_output(path, format, &bytes, &LoadOptions::default());
        check_output(path, format, &bytes, &lossy);
    }
}

#[test]
fn markup_soup_through_every_text_loader() {
    let mut rng = Rng::new(2);
    for round in 0..4000 {
        let pieces = rng.below(120);
        let text = soup(&mut rng, pieces);
        let format = FORMATS[round % FORMATS.len()];
        check_output(
            Path::new("soup"),
            format,
            text.as_bytes(),
            &LoadOptions::default(),
        );
    }
}

#[test]
fn jsonl_soup_with_valid_records() {
    // Records with random text fields: the parser must accept them all and
    // the chunker must handle whatever text they carry.
    let mut rng = Rng::new(3);
    for _ in 0..500 {
        let lines: Vec<String> = (0..1 + rng.below(5))
            .enumerate()
            .map(|(i, _)| {
                let text = soup(&mut rng, 30);
                serde_json::json!({"_id": format!("id{i}"), "title": soup(&mut rng, 3), "text": text})
                    .to_string()
            })
            .collect();
        let input = lines.join("\n");
        let documents = load_bytes(
            Path::new("c.jsonl"),
            Format::Jsonl,
            input.as_bytes(),
            &LoadOptions::default(),
        )
        .unwrap();
        assert_eq!(documents.len(), lines.len());
        check_output(
            Path::new("c.jsonl"),
            Format::Jsonl,
            input.as_bytes(),
            &LoadOptions::default(),
        );
    }
}

#[test]
fn chunker_on_random_unicode() {
    let mut rng = Rng::new(4);
    let counter = WhitespaceCounter;
    let char_counter = |s: &str| s.chars().count();
    for round in 0..2000 {
        let len = rng.below(300);
        let text: String = (0..len)
            .map(|_| match rng.below(6) {
                0 => ' ',
                1 => '\n',
                2 => *rng.pick(&['.', '!', '?', '#', '-', '\t', '\u{3000}']),
                3 => char::from_u32(0x80 + rng.below(0x700) as u32).unwrap_or('x'),
                4 => char::from_u32(0x1F600 + rng.below(50) as u32).unwrap_or('x'),
                _ => (b'a' + rng.below(26) as u8) as char,
            })
            .collect();
        let max_tokens = 1 + rng.below(12);
        let overlap_tokens = rng.below(max_tokens);
        let config = ChunkerConfig {
            max_tokens,
            overlap_tokens,
        };
        let chunker = Chunker::new(&counter, config);
        let chunks = chunker.chunk_text("r", &text);
        let overlap = chunker.config().overlap_tokens;
        check_chunks(&text, "r", &chunks, &counter, max_tokens, overlap, true);
        if round % 2 == 0 {
            let chunker = Chunker::new(&char_counter, config);
            let chunks = chunker.chunk_text("r", &text);
            check_chunks(
                &text,
                "r",
                &chunks,
                &char_counter,
                max_tokens,
                overlap,
                false,
            );
        }
    }
}
