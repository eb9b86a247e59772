//! The token-aware chunker on arbitrary text, configurations and token counters, asserting
//! the guarantees `Chunker::chunk_text` documents (the same checks as
//! crates/zrag-text/tests/common/mod.rs `check_chunks`):
//! - the chunks cover the text: the first starts at its first visible byte, the last ends at
//!   its last, and only whitespace lies between two chunks that do not overlap;
//! - every chunk is `text[start_byte..end_byte]` on `char` boundaries, non-empty, trimmed;
//! - no chunk counts more than `max_tokens` (unless it is a single character);
//! - chunks start and end strictly later than their predecessor; an overlap is a suffix of
//!   the previous chunk starting at a word or sentence start, within the overlap budget when
//!   the counter is additive over whitespace-separated pieces;
//! - ids and ordinals run `doc#0, doc#1, ...`; the result is deterministic.
//!
//! Input layout: byte 0 picks the counter, byte 1 is `max_tokens` (0 means the minimum, 1),
//! byte 2 the requested overlap; the rest is the text (invalid UTF-8 replaced by U+FFFD).

#![no_main]

use libfuzzer_sys::fuzz_target;
use zrag_text::{Chunk, Chunker, ChunkerConfig, TokenCounter, WhitespaceCounter};

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

/// The whole counts more than its pieces: the chunker's final count must catch it.
fn superadditive(text: &str) -> usize {
    text.split_whitespace().count() + text.matches(". ").count()
}

fn chars(text: &str) -> usize {
    text.chars().filter(|c| !c.is_whitespace()).count()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (counter_choice, max_tokens, overlap_tokens) =
        (data[0], usize::from(data[1]), usize::from(data[2]));
    let text = String::from_utf8_lossy(&data[3..]);
    let counters: [(&dyn TokenCounter, bool); 5] = [
        (&WhitespaceCounter, true),
        (&word_pieces, false),
        (&with_specials, false),
        (&superadditive, false),
        (&chars, false),
    ];
    let (counter, exact) = counters[usize::from(counter_choice) % counters.len()];
    let chunker = Chunker::new(
        counter,
        ChunkerConfig {
            max_tokens,
            overlap_tokens,
        },
    );
    let config = chunker.config();
    assert_eq!(config.max_tokens, max_tokens.max(1));
    assert!(config.overlap_tokens <= config.max_tokens / 2);
    let chunks = chunker.chunk_text("doc", &text);
    check_chunks(&text, &chunks, counter, config, exact);
    assert_eq!(
        chunks,
        chunker.chunk_text("doc", &text),
        "not deterministic"
    );
});

fn is_terminal(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…' | '。' | '！' | '？')
}

fn is_closer(c: char) -> bool {
    "\"')]}»”’」』）*_".contains(c)
}

fn check_chunks(
    text: &str,
    chunks: &[Chunk],
    counter: &dyn TokenCounter,
    config: ChunkerConfig,
    exact: bool,
) {
    let context = |i: usize| format!("chunk {i} of {text:?}: {:?}", chunks.get(i));
    if text.trim().is_empty() {
        assert!(chunks.is_empty(), "blank text gave chunks: {chunks:?}");
        return;
    }
    assert!(!chunks.is_empty(), "no chunks for {text:?}");
    let first_visible = text.len() - text.trim_start().len();
    assert_eq!(chunks[0].start_byte, first_visible, "{}", context(0));
    let last = chunks.len() - 1;
    assert_eq!(
        chunks[last].end_byte,
        text.trim_end().len(),
        "{}",
        context(last)
    );
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk.ordinal as usize, i);
        assert_eq!(chunk.id, format!("doc#{i}"));
        assert_eq!(chunk.doc_id, "doc");
        assert!(chunk.start_byte < chunk.end_byte, "{}", context(i));
        assert!(chunk.end_byte <= text.len(), "{}", context(i));
        assert!(
            text.is_char_boundary(chunk.start_byte) && text.is_char_boundary(chunk.end_byte),
            "{}",
            context(i)
        );
        assert_eq!(chunk.text, &text[chunk.start_byte..chunk.end_byte]);
        assert_eq!(chunk.text.trim(), chunk.text, "{}", context(i));
        let tokens = counter.count_tokens(&chunk.text);
        assert!(
            tokens <= config.max_tokens || chunk.text.chars().count() == 1,
            "{} has {tokens} tokens > {}",
            context(i),
            config.max_tokens
        );
        if i == 0 {
            continue;
        }
        let previous = &chunks[i - 1];
        assert!(chunk.start_byte > previous.start_byte, "{}", context(i));
        assert!(chunk.end_byte > previous.end_byte, "{}", context(i));
        if chunk.start_byte >= previous.end_byte {
            assert!(
                text[previous.end_byte..chunk.start_byte].trim().is_empty(),
                "gap before {}",
                context(i)
            );
        } else {
            let shared = &text[chunk.start_byte..previous.end_byte];
            assert!(previous.text.ends_with(shared));
            assert!(chunk.text.starts_with(shared));
            // A CJK sentence follows its full stop without a space. As in
            // crates/zrag-text/src/segment.rs, the stop is the first terminal of the run of
            // terminals and closing brackets or quotes before the sentence ("」。", "！?").
            let before = &text[..chunk.start_byte];
            let run: Vec<char> = before
                .chars()
                .rev()
                .take_while(|&c| is_terminal(c) || is_closer(c))
                .collect();
            let stop = run.iter().rev().find(|&&c| is_terminal(c));
            assert!(
                before.ends_with(char::is_whitespace) || matches!(stop, Some('。' | '！' | '？')),
                "overlap not at a word or sentence start: {}",
                context(i)
            );
            if exact {
                assert!(
                    counter.count_tokens(shared) <= config.overlap_tokens,
                    "overlap {shared:?} over {} tokens",
                    config.overlap_tokens
                );
            }
        }
    }
}
