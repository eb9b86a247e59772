//! Text normalisation, applied by every loader to every document's text.
//!
//! The goal is text that chunks and hashes the same way whatever the platform
//! or editor produced it: one newline convention, no invisible control
//! characters, no trailing whitespace, at most one blank line between
//! paragraphs. Unicode normalisation (NFC) is deliberately not applied: the
//! tokenizers downstream do their own.

/// Normalises a document's text:
///
/// - `\r\n`, `\r`, U+0085 and U+2028 become `\n`; U+2029 (paragraph
///   separator) and form feed (a page break in PDF text) become a blank line;
///   vertical tab becomes `\n`;
/// - control characters other than `\n` and `\t` are removed (NUL, DEL, C1
///   controls), and so are a byte-order mark / U+FEFF, soft hyphens and
///   zero-width spaces, which are invisible but split words for a tokenizer;
/// - trailing whitespace is trimmed from every line;
/// - runs of blank lines collapse to one blank line (so the text never has
///   more than two `\n` in a row), and leading/trailing blank lines go.
///
/// Leading indentation is kept (it matters in code and lists). The function is
/// idempotent: `normalize_text(&normalize_text(s)) == normalize_text(s)`.
pub fn normalize_text(input: &str) -> String {
    let mut mapped = String::with_capacity(input.len());
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                mapped.push('\n');
            }
            '\n' | '\t' => mapped.push(c),
            '\u{0B}' | '\u{85}' | '\u{2028}' => mapped.push('\n'),
            '\u{0C}' | '\u{2029}' => mapped.push_str("\n\n"),
            '\u{FEFF}' | '\u{AD}' | '\u{200B}' => {}
            c if c.is_control() => {}
            c => mapped.push(c),
        }
    }

    let mut out = String::with_capacity(mapped.len());
    let mut blank_run = 0usize;
    for line in mapped.split('\n') {
        let line = line.trim_end();
        if line.is_empty() {
            blank_run += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank_run > 0 { "\n\n" } else { "\n" });
        }
        blank_run = 0;
        out.push_str(line);
    }
    out
}

/// Normalises a title: all whitespace runs become one space, the ends are
/// trimmed, control characters go; an empty result is `None`.
pub fn normalize_title(input: &str) -> Option<String> {
    let mut out = String::with_capacity(input.len());
    for word in input
        .split(|c: char| c.is_whitespace() || c.is_control() || c == '\u{FEFF}')
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_controls_and_blank_lines() {
        let input = "\u{FEFF}\n\n  Title\r\n\r\nline one  \t\rline\u{0}two\u{7}\n\n\n\n\nend\u{C}page two\n\n";
        assert_eq!(
            normalize_text(input),
            "  Title\n\nline one\nlinetwo\n\nend\n\npage two"
        );
    }

    #[test]
    fn keeps_tabs_and_indentation() {
        assert_eq!(normalize_text("a\n\tb\n    c"), "a\n\tb\n    c");
    }

    #[test]
    fn idempotent() {
        for s in [
            "a\r\n\r\n\r\nb",
            " x \n \n y",
            "\u{2029}p\u{2028}q\u{85}",
            "",
            "\n\n",
        ] {
            let once = normalize_text(s);
            assert_eq!(normalize_text(&once), once, "{s:?}");
        }
    }

    #[test]
    fn whitespace_only_becomes_empty() {
        assert_eq!(normalize_text(" \n\t\n \r\n"), "");
    }

    #[test]
    fn titles() {
        assert_eq!(
            normalize_title("  A\n  title\t here "),
            Some("A title here".into())
        );
        assert_eq!(normalize_title(" \n "), None);
    }
}
