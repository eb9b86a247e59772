//! Boundaries in text, for the chunker: paragraphs (blank lines), headings
//! (`#` lines, which every loader uses to mark headings), list items,
//! sentences, lines and words, each with a strength ([`Boundary`]) that says
//! how good a place it is to cut.
//!
//! Sentence ends are `.`, `!`, `?`, `…` (with closing quotes or brackets)
//! followed by whitespace and a word that does not start in lowercase, or CJK
//! `。！？`. A period does not end a sentence after a known abbreviation
//! ("e.g.", "Mr.", "Fig. 3"), an initial ("J. Smith"), a dotted abbreviation
//! ("U.S."), or a number that starts a line ("1. item"); decimals ("3.14")
//! never qualify because no whitespace follows their point.

/// How good a place to cut: stronger boundaries are preferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Boundary {
    /// Inside a word (only for a word longer than a whole chunk).
    Char,
    /// Between words on a line; also right after a heading, so that cutting
    /// there, which would orphan the heading, is a last resort.
    Word,
    /// A line break inside a sentence (hard-wrapped text, table rows).
    Line,
    /// A sentence end or a list item start.
    Sentence,
    /// A blank line.
    Paragraph,
    /// The start of a heading (and of the text).
    Section,
}

/// A piece of text `[start, end)` (trimmed, never empty) and the strength of
/// the boundary before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub start: usize,
    pub end: usize,
    pub before: Boundary,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LineKind {
    Heading,
    ListItem,
    Plain,
}

/// Cuts text into sentence-level spans (sentences, list items, heading lines)
/// with the boundary before each.
pub(crate) fn sentences(text: &str) -> Vec<Span> {
    let mut out = Vec::new();
    let mut previous_paragraph_ends_with_heading = false;
    for (index, (para_start, para_end)) in paragraphs(text).into_iter().enumerate() {
        let para = &text[para_start..para_end];
        let mut breaks: Vec<(usize, Boundary)> = Vec::new();
        let mut previous_line_is_heading = false;
        let mut offset = 0;
        for (line_index, line) in para.split('\n').enumerate() {
            let lead = line.len() - line.trim_start().len();
            let kind = classify_line(&line[lead..]);
            let level = if line_index == 0 {
                Some(if index == 0 || kind == LineKind::Heading {
                    Boundary::Section
                } else if previous_paragraph_ends_with_heading {
                    Boundary::Word
                } else {
                    Boundary::Paragraph
                })
            } else if previous_line_is_heading {
                Some(Boundary::Word)
            } else {
                match kind {
                    LineKind::Heading => Some(Boundary::Section),
                    LineKind::ListItem => Some(Boundary::Sentence),
                    LineKind::Plain => None,
                }
            };
            if let Some(level) = level {
                breaks.push((offset + lead, level));
            }
            previous_line_is_heading = kind == LineKind::Heading;
            offset += line.len() + 1;
        }
        previous_paragraph_ends_with_heading = previous_line_is_heading;
        // Merge the sentence starts (sorted) into the line breaks (sorted); a
        // line's own level wins where both fall on the same position.
        let line_breaks = breaks;
        let sentence_breaks = sentence_starts(para);
        let mut breaks = Vec::with_capacity(line_breaks.len() + sentence_breaks.len());
        let mut sentence_iter = sentence_breaks.into_iter().peekable();
        for (at, level) in line_breaks {
            while let Some(start) = sentence_iter.next_if(|&start| start < at) {
                breaks.push((start, Boundary::Sentence));
            }
            sentence_iter.next_if(|&start| start == at);
            breaks.push((at, level));
        }
        breaks.extend(sentence_iter.map(|start| (start, Boundary::Sentence)));

        // A piece that trims to nothing passes its boundary on to the next.
        let mut carried: Option<Boundary> = None;
        for (k, &(at, level)) in breaks.iter().enumerate() {
            let end = breaks.get(k + 1).map_or(para.len(), |&(next, _)| next);
            let piece = &para[at..end];
            let start = at + (piece.len() - piece.trim_start().len());
            let end = at + piece.trim_end().len();
            let level = carried.take().map_or(level, |c| c.max(level));
            if start >= end {
                carried = Some(level);
                continue;
            }
            out.push(Span {
                start: para_start + start,
                end: para_start + end,
                before: level,
            });
        }
    }
    out
}

/// Paragraphs: maximal runs of non-blank lines, trimmed.
fn paragraphs(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<usize> = None;
    let mut current_end = 0;
    let mut line_start = 0;
    for line in text.split('\n') {
        if line.trim().is_empty() {
            if let Some(start) = current.take() {
                out.push((start, current_end));
            }
        } else {
            if current.is_none() {
                current = Some(line_start + (line.len() - line.trim_start().len()));
            }
            current_end = line_start + line.trim_end().len();
        }
        line_start += line.len() + 1;
    }
    if let Some(start) = current {
        out.push((start, current_end));
    }
    out
}

fn classify_line(content: &str) -> LineKind {
    let bytes = content.as_bytes();
    let hashes = bytes.iter().take_while(|&&b| b == b'#').count();
    if (1..=6).contains(&hashes) && bytes.get(hashes).is_none_or(|&b| b == b' ' || b == b'\t') {
        return LineKind::Heading;
    }
    if list_marker(content) {
        return LineKind::ListItem;
    }
    LineKind::Plain
}

fn list_marker(content: &str) -> bool {
    let mut chars = content.chars();
    match chars.next() {
        Some('-' | '*' | '+' | '•' | '–') => chars.next().is_some_and(char::is_whitespace),
        Some(c) if c.is_ascii_digit() => {
            let digits = content.bytes().take_while(u8::is_ascii_digit).count();
            let rest = &content.as_bytes()[digits..];
            digits <= 9
                && rest.first().is_some_and(|&b| b == b'.' || b == b')')
                && rest.get(1).is_some_and(|&b| b == b' ' || b == b'\t')
        }
        _ => false,
    }
}

fn is_terminal(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…' | '。' | '！' | '？')
}

fn is_closer(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | ')' | ']' | '}' | '»' | '”' | '’' | '」' | '』' | '）' | '*' | '_'
    )
}

/// Abbreviations after which a period never ends a sentence (they precede a
/// name or continue the sentence).
const ABBREVIATIONS: [&str; 34] = [
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "messrs", "mme", "mlle", "rev", "hon",
    "gen", "capt", "col", "lt", "sgt", "gov", "pres", "cf", "vs", "viz", "approx", "ca", "al",
    "resp", "incl", "esp", "dept", "univ", "ed", "eds",
];

/// Abbreviations that do not end a sentence when a number follows ("No. 5",
/// "Fig. 2"), but may end one otherwise ("I said no. Then...").
const ABBREVIATIONS_BEFORE_NUMBERS: [&str; 16] = [
    "no", "nos", "fig", "figs", "vol", "vols", "pp", "p", "ch", "sec", "eq", "eqs", "ref", "refs",
    "art", "op",
];

/// Byte offsets (in `para`) where a sentence other than the first starts.
fn sentence_starts(para: &str) -> Vec<usize> {
    let chars: Vec<(usize, char)> = para.char_indices().collect();
    let n = chars.len();
    let mut starts = Vec::new();
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        if !is_terminal(c) {
            i += 1;
            continue;
        }
        let cjk = matches!(c, '。' | '！' | '？');
        let mut j = i + 1;
        while j < n && (is_terminal(chars[j].1) || is_closer(chars[j].1)) {
            j += 1;
        }
        if j >= n {
            break;
        }
        if !cjk && !chars[j].1.is_whitespace() {
            // "3.14", "example.com", "?!x": not an end.
            i = j;
            continue;
        }
        let mut k = j;
        while k < n && chars[k].1.is_whitespace() {
            k += 1;
        }
        if k >= n {
            break;
        }
        let next = chars[k].1;
        let single_period = c == '.' && chars.get(i + 1).is_none_or(|&(_, d)| d != '.');
        if next.is_lowercase() || (single_period && is_abbreviation(para, &chars, i, next)) {
            i = j;
            continue;
        }
        starts.push(chars[k].0);
        i = k;
    }
    starts
}

/// Whether the period at `chars[period]` ends an abbreviation rather than a
/// sentence, judging by the word before it and the character after.
fn is_abbreviation(para: &str, chars: &[(usize, char)], period: usize, next: char) -> bool {
    let mut word_start = period;
    while word_start > 0 && !chars[word_start - 1].1.is_whitespace() {
        word_start -= 1;
    }
    let raw = &para[chars[word_start].0..chars[period].0];
    let word = raw.trim_start_matches(|c: char| !c.is_alphanumeric());
    if word.is_empty() {
        return false;
    }
    let lower = word.to_lowercase();
    let mut letters = word.chars();
    if letters.next().is_some_and(char::is_alphabetic) && letters.next().is_none() {
        return true; // An initial: "J. R. R. Tolkien".
    }
    if ABBREVIATIONS.contains(&lower.as_str()) {
        return true;
    }
    if ABBREVIATIONS_BEFORE_NUMBERS.contains(&lower.as_str()) && next.is_ascii_digit() {
        return true;
    }
    if lower.contains('.')
        && lower.split('.').all(|part| {
            !part.is_empty() && part.chars().count() <= 3 && part.chars().all(char::is_alphabetic)
        })
    {
        return true; // "e.g", "i.e", "U.S", "a.m", "Ph.D"
    }
    if word.bytes().all(|b| b.is_ascii_digit()) {
        // "1. First item" at the start of a line is a list number.
        let line_start = para[..chars[word_start].0].rfind('\n').map_or(0, |p| p + 1);
        return para[line_start..chars[word_start].0].trim().is_empty();
    }
    false
}

/// The non-blank lines of `text[start..end]`, trimmed.
pub(crate) fn lines(text: &str, start: usize, end: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut line_start = start;
    for line in text[start..end].split('\n') {
        let trimmed_start = line_start + (line.len() - line.trim_start().len());
        let trimmed_end = line_start + line.trim_end().len();
        if trimmed_start < trimmed_end {
            out.push((trimmed_start, trimmed_end));
        }
        line_start += line.len() + 1;
    }
    out
}

/// The whitespace-separated words of `text[start..end]`.
pub(crate) fn words(text: &str, start: usize, end: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut word_start: Option<usize> = None;
    for (offset, c) in text[start..end].char_indices() {
        let at = start + offset;
        match (c.is_whitespace(), word_start) {
            (true, Some(s)) => {
                out.push((s, at));
                word_start = None;
            }
            (false, None) => word_start = Some(at),
            _ => {}
        }
    }
    if let Some(s) = word_start {
        out.push((s, end));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str) -> Vec<(&str, Boundary)> {
        sentences(text)
            .into_iter()
            .map(|s| (&text[s.start..s.end], s.before))
            .collect()
    }

    fn sentence_texts(text: &str) -> Vec<&str> {
        pieces(text).into_iter().map(|(t, _)| t).collect()
    }

    #[test]
    fn sentence_ends() {
        assert_eq!(
            sentence_texts(
                "Dr. Smith arrived at 3.45 p.m. today. He said: \"Hi!\" Then left? Yes… Done."
            ),
            vec![
                "Dr. Smith arrived at 3.45 p.m. today.",
                "He said: \"Hi!\"",
                "Then left?",
                "Yes…",
                "Done."
            ]
        );
        assert_eq!(
            sentence_texts(
                "Use e.g. commas. See Fig. 3 and No. 5. I said no. Then J. R. R. Tolkien wrote."
            ),
            vec![
                "Use e.g. commas.",
                "See Fig. 3 and No. 5.",
                "I said no.",
                "Then J. R. R. Tolkien wrote."
            ]
        );
        assert_eq!(
            sentence_texts(
                "Version 2.0 is out. It costs $3.50. wrapped\nline continues. Next (really.) Yes"
            ),
            vec![
                "Version 2.0 is out.",
                "It costs $3.50. wrapped\nline continues.",
                "Next (really.)",
                "Yes"
            ]
        );
        assert_eq!(
            sentence_texts("你好。世界！好吗？"),
            vec!["你好。", "世界！", "好吗？"]
        );
    }

    #[test]
    fn structure_levels() {
        let text = "Intro text.\n\n# Heading\nBody one. Body two.\n- item one\n- item two\n1. first\n2. second\nwrapped line\n\nNext para.";
        assert_eq!(
            pieces(text),
            vec![
                ("Intro text.", Boundary::Section),
                ("# Heading", Boundary::Section),
                ("Body one.", Boundary::Word),
                ("Body two.", Boundary::Sentence),
                ("- item one", Boundary::Sentence),
                ("- item two", Boundary::Sentence),
                ("1. first", Boundary::Sentence),
                ("2. second\nwrapped line", Boundary::Sentence),
                ("Next para.", Boundary::Paragraph),
            ]
        );
        // A heading alone in its paragraph: the next paragraph is glued to it.
        assert_eq!(
            pieces("## A\n\nB text."),
            vec![("## A", Boundary::Section), ("B text.", Boundary::Word)]
        );
    }

    #[test]
    fn lines_and_words() {
        let text = "  a b\n\n c  ";
        assert_eq!(lines(text, 0, text.len()), vec![(2, 5), (8, 9)]);
        assert_eq!(words(text, 0, text.len()), vec![(2, 3), (4, 5), (8, 9)]);
        assert!(sentences(" \n\t\n").is_empty());
    }
}
