//! Helpers shared by the end-to-end tests: run the `zrag` binary, check its output, copy the
//! sample corpus.

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Runs `zrag --collection <collection> --json <args>`.
pub fn zrag(collection: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zrag"))
        .arg("--collection")
        .arg(collection)
        .arg("--json")
        .args(args)
        .output()
        .expect("run zrag")
}

/// The stdout of a successful run (the test fails with stderr otherwise).
pub fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "zrag failed ({:?}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The JSON a successful run printed.
pub fn json_ok(output: &Output) -> Value {
    serde_json::from_str(&ok(output)).expect("zrag prints JSON")
}

pub fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../samples/corpus")
}

/// A private copy of the sample corpus that a test may edit.
pub fn sample_copy(dir: &Path) -> PathBuf {
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    for entry in std::fs::read_dir(samples()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), corpus.join(entry.file_name())).unwrap();
    }
    corpus
}
