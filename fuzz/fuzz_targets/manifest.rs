//! The collection manifest reader, `Manifest::parse`, on arbitrary bytes: it must return an
//! error, never panic. A manifest it accepts must survive what readers do next: describing
//! the embedding model (`zrag status`), and a write/parse round trip to the same value.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use zrag_index::collection::Manifest;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("MANIFEST");
    let Ok(manifest) = Manifest::parse(path, data) else {
        return;
    };
    if let Some(embedding) = &manifest.embedding {
        let _ = embedding.describe();
    }
    let bytes = serde_json::to_vec_pretty(&manifest).expect("a parsed manifest serialises");
    let again = Manifest::parse(path, &bytes).expect("a written manifest parses");
    assert_eq!(again, manifest);
});
