//! Helpers shared by the integration tests: fixture paths, a small PRNG (no
//! dependency needed for property-style loops), and chunk invariant checks.

#![allow(dead_code)]

use std::path::PathBuf;
use zrag_text::{Chunk, TokenCounter};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// SplitMix64: tiny, fast, and good enough to generate test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// Checks the chunker's guarantees for `chunks` of `text`.
pub fn check_chunks(
    text: &str,
    doc_id: &str,
    chunks: &[Chunk],
    counter: &dyn TokenCounter,
    max_tokens: usize,
    overlap_tokens: usize,
    exact_sums: bool,
) {
    let context = |i: usize| format!("chunk {i} of {text:?}: {:?}", chunks.get(i));
    if text.trim().is_empty() {
        assert!(chunks.is_empty(), "blank text gave chunks: {chunks:?}");
        return;
    }
    assert!(!chunks.is_empty(), "no chunks for {text:?}");
    let first_visible = text.len() - text.trim_start().len();
    assert_eq!(chunks[0].start_byte, first_visible, "{}", context(0));
    assert_eq!(
        chunks.last().unwrap().end_byte,
        text.trim_end().len(),
        "{}",
        context(chunks.len() - 1)
    );
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk.ordinal as usize, i);
        assert_eq!(chunk.id, format!("{doc_id}#{i}"));
        assert_eq!(chunk.doc_id, doc_id);
        assert!(chunk.start_byte < chunk.end_byte, "{}", context(i));
        assert_eq!(chunk.text, &text[chunk.start_byte..chunk.end_byte]);
        assert_eq!(chunk.text.trim(), chunk.text, "{}", context(i));
        let tokens = counter.count_tokens(&chunk.text);
        assert!(
            tokens <= max_tokens || chunk.text.chars().count() == 1,
            "{} has {tokens} tokens > {max_tokens}",
            context(i)
        );
        if i == 0 {
            continue;
        }
        let previous = &chunks[i - 1];
        assert!(chunk.start_byte > previous.start_byte, "{}", context(i));
        assert!(chunk.end_byte > previous.end_byte, "{}", context(i));
        if chunk.start_byte >= previous.end_byte {
            // No overlap: only whitespace between the two.
            assert!(
                text[previous.end_byte..chunk.start_byte].trim().is_empty(),
                "gap before {}",
                context(i)
            );
        } else {
            // Overlap: a real suffix of the previous chunk and prefix of this
            // one, starting at a word boundary, within the overlap budget.
            let shared = &text[chunk.start_byte..previous.end_byte];
            assert!(previous.text.ends_with(shared));
            assert!(chunk.text.starts_with(shared));
            // (CJK sentences follow their full stop, and any closing
            // brackets or quotes, without a space.)
            let before = &text[..chunk.start_byte];
            let before_closers = before.trim_end_matches(|c: char| "\"')]}»”’」』）*_".contains(c));
            assert!(
                before.ends_with(char::is_whitespace)
                    || before_closers.ends_with(|c: char| "。！？".contains(c)),
                "overlap not at a word or sentence start: {}",
                context(i)
            );
            if exact_sums {
                assert!(
                    counter.count_tokens(shared) <= overlap_tokens,
                    "overlap {shared:?} over {overlap_tokens} tokens"
                );
            }
        }
    }
}
