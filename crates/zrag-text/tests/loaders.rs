//! The loaders on the fixture files: one test per format and per kind of bad
//! input, plus directory walking.

mod common;

use common::fixture;
use serde_json::json;
use std::fs;
use std::path::{Path, PathBuf};
use zrag_text::{
    discover, load_bytes, load_file, load_file_with, load_paths, load_paths_with, Document, Format,
    LoadOptions, SkipReason, TextError,
};

fn only_document(path: &Path) -> Document {
    let mut documents = load_file(path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(documents.len(), 1, "{documents:?}");
    documents.remove(0)
}

fn path_string(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

#[test]
fn plain_text() {
    let path = fixture("sample.txt");
    let doc = only_document(&path);
    assert_eq!(doc.id, path_string(&path));
    assert_eq!(doc.source, doc.id);
    assert_eq!(doc.title, None);
    assert_eq!(
        doc.metadata,
        json!({"format": "txt"}).as_object().unwrap().clone()
    );
    assert_eq!(
        doc.text,
        "Plain text fixture.\n\
         It has a second line, trailing spaces above, and three blank lines below.\n\n\
         Last paragraph. The end.\nWindows line one.\nWindows line two."
    );
    assert_eq!(doc.content_hash, doc.compute_content_hash());
}

#[test]
fn utf16_text_with_bom() {
    assert_eq!(only_document(&fixture("utf16.txt")).text, "UTF-16 text.");
}

#[test]
fn markdown() {
    let doc = only_document(&fixture("sample.md"));
    assert_eq!(doc.title.as_deref(), Some("Sample Markdown"));
    assert_eq!(doc.metadata["format"], "md");
    assert_eq!(
        doc.text,
        "# Sample Markdown\n\n\
         An intro paragraph with a link to docs and an\n\
         image  and bold and emphasised words.\n\n\
         ## Install\n\n\
         1. Download the zrag binary.\n\
         2. Run zrag index ./docs.\n\n\
         zrag search \"what is *this*\"\n\n\
         A quoted remark."
    );
}

#[test]
fn html() {
    let doc = only_document(&fixture("sample.html"));
    assert_eq!(doc.title.as_deref(), Some("Sample HTML & Entities"));
    assert_eq!(doc.metadata["format"], "html");
    assert_eq!(
        doc.text,
        "Home\n\n# Main heading\n\n\
         First paragraph with inline markup, café, “quotes” and spaces.\n\n\
         Item one\n\nItem two\n\npreformatted\n  text"
    );
}

#[test]
fn malformed_html_still_gives_its_text() {
    let doc = only_document(&fixture("malformed.html"));
    assert_eq!(doc.title.as_deref(), Some("Broken page"));
    assert_eq!(
        doc.text,
        "Paragraph one bold never closed\n\n\
         Paragraph two © 2024 &unknown; 😀 a < b\n\ntail text"
    );
}

#[test]
fn html_declaring_latin1_is_decoded() {
    let doc = only_document(&fixture("latin1.html"));
    assert_eq!(doc.title.as_deref(), Some("Café"));
    assert_eq!(doc.text, "Naïve café “quoted”.");
}

#[test]
fn pdf() {
    let doc = only_document(&fixture("sample.pdf"));
    assert_eq!(doc.title.as_deref(), Some("A Hand-Made PDF"));
    assert_eq!(doc.metadata["format"], "pdf");
    for expected in [
        "Retrieval augmented generation.",
        "This PDF was written by hand for zrag tests.",
        "Second page text.",
        "It mentions the word aardvark.",
    ] {
        assert!(
            doc.text.contains(expected),
            "{:?} lacks {expected:?}",
            doc.text
        );
    }
}

#[test]
fn corrupt_and_mislabelled_pdfs_are_errors_naming_the_file() {
    for name in ["corrupt.pdf", "mislabelled.pdf"] {
        let path = fixture(name);
        let err = load_file(&path).unwrap_err();
        assert!(matches!(err, TextError::Pdf { .. }), "{err:?}");
        assert_eq!(err.path(), path);
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn mutated_pdfs_never_panic() {
    // Flip bytes of the valid PDF: whatever the parser makes of it, the
    // loader returns (a panic inside pdf-extract is caught).
    let original = fs::read(fixture("sample.pdf")).unwrap();
    let mut rng = common::Rng::new(7);
    for round in 0..300 {
        let mut bytes = original.clone();
        for _ in 0..1 + rng.below(8) {
            let at = 9 + rng.below(bytes.len() - 9);
            bytes[at] = rng.next_u64() as u8;
        }
        if round % 3 == 0 {
            bytes.truncate(9 + rng.below(bytes.len() - 9));
        }
        let path = PathBuf::from(format!("mutated-{round}.pdf"));
        match load_bytes(&path, Format::Pdf, &bytes, &LoadOptions::default()) {
            Ok(documents) => assert!(documents.len() <= 1),
            Err(err) => assert!(err.to_string().contains(&format!("mutated-{round}.pdf"))),
        }
    }
}

#[test]
fn jsonl_corpus() {
    let path = fixture("corpus.jsonl");
    let docs = load_file(&path).unwrap();
    let ids: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["doc1", "doc2", "3"]);
    assert!(docs.iter().all(|d| d.source == path_string(&path)));
    assert_eq!(docs[0].title.as_deref(), Some("Aardvark"));
    assert_eq!(
        docs[0].metadata,
        json!({"source": "wiki"}).as_object().unwrap().clone()
    );
    assert_eq!(docs[1].title, None);
    assert_eq!(docs[2].metadata["metadata"], json!({"year": 2020}));
}

#[test]
fn jsonl_with_a_bad_line_fails_whole_file_naming_the_line() {
    let path = fixture("bad_line.jsonl");
    let err = load_file(&path).unwrap_err();
    assert!(matches!(err, TextError::Jsonl { line: 3, .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}:3: malformed JSON", path.display())),
        "{message}"
    );
}

#[test]
fn binary_file_is_an_error() {
    let err = load_file(&fixture("binary.txt")).unwrap_err();
    assert!(
        matches!(err, TextError::Binary { offset: 7, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("binary.txt: binary file"), "{err}");
}

#[test]
fn non_utf8_is_an_error_unless_lossy() {
    let path = fixture("latin1.txt");
    let err = load_file(&path).unwrap_err();
    assert!(
        matches!(
            err,
            TextError::InvalidUtf8 {
                line: 1,
                offset: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("latin1.txt:1: not valid UTF-8"),
        "{err}"
    );
    let lossy = LoadOptions {
        lossy_utf8: true,
        ..LoadOptions::default()
    };
    let docs = load_file_with(&path, &lossy).unwrap();
    assert_eq!(
        docs[0].text,
        "Caf\u{FFFD} au lait, na\u{FFFD}ve r\u{FFFD}sum\u{FFFD}."
    );
}

#[test]
fn empty_and_blank_files_give_no_document() {
    assert!(load_file(&fixture("empty.txt")).unwrap().is_empty());
    assert!(load_file(&fixture("whitespace.md")).unwrap().is_empty());
}

#[test]
fn explicit_unknown_extension_is_an_error() {
    let err = load_file(&fixture("notes.rst")).unwrap_err();
    assert!(matches!(err, TextError::UnsupportedFormat { .. }));
    assert!(err.to_string().contains("notes.rst: unsupported file type"));
}

#[test]
fn missing_file_and_directory_as_file() {
    let err = load_file(Path::new("no/such/file.txt")).unwrap_err();
    assert!(matches!(err, TextError::Io { .. }));
    assert!(err.to_string().starts_with("no/such/file.txt: "), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let as_file = dir.path().join("folder.md");
    fs::create_dir(&as_file).unwrap();
    assert!(matches!(
        load_file(&as_file),
        Err(TextError::NotAFile { .. })
    ));
}

#[test]
fn size_limit() {
    let options = LoadOptions {
        max_file_bytes: 50,
        ..LoadOptions::default()
    };
    let err = load_file_with(&fixture("sample.txt"), &options).unwrap_err();
    assert!(
        matches!(err, TextError::TooLarge { limit: 50, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("sample.txt: 163 bytes is over the limit of 50 bytes"),
        "{err}"
    );
    // JSONL has no total limit, only a per-line one.
    let options = LoadOptions {
        max_file_bytes: 130,
        ..LoadOptions::default()
    };
    assert_eq!(
        load_file_with(&fixture("corpus.jsonl"), &options)
            .unwrap()
            .len(),
        3
    );
    let options = LoadOptions {
        max_file_bytes: 100,
        ..LoadOptions::default()
    };
    let err = load_file_with(&fixture("corpus.jsonl"), &options).unwrap_err();
    assert!(matches!(err, TextError::Jsonl { line: 1, .. }), "{err:?}");
}

#[test]
fn hashes_are_stable_and_track_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.md");
    fs::write(&path, "# T\n\nBody.\n").unwrap();
    let first = only_document(&path);
    assert_eq!(first, only_document(&path));
    // Line endings and trailing spaces do not change the content.
    fs::write(&path, "# T  \r\n\r\n\r\n\r\nBody.\r\n").unwrap();
    assert_eq!(first.content_hash, only_document(&path).content_hash);
    fs::write(&path, "# T\n\nBody!\n").unwrap();
    assert_ne!(first.content_hash, only_document(&path).content_hash);
    // Documents round-trip through JSON.
    let json = serde_json::to_string(&first).unwrap();
    assert_eq!(serde_json::from_str::<Document>(&json).unwrap(), first);
}

#[test]
fn load_paths_goes_on_past_bad_files() {
    let dir = fixture("");
    let report = load_paths(std::slice::from_ref(&dir));
    let id = |name: &str| path_string(&dir.join(name));

    let ids: Vec<&str> = report.documents.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "doc1",
            "doc2",
            "3",
            &id("latin1.html"),
            &id("malformed.html"),
            &id("sample.html"),
            &id("sample.md"),
            &id("sample.pdf"),
            &id("sample.txt"),
            &id("utf16.txt"),
        ]
    );
    let failed: Vec<String> = report
        .failures
        .iter()
        .map(|f| f.path.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        failed,
        [
            "bad_line.jsonl",
            "binary.txt",
            "corrupt.pdf",
            "latin1.txt",
            "mislabelled.pdf"
        ]
    );
    for failure in &report.failures {
        assert_eq!(failure.error.path(), failure.path);
    }
    let skipped: Vec<(String, SkipReason)> = report
        .skipped
        .iter()
        .map(|s| {
            (
                s.path.file_name().unwrap().to_str().unwrap().to_owned(),
                s.reason,
            )
        })
        .collect();
    assert_eq!(
        skipped,
        [
            ("make_pdf.py".to_owned(), SkipReason::UnsupportedExtension),
            ("notes.rst".to_owned(), SkipReason::UnsupportedExtension),
            ("empty.txt".to_owned(), SkipReason::Empty),
            ("whitespace.md".to_owned(), SkipReason::Empty),
        ]
    );
    // 15 files with a known extension: 8 loaded, 2 empty, 5 failed.
    assert_eq!(report.files_seen, 15);
}

#[test]
fn walking_a_tree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("docs");
    fs::create_dir_all(root.join("b/deep")).unwrap();
    fs::create_dir_all(root.join(".git")).unwrap();
    fs::create_dir_all(root.join(".zrag")).unwrap();
    fs::write(root.join("z.txt"), "zed").unwrap();
    fs::write(root.join("a.md"), "a").unwrap();
    fs::write(root.join("b/c.html"), "<p>c</p>").unwrap();
    fs::write(root.join("b/deep/d.txt"), "d").unwrap();
    fs::write(root.join(".hidden.txt"), "hidden").unwrap();
    fs::write(root.join(".git/config.txt"), "git").unwrap();
    fs::write(root.join(".zrag/x.txt"), "index").unwrap();
    fs::write(root.join("image.png"), [0u8, 1, 2]).unwrap();

    // Relative ids: the directory as given, joined with '/'.
    let given = PathBuf::from(format!("{}/docs", dir.path().display()));
    let report = load_paths(std::slice::from_ref(&given));
    let ids: Vec<String> = report.documents.iter().map(|d| d.id.clone()).collect();
    let expected: Vec<String> = ["a.md", "z.txt", "b/c.html", "b/deep/d.txt"]
        .iter()
        .map(|name| format!("{}/{name}", given.display()))
        .collect();
    assert_eq!(ids, expected);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.files_seen, 4);
    assert_eq!(report.skipped.len(), 1); // image.png

    // Hidden entries on request; an explicitly named hidden file always.
    let with_hidden = LoadOptions {
        include_hidden: true,
        ..LoadOptions::default()
    };
    assert_eq!(
        load_paths_with(std::slice::from_ref(&given), &with_hidden)
            .documents
            .len(),
        7
    );
    let explicit = load_paths(&[root.join(".hidden.txt")]);
    assert_eq!(explicit.documents.len(), 1);

    // A missing path and an explicit unsupported file are failures; the same
    // directory given twice is loaded once.
    let report = load_paths(&[
        root.join("missing.txt"),
        root.join("image.png"),
        given.clone(),
        given.clone(),
    ]);
    assert_eq!(report.documents.len(), 4);
    assert_eq!(report.failures.len(), 2);
    assert!(matches!(report.failures[0].error, TextError::Io { .. }));
    assert!(matches!(
        report.failures[1].error,
        TextError::UnsupportedFormat { .. }
    ));

    // discover lists the same files in the same order, without reading them.
    let discovery = discover(&[given], &LoadOptions::default());
    let listed: Vec<String> = discovery
        .files
        .iter()
        .map(|p| p.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, expected);
}

#[cfg(unix)]
#[test]
fn symlink_loops_and_dangling_links() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("a/b")).unwrap();
    fs::write(root.join("a/b/doc.txt"), "text").unwrap();
    symlink(root.join("a"), root.join("a/b/loop")).unwrap();
    symlink(root.join("nowhere.txt"), root.join("a/dangling.txt")).unwrap();
    let report = load_paths(&[root.join("a")]);
    assert_eq!(report.documents.len(), 1);
    assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
    assert!(report.failures[0].path.ends_with("dangling.txt"));

    let no_links = LoadOptions {
        follow_symlinks: false,
        ..LoadOptions::default()
    };
    let report = load_paths_with(&[root.join("a")], &no_links);
    assert_eq!(report.documents.len(), 1);
    assert!(report.failures.is_empty());
}

#[test]
fn duplicate_ids_across_files_keep_the_first() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("1.jsonl"),
        "{\"_id\":\"x\",\"text\":\"first\"}\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("2.jsonl"),
        "{\"_id\":\"x\",\"text\":\"second\"}\n{\"_id\":\"y\",\"text\":\"other\"}\n",
    )
    .unwrap();
    let report = load_paths(&[dir.path().to_path_buf()]);
    let texts: Vec<&str> = report.documents.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(texts, ["first", "other"]);
    assert_eq!(report.failures.len(), 1);
    let message = report.failures[0].error.to_string();
    assert!(
        message.contains("2.jsonl: duplicate document id \"x\" (first seen in "),
        "{message}"
    );
}

#[cfg(unix)]
#[test]
fn non_utf8_file_name_is_an_error() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(OsStr::from_bytes(b"bad\xFFname.txt"));
    fs::write(&path, "text").unwrap();
    let report = load_paths(&[dir.path().to_path_buf()]);
    assert!(report.documents.is_empty());
    assert!(matches!(
        report.failures[0].error,
        TextError::NonUtf8Path { .. }
    ));
}
