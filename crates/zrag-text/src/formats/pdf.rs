//! PDF text extraction through `pdf-extract` (which parses with `lopdf`).
//!
//! `pdf-extract` can panic on malformed files (it has `unwrap`s on structures
//! a broken PDF lacks), so the extraction runs under `catch_unwind` and a
//! panic becomes a [`TextError::Pdf`] naming the file. What `catch_unwind`
//! cannot catch (an abort, a stack overflow on absurdly deep nesting) stays
//! out of reach short of a subprocess. The panic hook still prints the panic
//! message to stderr: replacing the process-wide hook from a library would
//! race with other threads and hide their panics.

use super::Extracted;
use crate::normalize::{normalize_text, normalize_title};
use crate::TextError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// Extracts the title (from the document information dictionary) and text of
/// a PDF. `path` only names the file in errors.
pub fn extract(path: &Path, bytes: &[u8]) -> Result<Extracted, TextError> {
    let error = |message: String| TextError::Pdf {
        path: path.to_path_buf(),
        message,
    };
    // lopdf also finds a header after leading junk; refusing anything without
    // one early gives the clearer message for a mislabelled file.
    let head = &bytes[..bytes.len().min(1024)];
    if !head.windows(5).any(|w| w == b"%PDF-") {
        return Err(error("not a PDF file (no %PDF- header)".into()));
    }
    match catch_unwind(AssertUnwindSafe(|| extract_unguarded(bytes))) {
        Ok(Ok((title, text))) => Ok(Extracted {
            title: title.as_deref().and_then(normalize_title),
            text: normalize_text(&text),
        }),
        Ok(Err(message)) => Err(error(message)),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown cause".into());
            Err(error(format!(
                "the PDF parser crashed on this file ({detail})"
            )))
        }
    }
}

fn extract_unguarded(bytes: &[u8]) -> Result<(Option<String>, String), String> {
    let mut doc = pdf_extract::Document::load_mem(bytes).map_err(|e| e.to_string())?;
    if doc.is_encrypted() {
        // Many PDFs are "encrypted" with an empty user password only to set
        // permissions; those open. Others need a password we do not have.
        doc.decrypt("")
            .map_err(|e| format!("encrypted PDF that needs a password ({e})"))?;
    }
    let title = info_title(&doc);
    let mut text = String::new();
    {
        let mut output = pdf_extract::PlainTextOutput::new(&mut text);
        pdf_extract::output_doc(&doc, &mut output).map_err(|e| e.to_string())?;
    }
    Ok((title, text))
}

/// The `/Title` of the trailer's `/Info` dictionary, if any.
fn info_title(doc: &pdf_extract::Document) -> Option<String> {
    use pdf_extract::Object;
    let resolve = |object: &Object| -> Option<Object> {
        match object {
            Object::Reference(id) => doc.get_object(*id).ok().cloned(),
            other => Some(other.clone()),
        }
    };
    let info = resolve(doc.trailer.get(b"Info").ok()?)?;
    let title = resolve(info.as_dict().ok()?.get(b"Title").ok()?)?;
    match title {
        Object::String(bytes, _) => Some(decode_pdf_string(&bytes)),
        _ => None,
    }
}

/// PDF text strings are UTF-16BE with a byte-order mark, UTF-8 with one
/// (PDF 2.0), or PDFDocEncoding, approximated here by Latin-1.
fn decode_pdf_string(bytes: &[u8]) -> String {
    if let Some(rest) = bytes.strip_prefix(&[0xFE, 0xFF]) {
        let units = rest
            .chunks_exact(2)
            .map(|p| u16::from_be_bytes([p[0], p[1]]));
        return char::decode_utf16(units)
            .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
            .collect();
    }
    if let Some(rest) = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]) {
        return String::from_utf8_lossy(rest).into_owned();
    }
    bytes.iter().map(|&b| b as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_a_pdf() {
        let err = extract(Path::new("x.pdf"), b"hello").unwrap_err();
        assert!(err.to_string().contains("x.pdf"));
        assert!(err.to_string().contains("no %PDF- header"));
    }

    #[test]
    fn truncated_pdf_is_an_error_not_a_panic() {
        let err = extract(Path::new("t.pdf"), b"%PDF-1.4\n1 0 obj << /Type /Catalog").unwrap_err();
        assert!(matches!(err, TextError::Pdf { .. }), "{err}");
    }

    #[test]
    fn pdf_strings() {
        assert_eq!(decode_pdf_string(b"\xFE\xFF\x00H\x00i"), "Hi");
        assert_eq!(decode_pdf_string(b"caf\xE9"), "café");
    }
}
