//! Property-style tests of the chunker over many generated texts, with token
//! counters of different shapes (exactly additive, over-counting like a
//! tokenizer that adds special tokens, under-counting so that the whole is
//! more than the sum of its parts, and per-character).

mod common;

use common::{check_chunks, Rng};
use zrag_text::{Chunker, ChunkerConfig, Document, TokenCounter, WhitespaceCounter};

const WORDS: &[&str] = &[
    "the",
    "retrieval",
    "of",
    "documents",
    "is",
    "a",
    "dense",
    "vector",
    "search",
    "over",
    "passages",
    "and",
    "model",
    "generator",
    "café",
    "naïve",
    "日本語",
    "😀",
    "e.g.",
    "Mr.",
    "3.14",
    "U.S.",
    "No.",
    "x",
    "encoder",
    "tokens",
    "(aside)",
    "\"quoted\"",
    "well-known",
];

/// Words that never make a period ambiguous (no abbreviations, no single
/// letters, which read as initials).
const PLAIN_WORDS: &[&str] = &[
    "the",
    "retrieval",
    "of",
    "documents",
    "is",
    "dense",
    "vector",
    "search",
    "over",
    "passages",
    "and",
    "model",
    "café",
    "日本語",
    "😀",
    "3.14",
    "(aside)",
    "\"quoted\"",
];

fn sentence(rng: &mut Rng, max_words: usize) -> String {
    sentence_from(rng, WORDS, max_words)
}

fn plain_sentence(rng: &mut Rng, max_words: usize) -> String {
    sentence_from(rng, PLAIN_WORDS, max_words)
}

fn sentence_from(rng: &mut Rng, vocabulary: &[&str], max_words: usize) -> String {
    let count = 1 + rng.below(max_words);
    let mut words: Vec<String> = (0..count)
        .map(|_| rng.pick(vocabulary).to_string())
        .collect();
    words[0] = capitalised(&words[0]);
    let end = *rng.pick(&[".", ".", ".", "!", "?"]);
    format!("{}{end}", words.join(" "))
}

fn capitalised(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A document with the structures the chunker must handle.
fn document_text(rng: &mut Rng) -> String {
    let mut blocks = Vec::new();
    for _ in 0..1 + rng.below(12) {
        let block = match rng.below(20) {
            0 => format!("{} {}", "#".repeat(1 + rng.below(3)), sentence(rng, 5)),
            1 => (0..1 + rng.below(6))
                .map(|_| format!("- {}", sentence(rng, 8)))
                .collect::<Vec<_>>()
                .join("\n"),
            2 => (0..50 + rng.below(300))
                .map(|_| *rng.pick(WORDS))
                .collect::<Vec<_>>()
                .join(if rng.chance(50) { " " } else { "\n" }),
            3 => {
                let unit = *rng.pick(&["a", "é", "語", "😀"]);
                unit.repeat(50 + rng.below(600))
            }
            _ => {
                let separator = if rng.chance(20) { "\n" } else { " " };
                (0..1 + rng.below(8))
                    .map(|_| sentence(rng, 25))
                    .collect::<Vec<_>>()
                    .join(separator)
            }
        };
        blocks.push(block);
    }
    let indent = if rng.chance(10) { "  \n" } else { "" };
    format!("{indent}{}", blocks.join("\n\n"))
}

struct Counters {
    whitespace: WhitespaceCounter,
    word_pieces: fn(&str) -> usize,
    with_specials: fn(&str) -> usize,
    superadditive: fn(&str) -> usize,
    chars: fn(&str) -> usize,
}

/// Word pieces of four characters: additive over whitespace.
fn word_pieces(text: &str) -> usize {
    text.split_whitespace()
        .map(|w| w.chars().count().div_ceil(4))
        .sum()
}

/// Two special tokens per call, like a tokenizer left with [CLS] and [SEP].
fn with_specials(text: &str) -> usize {
    text.split_whitespace().count() + 2
}

/// One extra token per sentence boundary inside the text: the whole counts
/// more than its pieces, so the chunker's final check must catch it.
fn superadditive(text: &str) -> usize {
    text.split_whitespace().count() + text.matches(". ").count()
}

fn chars(text: &str) -> usize {
    text.chars().filter(|c| !c.is_whitespace()).count()
}

const COUNTERS: Counters = Counters {
    whitespace: WhitespaceCounter,
    word_pieces,
    with_specials,
    superadditive,
    chars,
};

#[test]
fn invariants_hold_for_generated_documents() {
    let mut rng = Rng::new(2024);
    let configs = [(8, 0), (8, 3), (20, 5), (64, 16), (200, 32), (1, 0), (3, 1)];
    let counters: [(&dyn TokenCounter, bool); 5] = [
        (&COUNTERS.whitespace, true),
        (&COUNTERS.word_pieces, false),
        (&COUNTERS.with_specials, false),
        (&COUNTERS.superadditive, false),
        (&COUNTERS.chars, false),
    ];
    let mut total_chunks = 0;
    for round in 0..400 {
        let text = document_text(&mut rng);
        let (max_tokens, overlap_tokens) = configs[round % configs.len()];
        let (counter, exact) = counters[(round / configs.len()) % counters.len()];
        let config = ChunkerConfig {
            max_tokens,
            overlap_tokens,
        };
        let chunker = Chunker::new(counter, config);
        let doc_id = format!("doc-{round}");
        let chunks = chunker.chunk_text(&doc_id, &text);
        check_chunks(
            &text,
            &doc_id,
            &chunks,
            counter,
            max_tokens,
            chunker.config().overlap_tokens,
            exact,
        );
        // Deterministic: the same text gives the same chunks.
        assert_eq!(chunks, chunker.chunk_text(&doc_id, &text));
        total_chunks += chunks.len();
    }
    assert!(
        total_chunks > 2000,
        "too few chunks to mean much: {total_chunks}"
    );
}

#[test]
fn cuts_land_on_sentence_ends_when_sentences_fit() {
    let mut rng = Rng::new(99);
    let counter = WhitespaceCounter;
    for round in 0..300 {
        let max_tokens = 10 + rng.below(60);
        let overlap_tokens = rng.below(max_tokens / 2 + 1);
        // Sentences of at most half a chunk, in paragraphs.
        let text = (0..1 + rng.below(6))
            .map(|_| {
                (0..1 + rng.below(10))
                    .map(|_| plain_sentence(&mut rng, max_tokens / 2))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("\n\n");
        let config = ChunkerConfig {
            max_tokens,
            overlap_tokens,
        };
        let chunks = Chunker::new(&counter, config).chunk_text("d", &text);
        check_chunks(
            &text,
            "d",
            &chunks,
            &counter,
            max_tokens,
            overlap_tokens.min(max_tokens / 2),
            true,
        );
        for (i, chunk) in chunks.iter().enumerate() {
            if i + 1 < chunks.len() {
                assert!(
                    chunk.text.ends_with(['.', '!', '?']),
                    "round {round}: chunk {i} does not end a sentence: {:?}",
                    chunk.text
                );
                // Never less than half full: no needlessly small chunks.
                assert!(
                    counter.count_tokens(&chunk.text) * 2 >= max_tokens,
                    "round {round}: chunk {i} too small: {:?}",
                    chunk.text
                );
            }
            if i > 0 && overlap_tokens == 0 {
                assert!(
                    text[..chunk.start_byte]
                        .trim_end()
                        .ends_with(['.', '!', '?']),
                    "round {round}: chunk {i} does not start a sentence"
                );
            }
        }
    }
}

#[test]
fn real_sentence_overlap() {
    let text = "First sentence is here. Second one follows it. Third comes now. \
                Fourth is longer than the others by far. Fifth ends it.";
    let counter = WhitespaceCounter;
    let chunks = Chunker::new(
        &counter,
        ChunkerConfig {
            max_tokens: 12,
            overlap_tokens: 5,
        },
    )
    .chunk_text("d", text);
    let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "First sentence is here. Second one follows it. Third comes now.",
            "Third comes now. Fourth is longer than the others by far.",
            // The last sentence is over the overlap budget: its last words.
            "than the others by far. Fifth ends it.",
        ]
    );
}

#[test]
fn chunking_a_loaded_document() {
    let doc = Document::new(
        "a.md",
        "a.md",
        Some("T".into()),
        "# T\n\nBody text. More body.".into(),
        Default::default(),
    );
    let counter = WhitespaceCounter;
    let chunks = Chunker::new(&counter, ChunkerConfig::default()).chunk(&doc);
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].id, "a.md#0");
    assert_eq!(chunks[0].text, doc.text);
}

#[test]
fn default_config() {
    assert_eq!(
        ChunkerConfig::default(),
        ChunkerConfig {
            max_tokens: 200,
            overlap_tokens: 32
        }
    );
}

#[test]
fn counts_stay_near_linear() {
    // Counting is per piece plus one check per chunk: the counter sees about
    // (1 + overlap share) times the text, not a count per added word.
    use std::sync::atomic::{AtomicUsize, Ordering};
    static BYTES_COUNTED: AtomicUsize = AtomicUsize::new(0);
    let counter = |text: &str| {
        BYTES_COUNTED.fetch_add(text.len(), Ordering::Relaxed);
        text.split_whitespace().count()
    };
    let mut rng = Rng::new(5);
    let text = (0..3000)
        .map(|_| sentence(&mut rng, 20))
        .collect::<Vec<_>>()
        .join(" ");
    let chunks = Chunker::new(&counter, ChunkerConfig::default()).chunk_text("d", &text);
    assert!(chunks.len() > 100);
    let counted = BYTES_COUNTED.load(Ordering::Relaxed);
    assert!(
        counted < 3 * text.len(),
        "counted {counted} bytes for a {}-byte text",
        text.len()
    );
}

/// Another crate (zrag-models) implements the trait for its own tokenizer
/// type; this is that situation, next to the blanket impl for closures.
#[test]
fn external_counter_types_implement_the_trait() {
    struct CharsPerFour;
    impl TokenCounter for CharsPerFour {
        fn count_tokens(&self, text: &str) -> usize {
            text.len().div_ceil(4)
        }
    }
    let counter = CharsPerFour;
    let chunker = Chunker::new(&counter, ChunkerConfig::default());
    assert_eq!(chunker.chunk_text("d", "short text").len(), 1);
}
