//! Markdown to plain text, lightly: the text is kept as written, minus the
//! markup that would only be noise for retrieval.
//!
//! - front matter (`---` YAML or `+++` TOML at the top) is removed; its
//!   `title` is the fallback title;
//! - headings (ATX `#` and setext `===`/`---`) become `#`-marked lines in
//!   paragraphs of their own, so the chunker can cut before them; the first
//!   level-1 heading is the title;
//! - links keep their text (`[text](url)` → `text`), images are removed,
//!   reference definitions are removed, autolinks keep their URL;
//! - emphasis markers (`*`, `_`, `~~`) are removed where they open or close
//!   a word, but kept inside words (`snake_case`, `2*3`);
//! - code spans and fenced code keep their content verbatim; fence lines,
//!   HTML tags and comments, blockquote markers and table separator rows go;
//! - list markers are kept: they mark items for the chunker.
//!
//! It is a line-based approximation of CommonMark, not a parser: constructs
//! spanning lines (a link split over two lines) are left as written. Every
//! scan is bounded, so the cost stays linear on adversarial input.

use super::html::decode_entity_at;
use super::Extracted;
use crate::normalize::{normalize_text, normalize_title};

/// Longest link text, URL or code span searched for, in bytes: beyond it the
/// construct is taken as literal text (keeps the scan linear on inputs such as
/// a million unmatched `[`).
const MAX_INLINE_SPAN: usize = 4096;

/// Nesting depth of link text stripped recursively.
const MAX_LINK_DEPTH: u8 = 4;

/// Extracts the title and text of a Markdown document.
pub fn extract(input: &str) -> Extracted {
    let text = normalize_text(input);
    let (front_title, body) = split_front_matter(&text);
    let body = remove_html_comments(body);

    let mut lines: Vec<String> = Vec::new();
    let mut title: Option<String> = None;
    let mut fence: Option<(u8, usize)> = None;
    // Lines of the paragraph being built (at the end of `lines`), for setext
    // headings, whose underline turns the whole paragraph into a heading.
    let mut paragraph_lines = 0usize;

    for line in body.split('\n') {
        if let Some((fence_char, fence_len)) = fence {
            if fence_marker(line).is_some_and(|(c, n, rest)| {
                c == fence_char && n >= fence_len && rest.trim().is_empty()
            }) {
                fence = None;
                lines.push(String::new());
            } else {
                lines.push(line.to_string());
            }
            continue;
        }
        let lead_len = line.len() - line.trim_start().len();
        let indent: usize = line[..lead_len]
            .chars()
            .map(|c| if c == '\t' { 4 } else { 1 })
            .sum();
        let content = &line[lead_len..];
        if content.is_empty() {
            lines.push(String::new());
            paragraph_lines = 0;
            continue;
        }
        if indent <= 3 {
            if let Some((c, n, _info)) = fence_marker(content) {
                fence = Some((c, n));
                lines.push(String::new());
                paragraph_lines = 0;
                continue;
            }
            if let Some((level, heading)) = atx_heading(content) {
                let heading = strip_inline(heading, 0);
                push_heading(&mut lines, &mut title, level, &heading);
                paragraph_lines = 0;
                continue;
            }
            if paragraph_lines > 0 {
                if let Some(level) = setext_underline(content) {
                    let start = lines.len() - paragraph_lines;
                    let heading: Vec<String> = lines.drain(start..).collect();
                    let heading = heading
                        .iter()
                        .map(|l| l.trim())
                        .collect::<Vec<_>>()
                        .join(" ");
                    push_heading(&mut lines, &mut title, level, &heading);
                    paragraph_lines = 0;
                    continue;
                }
            }
            if is_thematic_break(content) {
                lines.push(String::new());
                paragraph_lines = 0;
                continue;
            }
            if is_link_reference_definition(content) || is_table_separator(content) {
                continue;
            }
        }
        let mut rest = content;
        if indent <= 3 {
            while let Some(after) = rest.strip_prefix('>') {
                rest = after.trim_start();
            }
        }
        let marker_len = list_marker_len(rest);
        let stripped = strip_inline(&rest[marker_len..], 0);
        if marker_len == 0 && stripped.trim().is_empty() {
            // A line of only markup (an HTML block tag, an image) separates
            // paragraphs like a blank line would.
            lines.push(String::new());
            paragraph_lines = 0;
            continue;
        }
        lines.push(format!(
            "{}{}{}",
            &line[..lead_len],
            &rest[..marker_len],
            stripped
        ));
        paragraph_lines += 1;
    }

    Extracted {
        title: title.or(front_title),
        text: normalize_text(&lines.join("\n")),
    }
}

fn push_heading(lines: &mut Vec<String>, title: &mut Option<String>, level: usize, text: &str) {
    let text = text.trim();
    if level == 1 && title.is_none() {
        *title = normalize_title(text);
    }
    lines.push(String::new());
    if !text.is_empty() {
        lines.push(format!("{} {}", "#".repeat(level), text));
    }
    lines.push(String::new());
}

/// Splits off front matter: `---` ... `---`/`...` (YAML) or `+++` ... `+++`
/// (TOML) starting on the first line. Returns its title and the body.
fn split_front_matter(text: &str) -> (Option<String>, &str) {
    let (delimiters, closers): (&str, &[&str]) = if text.starts_with("---\n") {
        ("---", &["---", "..."])
    } else if text.starts_with("+++\n") {
        ("+++", &["+++"])
    } else {
        return (None, text);
    };
    let after_open = delimiters.len() + 1;
    let mut offset = after_open;
    for line in text[after_open..].split('\n') {
        if closers.contains(&line.trim_end()) {
            let front = &text[after_open..offset];
            let body_start = (offset + line.len() + 1).min(text.len());
            return (front_matter_title(front), &text[body_start..]);
        }
        offset += line.len() + 1;
    }
    (None, text)
}

fn front_matter_title(front: &str) -> Option<String> {
    front.lines().find_map(|line| {
        let value = line
            .strip_prefix("title:")
            .or_else(|| line.strip_prefix("title ="))
            .or_else(|| line.strip_prefix("title="))?
            .trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        normalize_title(value)
    })
}

fn remove_html_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<!--") {
        out.push_str(&rest[..start]);
        match rest[start + 4..].find("-->") {
            Some(end) => rest = &rest[start + 4 + end + 3..],
            None => {
                rest = "";
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A code fence opener/closer: the fence character, its run length and the
/// rest of the line (the info string).
fn fence_marker(content: &str) -> Option<(u8, usize, &str)> {
    let content = content.trim_start_matches(' ');
    let first = *content.as_bytes().first()?;
    if first != b'`' && first != b'~' {
        return None;
    }
    let run = content.bytes().take_while(|&b| b == first).count();
    let rest = &content[run..];
    // A backtick fence's info string cannot contain backticks (that would be
    // a code span such as ```x```).
    (run >= 3 && !(first == b'`' && rest.contains('`'))).then_some((first, run, rest))
}

/// `#`..`######` then a space (or nothing): the level and the heading text,
/// without a closing `#` run.
fn atx_heading(content: &str) -> Option<(usize, &str)> {
    let level = content.bytes().take_while(|&b| b == b'#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let rest = &content[level..];
    if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
        return None;
    }
    let mut text = rest.trim();
    let without_closing = text.trim_end_matches('#');
    if without_closing.is_empty() || without_closing.ends_with([' ', '\t']) {
        text = without_closing.trim_end();
    }
    Some((level, text))
}

fn setext_underline(content: &str) -> Option<usize> {
    let content = content.trim_end();
    if !content.is_empty() && content.bytes().all(|b| b == b'=') {
        Some(1)
    } else if !content.is_empty() && content.bytes().all(|b| b == b'-') {
        Some(2)
    } else {
        None
    }
}

fn is_thematic_break(content: &str) -> bool {
    let mut marker = None;
    let mut count = 0;
    for b in content.bytes() {
        match b {
            b' ' | b'\t' => {}
            b'-' | b'*' | b'_' => {
                if marker.is_some_and(|m| m != b) {
                    return false;
                }
                marker = Some(b);
                count += 1;
            }
            _ => return false,
        }
    }
    count >= 3
}

/// `[label]: destination` on a line of its own.
fn is_link_reference_definition(content: &str) -> bool {
    let Some(rest) = content.strip_prefix('[') else {
        return false;
    };
    let Some(close) = rest.find("]:") else {
        return false;
    };
    close > 0 && !rest[..close].contains(['[', ']']) && !rest[close + 2..].trim().is_empty()
}

/// A table's header separator row such as `|---|:---:|`.
fn is_table_separator(content: &str) -> bool {
    content.contains('-')
        && content.contains('|')
        && content
            .bytes()
            .all(|b| matches!(b, b'|' | b'-' | b':' | b' ' | b'\t'))
}

/// Length of a list item marker (`- `, `* `, `+ `, `1. `, `1) `) at the start.
fn list_marker_len(content: &str) -> usize {
    let bytes = content.as_bytes();
    match bytes.first() {
        Some(b'-' | b'*' | b'+') if bytes.get(1).is_some_and(|&b| b == b' ' || b == b'\t') => 2,
        Some(b) if b.is_ascii_digit() => {
            let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
            let marker = bytes.get(digits).is_some_and(|&b| b == b'.' || b == b')');
            let space = bytes
                .get(digits + 1)
                .is_some_and(|&b| b == b' ' || b == b'\t');
            if digits <= 9 && marker && space {
                digits + 2
            } else {
                0
            }
        }
        _ => 0,
    }
}

/// Removes inline markup from one line.
fn strip_inline(s: &str, depth: u8) -> String {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if bytes.get(i + 1).is_some_and(|b| b.is_ascii_punctuation()) => {
                out.push(bytes[i + 1] as char);
                i += 2;
            }
            b'`' => {
                let run = run_length(bytes, i, b'`');
                match find_code_span_end(bytes, i + run, run) {
                    Some(end) => {
                        let inner = &s[i + run..end];
                        // One space on both sides is padding, as in CommonMark.
                        let inner = match inner.strip_prefix(' ').and_then(|x| x.strip_suffix(' '))
                        {
                            Some(padded) if !padded.trim().is_empty() => padded,
                            _ => inner,
                        };
                        out.push_str(inner);
                        i = end + run;
                    }
                    None => {
                        out.push_str(&s[i..i + run]);
                        i += run;
                    }
                }
            }
            b'!' if bytes.get(i + 1) == Some(&b'[') => match parse_link(bytes, i + 1) {
                Some(link) => i = link.end,
                None => {
                    out.push('!');
                    i += 1;
                }
            },
            b'[' => match parse_link(bytes, i) {
                Some(link) if depth < MAX_LINK_DEPTH => {
                    out.push_str(&strip_inline(&s[link.text_start..link.text_end], depth + 1));
                    i = link.end;
                }
                _ => {
                    out.push('[');
                    i += 1;
                }
            },
            b'<' => match angle_bracket(s, i) {
                Some((replacement, end)) => {
                    out.push_str(replacement);
                    i = end;
                }
                None => {
                    out.push('<');
                    i += 1;
                }
            },
            b'*' | b'_' | b'~' => {
                let marker = bytes[i];
                let run = run_length(bytes, i, marker);
                let prev = s[..i].chars().next_back();
                let next = s[i + run..].chars().next();
                if !is_emphasis_delimiter(marker, run, prev, next) {
                    out.push_str(&s[i..i + run]);
                }
                i += run;
            }
            b'&' => match decode_entity_at(&s[i..]) {
                Some((c, len)) => {
                    out.push(c);
                    i += len;
                }
                None => {
                    out.push('&');
                    i += 1;
                }
            },
            _ => {
                let Some(c) = s[i..].chars().next() else {
                    break;
                };
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

fn run_length(bytes: &[u8], at: usize, byte: u8) -> usize {
    bytes[at..].iter().take_while(|&&b| b == byte).count()
}

/// The start of a closing backtick run of exactly `run` backticks.
fn find_code_span_end(bytes: &[u8], from: usize, run: usize) -> Option<usize> {
    let limit = (from + MAX_INLINE_SPAN).min(bytes.len());
    let mut i = from;
    while i < limit {
        if bytes[i] == b'`' {
            let n = run_length(bytes, i, b'`');
            if n == run {
                return Some(i);
            }
            i += n;
        } else {
            i += 1;
        }
    }
    None
}

struct Link {
    text_start: usize,
    text_end: usize,
    end: usize,
}

/// `[text](destination)` or `[text][label]` starting at the `[` at `open`.
/// A bare `[text]` is not taken as a link (it is as often a citation "[1]").
fn parse_link(bytes: &[u8], open: usize) -> Option<Link> {
    let close = find_closing(bytes, open, b'[', b']')?;
    let after = close + 1;
    let end = match bytes.get(after) {
        Some(b'(') => find_closing(bytes, after, b'(', b')')? + 1,
        Some(b'[') => find_closing(bytes, after, b'[', b']')? + 1,
        _ => return None,
    };
    Some(Link {
        text_start: open + 1,
        text_end: close,
        end,
    })
}

/// The index of the bracket closing the one at `open`, honouring nesting and
/// backslash escapes, within [`MAX_INLINE_SPAN`].
fn find_closing(bytes: &[u8], open: usize, opener: u8, closer: u8) -> Option<usize> {
    let limit = (open + MAX_INLINE_SPAN).min(bytes.len());
    let mut depth = 0usize;
    let mut i = open;
    while i < limit {
        match bytes[i] {
            b'\\' => i += 1,
            b if b == opener => depth += 1,
            b if b == closer => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// An autolink (`<https://x>` → its URL) or an inline HTML tag (removed).
fn angle_bracket(s: &str, at: usize) -> Option<(&str, usize)> {
    let bytes = s.as_bytes();
    let limit = (at + MAX_INLINE_SPAN).min(bytes.len());
    let close = (at + 1..limit).find(|&j| matches!(bytes[j], b'>' | b'<' | b'\n'))?;
    if bytes[close] != b'>' {
        return None;
    }
    let inner = &s[at + 1..close];
    let is_autolink = !inner.contains([' ', '\t'])
        && (inner.contains("://") || inner.starts_with("mailto:") || inner.contains('@'))
        && !inner.starts_with('/');
    if is_autolink {
        return Some((inner, close + 1));
    }
    let name = inner.strip_prefix('/').unwrap_or(inner);
    let name_len = name
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'-')
        .count();
    let looks_like_tag = name
        .as_bytes()
        .first()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && name[name_len..]
            .chars()
            .next()
            .is_none_or(|c| c.is_whitespace() || c == '/');
    looks_like_tag.then_some(("", close + 1))
}

/// Whether a run of `*`, `_` or `~` opens or closes emphasis (and so is
/// dropped), by CommonMark's flanking rules, simplified: runs inside a word
/// are kept (`snake_case`, `a*b`), as are runs with space on both sides.
fn is_emphasis_delimiter(marker: u8, run: usize, prev: Option<char>, next: Option<char>) -> bool {
    let valid_run = match marker {
        b'~' => run == 2,
        _ => run <= 3,
    };
    if !valid_run {
        return false;
    }
    let is_space = |c: Option<char>| c.is_none_or(char::is_whitespace);
    let is_punct = |c: Option<char>| {
        c.is_some_and(|c| c.is_ascii_punctuation() || (!c.is_alphanumeric() && !c.is_whitespace()))
    };
    let is_alnum = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    let left_flanking = !is_space(next) && (!is_punct(next) || is_space(prev) || is_punct(prev));
    let right_flanking = !is_space(prev) && (!is_punct(prev) || is_space(next) || is_punct(next));
    (left_flanking || right_flanking) && !(is_alnum(prev) && is_alnum(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_document() {
        let md = "---\ntitle: \"Front title\"\ntags: [a]\n---\n\
# Guide to *zrag*\n\
Intro with a [link](https://example.com \"t\") and ![an image](img.png) and **bold** text.\n\
\n\
Subtitle\n\
--------\n\
\n\
- item _one_\n\
- item `code *not* emphasis`\n\
\n\
```rust\n\
let x = a*b; // **kept**\n\
```\n\
\n\
> quoted __text__\n\
\n\
| a | b |\n\
|---|---|\n\
| 1 | 2 |\n\
\n\
[ref]: https://example.com\n\
See [the docs][ref], <https://zrag.dev> and snake_case and 2*3.\n";
        let out = extract(md);
        assert_eq!(out.title.as_deref(), Some("Guide to zrag"));
        assert_eq!(
            out.text,
            "# Guide to zrag\n\n\
Intro with a link and  and bold text.\n\n\
## Subtitle\n\n\
- item one\n\
- item code *not* emphasis\n\n\
let x = a*b; // **kept**\n\n\
quoted text\n\n\
| a | b |\n\
| 1 | 2 |\n\n\
See the docs, https://zrag.dev and snake_case and 2*3."
        );
    }

    #[test]
    fn front_matter_title_is_the_fallback() {
        let out = extract("---\ntitle: Only here\n---\nbody text");
        assert_eq!(out.title.as_deref(), Some("Only here"));
        assert_eq!(out.text, "body text");
        // An unterminated front matter is just text.
        let out = extract("---\ntitle: x\nbody");
        assert_eq!(out.title, None);
    }

    #[test]
    fn headings_start_paragraphs() {
        let out = extract("text before\n## Section ##\ntext after\n\nSetext\n===");
        assert_eq!(
            out.text,
            "text before\n\n## Section\n\ntext after\n\n# Setext"
        );
        assert_eq!(out.title.as_deref(), Some("Setext"));
        assert_eq!(
            extract("#hashtag is not a heading").text,
            "#hashtag is not a heading"
        );
    }

    #[test]
    fn html_in_markdown() {
        let out = extract(
            "<div align=\"center\">\n<img src=x>\n</div>\n\nText <br/> more <!-- hidden -->a < b",
        );
        assert_eq!(out.text, "Text  more a < b");
    }

    #[test]
    fn pathological_inputs_stay_fast() {
        let many_brackets = "[".repeat(200_000);
        let start = std::time::Instant::now();
        let out = extract(&many_brackets);
        assert_eq!(out.text.len(), 200_000);
        let backticks = "`` `".repeat(50_000);
        extract(&backticks);
        assert!(start.elapsed().as_secs() < 20);
    }
}
