//! Turning a text file's bytes into a `String`, with the policy for bad bytes:
//!
//! - a UTF-8 byte-order mark is dropped; a UTF-16 one (LE or BE) means the
//!   file is decoded as UTF-16 (Windows tools still write such files);
//! - a NUL byte anywhere (outside UTF-16) means a binary file: an error;
//! - invalid UTF-8 is an error naming the line and byte offset, unless the
//!   caller asked for lossy decoding (invalid sequences become U+FFFD). The
//!   default is strict because silently replaced characters would go into the
//!   index unnoticed; the error tells the user exactly where to look.

use crate::TextError;
use std::path::Path;

/// Decodes a text file's bytes as described in the module documentation.
pub(crate) fn decode_text(path: &Path, bytes: &[u8], lossy: bool) -> Result<String, TextError> {
    if let Some(rest) = bytes.strip_prefix(&[0xFF, 0xFE]) {
        return decode_utf16(path, rest, u16::from_le_bytes, lossy);
    }
    if let Some(rest) = bytes.strip_prefix(&[0xFE, 0xFF]) {
        return decode_utf16(path, rest, u16::from_be_bytes, lossy);
    }
    let (bytes, bom_len) = match bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]) {
        Some(rest) => (rest, 3),
        None => (bytes, 0),
    };
    if let Some(offset) = bytes.iter().position(|&b| b == 0) {
        return Err(TextError::Binary {
            path: path.to_path_buf(),
            offset: (offset + bom_len) as u64,
        });
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(text.to_owned()),
        Err(_) if lossy => Ok(String::from_utf8_lossy(bytes).into_owned()),
        Err(err) => Err(invalid_utf8(path, bytes, err.valid_up_to(), bom_len)),
    }
}

/// The error for invalid UTF-8 at `valid_up_to`, with its 1-based line.
pub(crate) fn invalid_utf8(
    path: &Path,
    bytes: &[u8],
    valid_up_to: usize,
    bytes_before: usize,
) -> TextError {
    let line = 1 + bytes[..valid_up_to].iter().filter(|&&b| b == b'\n').count();
    TextError::InvalidUtf8 {
        path: path.to_path_buf(),
        line,
        offset: (valid_up_to + bytes_before) as u64,
    }
}

fn decode_utf16(
    path: &Path,
    bytes: &[u8],
    unit: fn([u8; 2]) -> u16,
    lossy: bool,
) -> Result<String, TextError> {
    let error = |offset: usize| TextError::InvalidUtf16 {
        path: path.to_path_buf(),
        offset: (offset + 2) as u64,
    };
    if bytes.len() % 2 == 1 && !lossy {
        return Err(error(bytes.len() - 1));
    }
    let units = bytes.chunks_exact(2).map(|pair| unit([pair[0], pair[1]]));
    let mut out = String::with_capacity(bytes.len() / 2);
    let mut offset = 0usize;
    for decoded in char::decode_utf16(units) {
        match decoded {
            Ok(c) => {
                offset += c.len_utf16() * 2;
                out.push(c);
            }
            Err(_) if lossy => {
                offset += 2;
                out.push(char::REPLACEMENT_CHARACTER);
            }
            Err(_) => return Err(error(offset)),
        }
    }
    Ok(out)
}

/// Windows-1252 (a superset of ISO-8859-1 in practice): the single-byte
/// encoding old HTML pages declare. Bytes 0x80–0x9F map to the typographic
/// characters Windows puts there; the five undefined ones pass through as C1
/// controls, which normalisation then removes.
pub(crate) fn decode_windows_1252(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            0x80..=0x9F => windows_1252_high(b),
            _ => b as char,
        })
        .collect()
}

/// The character for a byte (or an HTML numeric reference) in 0x80–0x9F.
pub(crate) fn windows_1252_high(b: u8) -> char {
    const TABLE: [char; 32] = [
        '\u{20AC}', '\u{81}', '\u{201A}', '\u{192}', '\u{201E}', '\u{2026}', '\u{2020}',
        '\u{2021}', '\u{2C6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8D}', '\u{17D}',
        '\u{8F}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201C}', '\u{201D}', '\u{2022}', '\u{2013}',
        '\u{2014}', '\u{2DC}', '\u{2122}', '\u{161}', '\u{203A}', '\u{153}', '\u{9D}', '\u{17E}',
        '\u{178}',
    ];
    TABLE[(b & 0x1F) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("f.txt")
    }

    #[test]
    fn utf8_with_and_without_bom() {
        assert_eq!(decode_text(path(), b"\xEF\xBB\xBFhi", false).unwrap(), "hi");
        assert_eq!(decode_text(path(), "é".as_bytes(), false).unwrap(), "é");
    }

    #[test]
    fn utf16_both_endians() {
        let le: Vec<u8> = [0xFF, 0xFE, b'h', 0, b'i', 0].to_vec();
        let be: Vec<u8> = [0xFE, 0xFF, 0, b'h', 0, b'i'].to_vec();
        assert_eq!(decode_text(path(), &le, false).unwrap(), "hi");
        assert_eq!(decode_text(path(), &be, false).unwrap(), "hi");
        let unpaired = [0xFF, 0xFE, 0x00, 0xD8, b'a', 0];
        assert!(matches!(
            decode_text(path(), &unpaired, false),
            Err(TextError::InvalidUtf16 { offset: 2, .. })
        ));
        assert_eq!(decode_text(path(), &unpaired, true).unwrap(), "\u{FFFD}a");
    }

    #[test]
    fn nul_means_binary() {
        assert!(matches!(
            decode_text(path(), b"abc\0def", false),
            Err(TextError::Binary { offset: 3, .. })
        ));
    }

    #[test]
    fn invalid_utf8_names_line_and_offset() {
        let err = decode_text(path(), b"one\ntwo \xFF three", false).unwrap_err();
        assert!(matches!(
            err,
            TextError::InvalidUtf8 {
                line: 2,
                offset: 8,
                ..
            }
        ));
        assert!(err.to_string().starts_with("f.txt:2: not valid UTF-8"));
        assert_eq!(decode_text(path(), b"a\xFFb", true).unwrap(), "a\u{FFFD}b");
    }

    #[test]
    fn windows_1252() {
        assert_eq!(decode_windows_1252(b"caf\xE9 \x93q\x94"), "café “q”");
    }
}
