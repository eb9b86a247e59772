//! A tolerant HTML-to-text extractor, written here rather than pulling in a
//! full HTML5 parser: zrag needs the readable text of a page, not its DOM.
//!
//! What it does:
//! - skips `<script>`, `<style>` (and other raw-text elements) without parsing
//!   their content, and drops the content of `<head>`, `<noscript>`,
//!   `<template>`, `<svg>`, `<canvas>` and `<select>`;
//! - takes the first `<title>` as the title (else the first `<h1>`);
//! - collapses whitespace as a browser does, except inside `<pre>`;
//! - turns block elements into paragraph breaks, `<br>` and table rows into
//!   line breaks, table cells into tabs;
//! - marks `<h1>`…`<h6>` as Markdown-style `#` heading lines, so that the
//!   chunker sees headings the same way in every format;
//! - decodes named (the common ones) and numeric character references.
//!
//! Malformed markup never fails: unclosed tags run to the end of the input,
//! a stray `<` is text, an unclosed `<head>` ends at the first body element
//! (as in a browser), unknown entities stay as written.

use super::encoding::windows_1252_high;
use super::Extracted;
use crate::normalize::{normalize_text, normalize_title};
use std::borrow::Cow;

/// Extracts the title and text of an HTML document.
pub fn extract(html: &str) -> Extracted {
    let mut extractor = Extractor::default();
    extractor.run(html);
    let title = extractor
        .title
        .as_deref()
        .and_then(normalize_title)
        .or_else(|| extractor.first_h1.as_deref().and_then(normalize_title));
    Extracted {
        title,
        text: normalize_text(&extractor.sink.out),
    }
}

/// Whether the first bytes of a page declare a single-byte Western encoding
/// (`charset=iso-8859-1`, `windows-1252`, ...): the one legacy encoding that
/// is both common and decodable without a table crate.
pub(crate) fn declares_windows_1252(bytes: &[u8]) -> bool {
    const NAMES: [&[u8]; 11] = [
        b"iso-8859-1",
        b"iso8859-1",
        b"iso_8859-1",
        b"latin1",
        b"latin-1",
        b"l1",
        b"windows-1252",
        b"cp1252",
        b"x-cp1252",
        b"us-ascii",
        b"iso-8859-15",
    ];
    let head: Vec<u8> = bytes
        .iter()
        .take(4096)
        .map(|b| b.to_ascii_lowercase())
        .collect();
    let Some(at) = find(&head, 0, b"charset=") else {
        return false;
    };
    let rest = &head[at + b"charset=".len()..];
    let rest = rest
        .strip_prefix(b"\"")
        .or_else(|| rest.strip_prefix(b"'"))
        .unwrap_or(rest);
    let name_len = rest
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')))
        .unwrap_or(rest.len());
    NAMES.contains(&&rest[..name_len])
}

/// Elements whose content is raw text (not parsed for tags) and dropped.
const RAW_TEXT_SKIPPED: [&str; 6] = ["script", "style", "xmp", "iframe", "noembed", "noframes"];

/// Elements whose content is parsed but not shown.
const HIDDEN_CONTAINERS: [&str; 5] = ["noscript", "template", "svg", "canvas", "select"];

/// Elements allowed in `<head>`; any other start tag implicitly ends it.
const HEAD_ELEMENTS: [&str; 12] = [
    "html", "head", "meta", "link", "base", "title", "script", "style", "noscript", "template",
    "basefont", "bgsound",
];

/// Block elements: their start and end become paragraph breaks.
const BLOCK_ELEMENTS: [&str; 33] = [
    "address",
    "article",
    "aside",
    "blockquote",
    "caption",
    "center",
    "dd",
    "details",
    "dialog",
    "dir",
    "div",
    "dl",
    "dt",
    "fieldset",
    "figcaption",
    "figure",
    "footer",
    "form",
    "header",
    "hgroup",
    "hr",
    "legend",
    "li",
    "main",
    "menu",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "summary",
    "table",
    "ul",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
enum Break {
    #[default]
    None,
    Space,
    Cell,
    Line,
    Paragraph,
}

/// Accumulates text with browser-like whitespace handling: separators are
/// remembered as a pending break and written only before the next visible
/// character, so that runs of tags and whitespace give one separator.
#[derive(Default)]
struct Sink {
    out: String,
    pending: Break,
    heading: Option<usize>,
}

impl Sink {
    fn request(&mut self, brk: Break) {
        self.pending = self.pending.max(brk);
    }

    fn flush_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if self.out.is_empty() {
            return;
        }
        match pending {
            Break::None => {}
            Break::Space => {
                if !self.out.ends_with([' ', '\n', '\t']) {
                    self.out.push(' ');
                }
            }
            Break::Cell => {
                self.trim_trailing_spaces();
                if !self.out.ends_with(['\n', '\t']) {
                    self.out.push('\t');
                }
            }
            Break::Line => {
                self.trim_trailing_spaces();
                self.out.push('\n');
            }
            Break::Paragraph => {
                self.trim_trailing_spaces();
                while !self.out.ends_with("\n\n") {
                    self.out.push('\n');
                }
            }
        }
    }

    fn trim_trailing_spaces(&mut self) {
        let kept = self.out.trim_end_matches([' ', '\t']).len();
        self.out.truncate(kept);
    }

    fn push_visible(&mut self, c: char) {
        self.flush_pending();
        if let Some(level) = self.heading.take() {
            if !self.out.is_empty() && !self.out.ends_with('\n') {
                self.out.push_str("\n\n");
            }
            for _ in 0..level {
                self.out.push('#');
            }
            self.out.push(' ');
        }
        // A no-break space is visible (it does not collapse) but plain text
        // has no use for the distinction.
        self.out.push(if c == '\u{A0}' { ' ' } else { c });
    }

    fn text(&mut self, text: &str, preformatted: bool) {
        for c in text.chars() {
            match c {
                ' ' | '\t' | '\n' | '\r' | '\u{0C}' if !preformatted => self.request(Break::Space),
                '\r' => {}
                '\n' => {
                    self.flush_pending();
                    self.out.push('\n');
                }
                _ => self.push_visible(c),
            }
        }
    }
}

#[derive(Default)]
struct Extractor {
    sink: Sink,
    title: Option<String>,
    first_h1: Option<String>,
    capturing_h1: bool,
    in_head: bool,
    hidden_depth: [u32; HIDDEN_CONTAINERS.len()],
    pre_depth: u32,
}

impl Extractor {
    fn hidden(&self) -> bool {
        self.in_head || self.hidden_depth.iter().any(|&d| d > 0)
    }

    fn run(&mut self, html: &str) {
        let bytes = html.as_bytes();
        let mut i = 0;
        let mut text_start = 0;
        while i < bytes.len() {
            if bytes[i] != b'<' {
                i += 1;
                continue;
            }
            let next = bytes.get(i + 1).copied();
            let is_markup = match next {
                Some(b'!') | Some(b'?') => true,
                Some(b'/') => bytes.get(i + 2).is_some_and(|b| b.is_ascii_alphabetic()),
                Some(b) => b.is_ascii_alphabetic(),
                None => false,
            };
            if !is_markup {
                // A stray '<' (as in "a < b") is text.
                i += 1;
                continue;
            }
            self.emit_text(&html[text_start..i], true);
            i = match next {
                Some(b'!') => self.declaration(html, i),
                Some(b'?') => find(bytes, i, b">").map_or(bytes.len(), |e| e + 1),
                Some(b'/') => self.end_tag(html, i),
                _ => self.start_tag(html, i),
            };
            text_start = i;
        }
        self.emit_text(&html[text_start..], true);
    }

    /// `<!-- comment -->`, `<![CDATA[ ... ]]>`, `<!DOCTYPE ...>`: returns the
    /// index after it.
    fn declaration(&mut self, html: &str, at: usize) -> usize {
        let bytes = html.as_bytes();
        if bytes[at..].starts_with(b"<!--") {
            // "<!-->" is an (empty) comment in browsers too.
            if bytes[at..].starts_with(b"<!-->") {
                return at + 5;
            }
            return find(bytes, at + 4, b"-->").map_or(bytes.len(), |e| e + 3);
        }
        if starts_with_ignore_case(&bytes[at..], b"<![cdata[") {
            let start = at + 9;
            let end = find(bytes, start, b"]]>").unwrap_or(bytes.len());
            self.emit_text(&html[start..end], false);
            return (end + 3).min(bytes.len());
        }
        find(bytes, at, b">").map_or(bytes.len(), |e| e + 1)
    }

    fn end_tag(&mut self, html: &str, at: usize) -> usize {
        let bytes = html.as_bytes();
        let (name, after_name) = tag_name(bytes, at + 2);
        let end = find(bytes, after_name, b">").map_or(bytes.len(), |e| e + 1);
        if let Some(k) = HIDDEN_CONTAINERS.iter().position(|&h| h == name) {
            self.hidden_depth[k] = self.hidden_depth[k].saturating_sub(1);
            return end;
        }
        match name.as_str() {
            "head" => self.in_head = false,
            "pre" => {
                self.pre_depth = self.pre_depth.saturating_sub(1);
                self.sink.request(Break::Paragraph);
            }
            "br" => self.sink.request(Break::Line),
            "tr" => self.sink.request(Break::Line),
            _ if heading_level(&name).is_some() => {
                self.sink.heading = None;
                self.sink.request(Break::Paragraph);
                if name == "h1" {
                    self.capturing_h1 = false;
                }
            }
            _ if BLOCK_ELEMENTS.contains(&name.as_str()) => self.sink.request(Break::Paragraph),
            _ => {}
        }
        end
    }

    fn start_tag(&mut self, html: &str, at: usize) -> usize {
        let bytes = html.as_bytes();
        let (name, after_name) = tag_name(bytes, at + 1);
        let (end, self_closing) = skip_attributes(bytes, after_name);

        if self.in_head && !HEAD_ELEMENTS.contains(&name.as_str()) {
            self.in_head = false;
        }
        if RAW_TEXT_SKIPPED.contains(&name.as_str()) {
            return if self_closing {
                end
            } else {
                skip_past_end_tag(bytes, end, &name).1
            };
        }
        if name == "title" || name == "textarea" {
            if self_closing {
                return end;
            }
            let (content_end, after) = skip_past_end_tag(bytes, end, &name);
            let content = &html[end..content_end];
            if name == "title" {
                if self.title.is_none() && self.hidden_depth.iter().all(|&d| d == 0) {
                    self.title = Some(decode_entities(content).into_owned());
                }
            } else {
                self.emit_text(content, true);
            }
            return after;
        }
        if let Some(k) = HIDDEN_CONTAINERS.iter().position(|&h| h == name) {
            if !self_closing {
                self.hidden_depth[k] += 1;
            }
            return end;
        }
        match name.as_str() {
            "head" => self.in_head = !self_closing,
            "body" => self.in_head = false,
            "br" => self.sink.request(Break::Line),
            "tr" => self.sink.request(Break::Line),
            "td" | "th" => self.sink.request(Break::Cell),
            "pre" => {
                self.sink.request(Break::Paragraph);
                if !self_closing {
                    self.pre_depth += 1;
                }
            }
            _ => {
                if let Some(level) = heading_level(&name) {
                    self.sink.request(Break::Paragraph);
                    if !self.hidden() {
                        self.sink.heading = Some(level);
                    }
                    if level == 1 && self.first_h1.is_none() && !self_closing {
                        self.capturing_h1 = true;
                        self.first_h1 = Some(String::new());
                    }
                } else if BLOCK_ELEMENTS.contains(&name.as_str()) {
                    self.sink.request(Break::Paragraph);
                }
            }
        }
        end
    }

    fn emit_text(&mut self, raw: &str, decode: bool) {
        if raw.is_empty() {
            return;
        }
        if self.in_head && self.hidden_depth.iter().all(|&d| d == 0) {
            // Text directly in <head> starts the body, as in a browser.
            if raw.trim().is_empty() {
                return;
            }
            self.in_head = false;
        }
        if self.hidden() {
            return;
        }
        let text = if decode {
            decode_entities(raw)
        } else {
            Cow::Borrowed(raw)
        };
        if self.capturing_h1 {
            if let Some(h1) = self.first_h1.as_mut() {
                h1.push_str(&text);
            }
        }
        self.sink.text(&text, self.pre_depth > 0);
    }
}

fn heading_level(name: &str) -> Option<usize> {
    match name {
        "h1" => Some(1),
        "h2" => Some(2),
        "h3" => Some(3),
        "h4" => Some(4),
        "h5" => Some(5),
        "h6" => Some(6),
        _ => None,
    }
}

/// Reads a tag name at `at` (lowercased); returns it and the index after it.
fn tag_name(bytes: &[u8], at: usize) -> (String, usize) {
    let mut end = at;
    while end < bytes.len()
        && (bytes[end].is_ascii_alphanumeric() || matches!(bytes[end], b'-' | b':' | b'_'))
    {
        end += 1;
    }
    let name = bytes[at..end]
        .iter()
        .map(|b| b.to_ascii_lowercase() as char)
        .collect();
    (name, end)
}

/// Skips a start tag's attributes; returns the index after `>` (or the end of
/// the input) and whether the tag was self-closing (`/>`). A quote opens a
/// quoted value only right after `=`, so a stray apostrophe in an unquoted
/// value does not swallow the rest of the page. An unterminated quoted value
/// would (as in a browser); to recover the text, a value in which a `>` is
/// later followed by a `<` before the closing quote is taken as unterminated
/// and the tag ends at that `>`.
fn skip_attributes(bytes: &[u8], mut i: usize) -> (usize, bool) {
    let mut last_significant = 0u8;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'>' => return (i + 1, last_significant == b'/'),
            b'"' | b'\'' if last_significant == b'=' => {
                let close = find(bytes, i + 1, &[b]).unwrap_or(bytes.len());
                if let Some(gt) = bytes[i + 1..close].iter().position(|&c| c == b'>') {
                    let gt = i + 1 + gt;
                    if bytes[gt..close].contains(&b'<') {
                        return (gt + 1, false);
                    }
                }
                i = (close + 1).min(bytes.len());
                last_significant = b;
                continue;
            }
            _ if b.is_ascii_whitespace() => {}
            _ => last_significant = b,
        }
        i += 1;
    }
    (bytes.len(), false)
}

/// Finds `</name` (ASCII case-insensitive) from `from`; returns where the
/// content ends and the index after the end tag's `>`.
fn skip_past_end_tag(bytes: &[u8], from: usize, name: &str) -> (usize, usize) {
    let needle: Vec<u8> = [b"</".as_slice(), name.as_bytes()].concat();
    let mut search = from;
    while let Some(at) = find_ignore_case(bytes, search, &needle) {
        let after = at + needle.len();
        let terminated = bytes
            .get(after)
            .is_none_or(|b| b.is_ascii_whitespace() || matches!(b, b'>' | b'/'));
        if terminated {
            let end = find(bytes, after, b">").map_or(bytes.len(), |e| e + 1);
            return (at, end);
        }
        search = after;
    }
    (bytes.len(), bytes.len())
}

fn find(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    if from >= bytes.len() || needle.is_empty() {
        return None;
    }
    bytes[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn find_ignore_case(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    if from >= bytes.len() || needle.is_empty() {
        return None;
    }
    bytes[from..]
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
        .map(|p| p + from)
}

fn starts_with_ignore_case(bytes: &[u8], prefix: &[u8]) -> bool {
    bytes.len() >= prefix.len() && bytes[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Decodes character references (`&amp;`, `&eacute;`, `&#233;`, `&#xE9;`).
/// Unknown names stay as written.
pub fn decode_entities(text: &str) -> Cow<'_, str> {
    if !text.contains('&') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        match decode_entity_at(tail) {
            Some((c, len)) => {
                out.push(c);
                rest = &tail[len..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Decodes the character reference at the start of `text` (which starts with
/// `&`): returns the character and the number of bytes it used.
pub(crate) fn decode_entity_at(text: &str) -> Option<(char, usize)> {
    let bytes = text.as_bytes();
    if bytes.get(1) == Some(&b'#') {
        let (hex, digits_start) = match bytes.get(2) {
            Some(b'x') | Some(b'X') => (true, 3),
            _ => (false, 2),
        };
        let digits = bytes[digits_start..]
            .iter()
            .take_while(|b| {
                if hex {
                    b.is_ascii_hexdigit()
                } else {
                    b.is_ascii_digit()
                }
            })
            .count();
        if digits == 0 {
            return None;
        }
        let radix = if hex { 16 } else { 10 };
        let mut value: u32 = 0;
        for &b in &bytes[digits_start..digits_start + digits] {
            let digit = (b as char).to_digit(radix).unwrap_or(0);
            // Saturate: anything past U+10FFFF is invalid anyway.
            value = value.saturating_mul(radix).saturating_add(digit);
        }
        let mut len = digits_start + digits;
        if bytes.get(len) == Some(&b';') {
            len += 1;
        }
        let c = match value {
            0 => char::REPLACEMENT_CHARACTER,
            0x80..=0x9F => windows_1252_high(value as u8),
            _ => char::from_u32(value).unwrap_or(char::REPLACEMENT_CHARACTER),
        };
        return Some((c, len));
    }
    let name_len = bytes[1..]
        .iter()
        .take(32)
        .take_while(|b| b.is_ascii_alphanumeric())
        .count();
    if name_len == 0 {
        return None;
    }
    let name = &text[1..1 + name_len];
    let c = named_entity(name)?;
    if bytes.get(1 + name_len) == Some(&b';') {
        return Some((c, name_len + 2));
    }
    // Without ';' browsers still decode a few legacy names ("&amp" "&nbsp").
    const LEGACY: [&str; 7] = ["amp", "lt", "gt", "quot", "nbsp", "copy", "reg"];
    let next = bytes.get(1 + name_len);
    let at_word_end = next.is_none_or(|b| !b.is_ascii_alphanumeric() && *b != b'=');
    (LEGACY.contains(&name) && at_word_end).then_some((c, name_len + 1))
}

/// Named references: the Latin-1 set, Greek letters and the common
/// typographic and mathematical ones.
fn named_entity(name: &str) -> Option<char> {
    const LATIN1: [&str; 96] = [
        "nbsp", "iexcl", "cent", "pound", "curren", "yen", "brvbar", "sect", "uml", "copy", "ordf",
        "laquo", "not", "shy", "reg", "macr", "deg", "plusmn", "sup2", "sup3", "acute", "micro",
        "para", "middot", "cedil", "sup1", "ordm", "raquo", "frac14", "frac12", "frac34", "iquest",
        "Agrave", "Aacute", "Acirc", "Atilde", "Auml", "Aring", "AElig", "Ccedil", "Egrave",
        "Eacute", "Ecirc", "Euml", "Igrave", "Iacute", "Icirc", "Iuml", "ETH", "Ntilde", "Ograve",
        "Oacute", "Ocirc", "Otilde", "Ouml", "times", "Oslash", "Ugrave", "Uacute", "Ucirc",
        "Uuml", "Yacute", "THORN", "szlig", "agrave", "aacute", "acirc", "atilde", "auml", "aring",
        "aelig", "ccedil", "egrave", "eacute", "ecirc", "euml", "igrave", "iacute", "icirc",
        "iuml", "eth", "ntilde", "ograve", "oacute", "ocirc", "otilde", "ouml", "divide", "oslash",
        "ugrave", "uacute", "ucirc", "uuml", "yacute", "thorn", "yuml",
    ];
    // Greek capitals start at U+0391, small letters at U+03B1; "" marks the
    // unassigned U+03A2, whose small form is final sigma.
    const GREEK_CAPITAL: [&str; 25] = [
        "Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota", "Kappa",
        "Lambda", "Mu", "Nu", "Xi", "Omicron", "Pi", "Rho", "", "Sigma", "Tau", "Upsilon", "Phi",
        "Chi", "Psi", "Omega",
    ];
    const GREEK_SMALL: [&str; 25] = [
        "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
        "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigmaf", "sigma", "tau", "upsilon",
        "phi", "chi", "psi", "omega",
    ];
    const OTHERS: [(&str, char); 78] = [
        ("amp", '&'),
        ("lt", '<'),
        ("gt", '>'),
        ("quot", '"'),
        ("apos", '\''),
        ("OElig", 'Œ'),
        ("oelig", 'œ'),
        ("Scaron", 'Š'),
        ("scaron", 'š'),
        ("Yuml", 'Ÿ'),
        ("fnof", 'ƒ'),
        ("circ", 'ˆ'),
        ("tilde", '˜'),
        ("ensp", '\u{2002}'),
        ("emsp", '\u{2003}'),
        ("thinsp", '\u{2009}'),
        ("zwnj", '\u{200C}'),
        ("zwj", '\u{200D}'),
        ("lrm", '\u{200E}'),
        ("rlm", '\u{200F}'),
        ("ndash", '–'),
        ("mdash", '—'),
        ("lsquo", '‘'),
        ("rsquo", '’'),
        ("sbquo", '‚'),
        ("ldquo", '“'),
        ("rdquo", '”'),
        ("bdquo", '„'),
        ("dagger", '†'),
        ("Dagger", '‡'),
        ("bull", '•'),
        ("hellip", '…'),
        ("permil", '‰'),
        ("prime", '′'),
        ("Prime", '″'),
        ("lsaquo", '‹'),
        ("rsaquo", '›'),
        ("oline", '‾'),
        ("frasl", '⁄'),
        ("euro", '€'),
        ("trade", '™'),
        ("larr", '←'),
        ("uarr", '↑'),
        ("rarr", '→'),
        ("darr", '↓'),
        ("harr", '↔'),
        ("lArr", '⇐'),
        ("rArr", '⇒'),
        ("hArr", '⇔'),
        ("forall", '∀'),
        ("part", '∂'),
        ("exist", '∃'),
        ("empty", '∅'),
        ("nabla", '∇'),
        ("isin", '∈'),
        ("notin", '∉'),
        ("prod", '∏'),
        ("sum", '∑'),
        ("minus", '−'),
        ("lowast", '∗'),
        ("radic", '√'),
        ("infin", '∞'),
        ("and", '∧'),
        ("or", '∨'),
        ("cap", '∩'),
        ("cup", '∪'),
        ("int", '∫'),
        ("there4", '∴'),
        ("sim", '∼'),
        ("asymp", '≈'),
        ("ne", '≠'),
        ("equiv", '≡'),
        ("le", '≤'),
        ("ge", '≥'),
        ("sdot", '⋅'),
        ("loz", '◊'),
        ("hearts", '♥'),
        ("check", '✓'),
    ];
    if let Some(k) = LATIN1.iter().position(|&n| n == name) {
        return char::from_u32(0xA0 + k as u32);
    }
    if let Some(k) = GREEK_CAPITAL.iter().position(|&n| n == name) {
        return char::from_u32(0x391 + k as u32);
    }
    if let Some(k) = GREEK_SMALL.iter().position(|&n| n == name) {
        return char::from_u32(0x3B1 + k as u32);
    }
    OTHERS.iter().find(|(n, _)| *n == name).map(|&(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_page() {
        let page = "<!DOCTYPE html><html><head><meta charset=utf-8><title>The  Title</title>\
            <style>p { color: red }</style><script>var x = '<p>no</p>';</script></head>\
            <body><h1>Heading</h1><p>First &amp; para-<b>graph</b>.</p><div>Second\n   line</div>\
            <!-- comment <p>hidden</p> --><noscript>enable js</noscript><p>caf&eacute; &#233;&#xE9; &euro;&nbsp;5</p></body></html>";
        let out = extract(page);
        assert_eq!(out.title.as_deref(), Some("The Title"));
        assert_eq!(
            out.text,
            "# Heading\n\nFirst & para-graph.\n\nSecond line\n\ncafé éé € 5"
        );
    }

    #[test]
    fn pre_keeps_whitespace_and_br_breaks_lines() {
        let out = extract("<p>a<br>b</p><pre>x  y\n  z</pre><p>after</p>");
        assert_eq!(out.text, "a\nb\n\nx  y\n  z\n\nafter");
    }

    #[test]
    fn tables_become_rows_and_cells() {
        let out = extract(
            "<table><tr><th>Name</th><th>Age</th></tr><tr><td>Ann</td><td>5</td></tr></table>",
        );
        assert_eq!(out.text, "Name\tAge\nAnn\t5");
    }

    #[test]
    fn malformed_markup() {
        // Unclosed head: the first body element ends it.
        let out = extract("<html><head><title>T</title><p>visible text");
        assert_eq!(out.title.as_deref(), Some("T"));
        assert_eq!(out.text, "visible text");
        // Stray '<', unterminated tags, attributes with '>' in quotes.
        assert_eq!(extract("a < b and 1<2").text, "a < b and 1<2");
        // As in a browser, "<d" starts a tag.
        assert_eq!(extract("c<d").text, "c");
        assert_eq!(extract("x <a href=\"y>z\">link</a> w").text, "x link w");
        assert_eq!(extract("text <div class='unterminated").text, "text");
        assert_eq!(
            extract("<div class=\"open>\n<p>kept</p><a title=\"x\">y</a>").text,
            "kept\n\ny"
        );
        assert_eq!(extract("<a title=\"a > b\">link</a>").text, "link");
        assert_eq!(extract("<script>never closed <p>x</p>").text, "");
        assert_eq!(extract("<!-- never closed").text, "");
        assert_eq!(
            extract("</p></div>only closers</span>").text,
            "only closers"
        );
        assert_eq!(
            extract("&bogus; &amp &#; &#xZZ; &#99999999999;").text,
            "&bogus; & &#; &#xZZ; \u{FFFD}"
        );
    }

    #[test]
    fn title_falls_back_to_h1() {
        let out = extract("<body><h1>Main <i>topic</i></h1><p>x</p></body>");
        assert_eq!(out.title.as_deref(), Some("Main topic"));
    }

    #[test]
    fn script_end_tag_case_and_lookalikes() {
        let out = extract("<SCRIPT>a</scripts> b</SCRIPT >after");
        assert_eq!(out.text, "after");
    }

    #[test]
    fn charset_sniffing() {
        assert!(declares_windows_1252(b"<meta charset=\"ISO-8859-1\">"));
        assert!(declares_windows_1252(
            b"<meta http-equiv=content-type content='text/html; charset=windows-1252'>"
        ));
        assert!(!declares_windows_1252(b"<meta charset=shift_jis>"));
        assert!(!declares_windows_1252(b"<p>no declaration</p>"));
    }
}
