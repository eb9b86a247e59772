//! Token-aware chunking: a document's text becomes overlapping windows of at
//! most `max_tokens` tokens that end, where possible, at a heading, paragraph
//! or sentence boundary.
//!
//! How it works:
//! 1. The text is cut into sentence-level pieces (see the private `segment`
//!    module), each with the strength of the boundary before it. Each piece's
//!    tokens are counted once. A piece over `max_tokens` is cut into lines, a
//!    line over it into words, and a word over it into the longest prefixes
//!    that fit (on `char` boundaries).
//! 2. Windows are packed greedily from those counts (sums of pieces stand in
//!    for the count of their concatenation). Among the places a window could
//!    end, the strongest boundary wins (heading > paragraph > sentence >
//!    line > word > inside a word), the later one among equals, as long as
//!    the window is at least half full; the rest of the text is taken whole
//!    when it fits.
//! 3. Each window is counted once as a whole; if the sum underestimated it,
//!    pieces are dropped from its end until it fits.
//! 4. The next window starts with an overlap of about `overlap_tokens`: the
//!    whole sentences (failing that, whole words) that end the previous one.
//!
//! The result is deterministic: the same text and counter give the same
//! chunks, so chunk ids (`{doc_id}#{ordinal}`) are stable.

use crate::document::Document;
use crate::segment::{self, Boundary};
use serde::{Deserialize, Serialize};

/// Counts tokens as the embedding model would. Implemented by the BERT
/// tokenizer in zrag-models; [`WhitespaceCounter`] is a stand-in for tests.
/// Implementations should count content tokens only (no `[CLS]`/`[SEP]`):
/// the chunker sums counts of pieces, and per-call special tokens would
/// inflate the sums (safely, but wastefully).
pub trait TokenCounter: Send + Sync {
    fn count_tokens(&self, text: &str) -> usize;
}

/// Counts whitespace-separated words: a model-free token counter for tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct WhitespaceCounter;

impl TokenCounter for WhitespaceCounter {
    fn count_tokens(&self, text: &str) -> usize {
        text.split_whitespace().count()
    }
}

/// Any `Fn(&str) -> usize` is a token counter (handy in tests).
impl<F: Fn(&str) -> usize + Send + Sync> TokenCounter for F {
    fn count_tokens(&self, text: &str) -> usize {
        self(text)
    }
}

/// Chunk size and overlap, in tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerConfig {
    /// Largest chunk (at least 1 is used). Default 200.
    pub max_tokens: usize,
    /// Target overlap between consecutive chunks; capped at half of
    /// `max_tokens` so that every chunk brings mostly new text. Default 32.
    pub overlap_tokens: usize,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        ChunkerConfig {
            max_tokens: 200,
            overlap_tokens: 32,
        }
    }
}

/// A piece of a document's text: `text == doc.text[start_byte..end_byte]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Chunk {
    /// `"{doc_id}#{ordinal}"`.
    pub id: String,
    pub doc_id: String,
    /// Position of the chunk in its document, from 0.
    pub ordinal: u32,
    pub text: String,
    pub start_byte: usize,
    pub end_byte: usize,
}

/// Cuts documents into chunks; see the module documentation.
pub struct Chunker<'a> {
    counter: &'a dyn TokenCounter,
    max_tokens: usize,
    overlap_tokens: usize,
}

/// An atomic piece of text for packing, with its token count.
#[derive(Clone, Copy, Debug)]
struct Unit {
    start: usize,
    end: usize,
    tokens: usize,
    before: Boundary,
}

/// Where a window starts: `start` is a byte offset at or before the first
/// unit not yet in any chunk; the bytes before that unit are overlap, worth
/// `tokens` tokens.
#[derive(Clone, Copy, Debug)]
struct Head {
    start: usize,
    tokens: usize,
}

impl<'a> Chunker<'a> {
    pub fn new(counter: &'a dyn TokenCounter, config: ChunkerConfig) -> Self {
        let max_tokens = config.max_tokens.max(1);
        Chunker {
            counter,
            max_tokens,
            overlap_tokens: config.overlap_tokens.min(max_tokens / 2),
        }
    }

    /// The configuration in force (after the caps described on
    /// [`ChunkerConfig`]).
    pub fn config(&self) -> ChunkerConfig {
        ChunkerConfig {
            max_tokens: self.max_tokens,
            overlap_tokens: self.overlap_tokens,
        }
    }

    /// The chunks of a document's text.
    pub fn chunk(&self, doc: &Document) -> Vec<Chunk> {
        self.chunk_text(&doc.id, &doc.text)
    }

    /// The chunks of any text, with ids derived from `doc_id`.
    ///
    /// Guarantees: no chunk is empty or starts or ends with whitespace; every
    /// chunk counts at most `max_tokens` (the one exception: a single
    /// character that alone counts more); chunks start and end strictly later
    /// than their predecessor; the text between two consecutive chunks, if
    /// any, is whitespace; a text with no visible character gives no chunks.
    pub fn chunk_text(&self, doc_id: &str, text: &str) -> Vec<Chunk> {
        let units = self.units(text);
        if units.is_empty() {
            return Vec::new();
        }
        let max = self.max_tokens;
        let n = units.len();
        let mut prefix = Vec::with_capacity(n + 1);
        prefix.push(0usize);
        for unit in &units {
            prefix.push(prefix[prefix.len() - 1] + unit.tokens);
        }
        let tokens_between = |from: usize, to: usize| prefix[to] - prefix[from];

        let mut chunks = Vec::new();
        let mut next_new = 0usize;
        let mut head = Head {
            start: units[0].start,
            tokens: 0,
        };
        loop {
            let fresh = Head {
                start: units[next_new].start,
                tokens: 0,
            };
            if head.tokens + units[next_new].tokens > max {
                head = fresh;
            }
            // The furthest end that fits; at least one new unit, even a
            // single character that alone is over the limit.
            let mut end = next_new + 1;
            while end < n && head.tokens + tokens_between(next_new, end + 1) <= max {
                end += 1;
            }
            let mut cut = if end == n {
                n
            } else {
                self.best_cut(&units, &prefix, next_new, end, head.tokens)
            };
            // One real count per window; shrink while the sums were optimistic.
            loop {
                let tokens = self
                    .counter
                    .count_tokens(&text[head.start..units[cut - 1].end]);
                if tokens <= max {
                    break;
                }
                if cut > next_new + 1 {
                    cut -= 1;
                } else if head.start != fresh.start {
                    head = fresh;
                } else {
                    break;
                }
            }
            let end_byte = units[cut - 1].end;
            let ordinal = chunks.len() as u32;
            chunks.push(Chunk {
                id: format!("{doc_id}#{ordinal}"),
                doc_id: doc_id.to_owned(),
                ordinal,
                text: text[head.start..end_byte].to_owned(),
                start_byte: head.start,
                end_byte,
            });
            if cut == n {
                break;
            }
            head = self.overlap(text, &units, &prefix, head.start, cut);
            next_new = cut;
        }
        chunks
    }

    /// Where to end a window that starts at `head` + `units[first_new]` and
    /// could reach `units[end - 1]`: the index of the first unit left out.
    fn best_cut(
        &self,
        units: &[Unit],
        prefix: &[usize],
        first_new: usize,
        end: usize,
        head_tokens: usize,
    ) -> usize {
        let mut best: Option<(Boundary, usize)> = None;
        for cut in first_new + 1..=end {
            let fill = head_tokens + prefix[cut] - prefix[first_new];
            if fill * 2 < self.max_tokens {
                continue;
            }
            let boundary = units[cut].before;
            if best.is_none_or(|(b, _)| boundary >= b) {
                best = Some((boundary, cut));
            }
        }
        best.map_or(end, |(_, cut)| cut)
    }

    /// The overlap that starts the window after a chunk that began at
    /// `chunk_start` and ended before `units[cut]`.
    fn overlap(
        &self,
        text: &str,
        units: &[Unit],
        prefix: &[usize],
        chunk_start: usize,
        cut: usize,
    ) -> Head {
        let none = Head {
            start: units[cut].start,
            tokens: 0,
        };
        // Leave room for the next unit, or the overlap would be dropped anyway.
        let limit = self
            .overlap_tokens
            .min(self.max_tokens.saturating_sub(units[cut].tokens));
        if limit == 0 {
            return none;
        }
        let mut whole_sentences = None;
        let mut whole_words = None;
        let mut k = cut;
        while k > 0 {
            k -= 1;
            // The overlap must start after the chunk's own start, or the next
            // chunk would contain this one.
            if units[k].start <= chunk_start || prefix[cut] - prefix[k] > limit {
                break;
            }
            if units[k].before >= Boundary::Sentence {
                whole_sentences = Some(k);
            }
            if units[k].before >= Boundary::Word {
                whole_words = Some(k);
            }
        }
        if let Some(k) = whole_sentences.or(whole_words) {
            return Head {
                start: units[k].start,
                tokens: prefix[cut] - prefix[k],
            };
        }
        // The last sentence alone is too long: take its last words.
        let last = units[cut - 1];
        self.word_suffix(text, last, limit)
            .filter(|&(start, _)| start > chunk_start)
            .map_or(none, |(start, tokens)| Head { start, tokens })
    }

    /// The longest suffix of `unit` made of whole words that counts at most
    /// `limit` tokens: its start and count. The proportion of bytes gives a
    /// first guess, so this usually costs one count.
    fn word_suffix(&self, text: &str, unit: Unit, limit: usize) -> Option<(usize, usize)> {
        let words = segment::words(text, unit.start, unit.end);
        let length = unit.end - unit.start;
        let estimate = |start: usize| (unit.tokens * (unit.end - start)).div_ceil(length.max(1));
        let first_guess = words
            .iter()
            .skip(1)
            .position(|&(start, _)| estimate(start) <= limit)?
            + 1;
        for &(start, _) in &words[first_guess..] {
            let tokens = self.counter.count_tokens(&text[start..unit.end]);
            if tokens <= limit {
                return Some((start, tokens));
            }
        }
        None
    }

    /// The text cut into units of at most `max_tokens` each.
    fn units(&self, text: &str) -> Vec<Unit> {
        let mut units = Vec::new();
        for span in segment::sentences(text) {
            self.refine(
                text,
                span.start,
                span.end,
                span.before,
                Level::Lines,
                &mut units,
            );
        }
        units
    }

    fn refine(
        &self,
        text: &str,
        start: usize,
        end: usize,
        before: Boundary,
        level: Level,
        out: &mut Vec<Unit>,
    ) {
        let tokens = self.counter.count_tokens(&text[start..end]);
        if tokens <= self.max_tokens {
            out.push(Unit {
                start,
                end,
                tokens,
                before,
            });
            return;
        }
        let (parts, inner_boundary, next_level) = match level {
            Level::Lines => (
                segment::lines(text, start, end),
                Boundary::Line,
                Level::Words,
            ),
            Level::Words => (
                segment::words(text, start, end),
                Boundary::Word,
                Level::Chars,
            ),
            Level::Chars => {
                self.split_word(text, start, end, before, out);
                return;
            }
        };
        if parts.len() <= 1 {
            self.refine(text, start, end, before, next_level, out);
            return;
        }
        for (index, &(part_start, part_end)) in parts.iter().enumerate() {
            let boundary = if index == 0 { before } else { inner_boundary };
            self.refine(text, part_start, part_end, boundary, next_level, out);
        }
    }

    /// Cuts one over-long word into the longest prefixes that fit, found by
    /// doubling then bisecting over `char` boundaries (a few counts per piece,
    /// whatever the word's length).
    fn split_word(
        &self,
        text: &str,
        start: usize,
        end: usize,
        before: Boundary,
        out: &mut Vec<Unit>,
    ) {
        let mut piece_start = start;
        let mut boundary = before;
        while piece_start < end {
            let (piece_end, tokens) = self.longest_fitting_prefix(text, piece_start, end);
            out.push(Unit {
                start: piece_start,
                end: piece_end,
                tokens,
                before: boundary,
            });
            piece_start = piece_end;
            boundary = Boundary::Char;
        }
    }

    fn longest_fitting_prefix(&self, text: &str, start: usize, end: usize) -> (usize, usize) {
        let count = |to: usize| self.counter.count_tokens(&text[start..to]);
        let one_char = next_char_boundary(text, start, end);
        let first = count(one_char);
        if first > self.max_tokens || one_char == end {
            return (one_char, first);
        }
        let (mut good, mut good_tokens) = (one_char, first);
        let mut bad = None;
        let mut span = (one_char - start) * 2;
        while bad.is_none() {
            let probe = floor_char_boundary(text, (start + span).min(end))
                .max(next_char_boundary(text, good, end));
            let tokens = count(probe);
            if tokens <= self.max_tokens {
                (good, good_tokens) = (probe, tokens);
                if probe == end {
                    return (good, good_tokens);
                }
                span *= 2;
            } else {
                bad = Some(probe);
            }
        }
        let mut bad = bad.unwrap_or(end);
        loop {
            let mid = floor_char_boundary(text, good + (bad - good) / 2);
            let mid = if mid <= good {
                next_char_boundary(text, good, end)
            } else {
                mid
            };
            if mid >= bad {
                return (good, good_tokens);
            }
            let tokens = count(mid);
            if tokens <= self.max_tokens {
                (good, good_tokens) = (mid, tokens);
            } else {
                bad = mid;
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Level {
    Lines,
    Words,
    Chars,
}

fn next_char_boundary(text: &str, at: usize, end: usize) -> usize {
    let mut next = at + 1;
    while next < end && !text.is_char_boundary(next) {
        next += 1;
    }
    next.min(end)
}

fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(text: &str, max: usize, overlap: usize) -> Vec<Chunk> {
        let counter = WhitespaceCounter;
        Chunker::new(
            &counter,
            ChunkerConfig {
                max_tokens: max,
                overlap_tokens: overlap,
            },
        )
        .chunk_text("d", text)
    }

    fn texts(chunks: &[Chunk]) -> Vec<&str> {
        chunks.iter().map(|c| c.text.as_str()).collect()
    }

    #[test]
    fn short_document_is_one_chunk() {
        let chunks = chunk("  Hello world. Short.  ", 200, 32);
        assert_eq!(texts(&chunks), vec!["Hello world. Short."]);
        assert_eq!(chunks[0].id, "d#0");
        assert_eq!((chunks[0].start_byte, chunks[0].end_byte), (2, 21));
    }

    #[test]
    fn blank_documents_have_no_chunks() {
        assert!(chunk("", 10, 2).is_empty());
        assert!(chunk(" \n\t \n", 10, 2).is_empty());
    }

    #[test]
    fn cuts_at_sentences_with_sentence_overlap() {
        let text = "One two three. Four five six. Seven eight nine. Ten eleven twelve.";
        let chunks = chunk(text, 7, 3);
        assert_eq!(
            texts(&chunks),
            vec![
                "One two three. Four five six.",
                "Four five six. Seven eight nine.",
                "Seven eight nine. Ten eleven twelve.",
            ]
        );
    }

    #[test]
    fn prefers_cutting_before_a_heading() {
        let text =
            "Alpha beta gamma delta.\n\nEpsilon zeta eta.\n\n# Next\n\nTheta iota kappa lambda.";
        let chunks = chunk(text, 10, 0);
        assert_eq!(
            texts(&chunks),
            vec![
                "Alpha beta gamma delta.\n\nEpsilon zeta eta.",
                "# Next\n\nTheta iota kappa lambda.",
            ]
        );
    }

    #[test]
    fn long_sentence_falls_back_to_words_and_word_overlap() {
        let text = "a b c d e f g h i j k l";
        let chunks = chunk(text, 5, 2);
        assert_eq!(
            texts(&chunks),
            vec!["a b c d e", "d e f g h", "g h i j k", "j k l"]
        );
    }

    #[test]
    fn overlap_of_last_words_of_a_long_sentence() {
        let text = "S1 aa bb cc dd ee ff gg. S2 hh ii jj kk.";
        let chunks = chunk(text, 10, 3);
        // The 8-word sentence cannot be the overlap; its last words are.
        assert_eq!(
            texts(&chunks),
            vec!["S1 aa bb cc dd ee ff gg.", "ee ff gg. S2 hh ii jj kk."]
        );
    }

    #[test]
    fn giant_word_is_split_at_char_boundaries() {
        let counter = |s: &str| s.chars().count();
        let chunker = Chunker::new(
            &counter,
            ChunkerConfig {
                max_tokens: 4,
                overlap_tokens: 1,
            },
        );
        let chunks = chunker.chunk_text("d", "ééééééééé");
        assert_eq!(texts(&chunks), vec!["éééé", "éééé", "é"]);
    }

    #[test]
    fn single_char_over_the_limit_is_still_emitted() {
        let counter = |s: &str| 3 * s.chars().count();
        let chunker = Chunker::new(
            &counter,
            ChunkerConfig {
                max_tokens: 1,
                overlap_tokens: 0,
            },
        );
        assert_eq!(texts(&chunker.chunk_text("d", "ab")), vec!["a", "b"]);
    }

    #[test]
    fn optimistic_sums_are_corrected() {
        // A counter whose whole is more than the sum of its parts: one extra
        // token per sentence boundary inside the text.
        let counter = |s: &str| s.split_whitespace().count() + s.matches(". ").count();
        let chunker = Chunker::new(
            &counter,
            ChunkerConfig {
                max_tokens: 6,
                overlap_tokens: 0,
            },
        );
        let text = "a b. c d. e f. g h. i j.";
        for c in chunker.chunk_text("d", text) {
            assert!(counter(&c.text) <= 6, "{:?}", c.text);
        }
    }

    #[test]
    fn overlap_is_capped_at_half() {
        let counter = WhitespaceCounter;
        let chunker = Chunker::new(
            &counter,
            ChunkerConfig {
                max_tokens: 10,
                overlap_tokens: 50,
            },
        );
        assert_eq!(chunker.config().overlap_tokens, 5);
    }
}
