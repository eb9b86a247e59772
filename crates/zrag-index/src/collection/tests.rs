//! Collection behaviour: commits, replacement, deletion, snapshots, crash leftovers, corruption.

use super::writer::files_under;
use super::*;

const DIM: usize = 4;

fn info() -> EmbeddingInfo {
    EmbeddingInfo {
        name: "test-model".into(),
        sha256: "0".repeat(64),
        dim: DIM,
    }
}

/// A document whose i-th chunk has a vector pointing mostly along axis `axis`.
fn doc(id: &str, hash: &str, n_chunks: usize, axis: usize) -> NewDocument {
    let chunks = (0..n_chunks)
        .map(|i| NewChunk {
            chunk_id: format!("{id}#{i}"),
            ordinal: i as u32,
            text: format!("{id} chunk {i}"),
            start_byte: i * 10,
            end_byte: i * 10 + 9,
        })
        .collect();
    let mut vectors = Vec::new();
    for i in 0..n_chunks {
        let mut v = [0.1f32; DIM];
        v[axis % DIM] = 1.0 + i as f32 * 0.01;
        vectors.extend_from_slice(&v);
    }
    NewDocument {
        id: id.into(),
        source: format!("/src/{id}.txt"),
        title: Some(id.to_uppercase()),
        content_hash: hash.into(),
        metadata: Default::default(),
        chunks,
        vectors,
    }
}

fn hit_doc_ids(snapshot: &Snapshot, query: &[f32], k: usize) -> Vec<String> {
    snapshot.search(query, k).unwrap()[0]
        .iter()
        .map(|h| snapshot.chunk(h.segment, h.row).unwrap().doc_id)
        .collect()
}

#[test]
fn commit_search_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let collection = Collection::open_or_create(dir.path().join("c")).unwrap();
    let mut writer = collection.writer().unwrap();
    writer.ensure_embedding(&info()).unwrap();
    writer.upsert(doc("a", "h1", 2, 0)).unwrap();
    writer.upsert(doc("b", "h2", 3, 1)).unwrap();
    // Nothing is visible before the commit.
    assert_eq!(collection.snapshot().unwrap().num_live_chunks(), 0);
    let stats = writer.commit().unwrap();
    assert_eq!(stats.chunks_written, 5);
    drop(writer);

    let snapshot = Collection::open(dir.path().join("c"))
        .unwrap()
        .snapshot()
        .unwrap();
    assert_eq!(snapshot.num_documents(), 2);
    assert_eq!(snapshot.num_live_chunks(), 5);
    assert_eq!(
        hit_doc_ids(&snapshot, &[0.0, 1.0, 0.0, 0.0], 3),
        ["b", "b", "b"]
    );
    let top = snapshot.search(&[1.0, 0.0, 0.0, 0.0], 1).unwrap();
    let chunk = snapshot.chunk(top[0][0].segment, top[0][0].row).unwrap();
    assert_eq!(chunk.chunk_id, "a#1");
    assert_eq!(chunk.text, "a chunk 1");
    assert_eq!(snapshot.document("a").unwrap().title.as_deref(), Some("A"));
    assert_eq!(snapshot.document_chunks("b").unwrap().len(), 3);
}

#[test]
fn replacing_and_deleting_hide_old_rows_and_keep_snapshots_stable() {
    let dir = tempfile::tempdir().unwrap();
    let collection = Collection::open_or_create(dir.path()).unwrap();
    let mut writer = collection.writer().unwrap();
    writer.ensure_embedding(&info()).unwrap();
    writer.upsert(doc("a", "h1", 2, 0)).unwrap();
    writer.upsert(doc("b", "h2", 1, 1)).unwrap();
    writer.commit().unwrap();
    let before = collection.snapshot().unwrap();

    // Replace a with a version along axis 2, delete b.
    writer.upsert(doc("a", "h3", 1, 2)).unwrap();
    assert!(writer.delete("b"));
    assert!(!writer.delete("nope"));
    writer.commit().unwrap();

    let after = collection.snapshot().unwrap();
    assert_eq!(after.num_documents(), 1);
    assert_eq!(after.num_live_chunks(), 1);
    assert_eq!(hit_doc_ids(&after, &[1.0, 0.0, 0.0, 0.0], 10), ["a"]);
    assert_eq!(after.document("a").unwrap().content_hash, "h3");
    assert!(after.document("b").is_none());
    // The old snapshot still sees its own state, files and all, after garbage collection.
    assert_eq!(before.num_live_chunks(), 3);
    assert_eq!(
        hit_doc_ids(&before, &[0.0, 1.0, 0.0, 0.0], 1),
        ["b"],
        "old snapshot must keep reading deleted files"
    );
    // Segment of b's and a's old rows is fully deleted and gone from disk.
    let files = files_under(dir.path());
    assert!(
        !files.keys().any(|f| f.starts_with("segments/seg-00000001")),
        "{files:?}"
    );
}

#[test]
fn interrupted_commit_leaves_previous_state_and_is_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let collection = Collection::open_or_create(dir.path()).unwrap();
    let mut writer = collection.writer().unwrap();
    writer.ensure_embedding(&info()).unwrap();
    writer.upsert(doc("a", "h1", 2, 0)).unwrap();
    writer.commit().unwrap();
    drop(writer);
    let committed = files_under(dir.path());

    // Simulate a crash after a segment and a document table were written, before the manifest.
    std::fs::create_dir_all(dir.path().join("segments/seg-00000009")).unwrap();
    std::fs::write(dir.path().join("segments/seg-00000009/vectors.f32"), b"xx").unwrap();
    std::fs::write(dir.path().join("docs/docs-g9.jsonl"), b"{}").unwrap();
    std::fs::write(dir.path().join("MANIFEST.tmp"), b"{half").unwrap();

    let snapshot = collection.snapshot().unwrap();
    assert_eq!(snapshot.num_documents(), 1);
    let _writer = collection.writer().unwrap();
    assert_eq!(files_under(dir.path()), committed);
    assert!(!dir.path().join("MANIFEST.tmp").exists());
}

#[test]
fn corrupt_and_truncated_files_are_named_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let collection = Collection::open_or_create(dir.path()).unwrap();
    let mut writer = collection.writer().unwrap();
    writer.ensure_embedding(&info()).unwrap();
    writer.upsert(doc("a", "h1", 3, 0)).unwrap();
    writer.commit().unwrap();
    drop(writer);

    let vectors = dir.path().join("segments/seg-00000001/vectors.f32");
    let original = std::fs::read(&vectors).unwrap();
    let mut flipped = original.clone();
    flipped[5] ^= 0x40;
    std::fs::write(&vectors, &flipped).unwrap();
    let err = collection.snapshot().unwrap_err().to_string();
    assert!(
        err.contains("vectors.f32") && err.contains("checksum"),
        "{err}"
    );

    std::fs::write(&vectors, &original[..original.len() - 4]).unwrap();
    let err = collection.snapshot().unwrap_err().to_string();
    assert!(
        err.contains("vectors.f32") && err.contains("truncated"),
        "{err}"
    );

    std::fs::write(&vectors, &original).unwrap();
    let chunks = dir.path().join("segments/seg-00000001/chunks.jsonl");
    std::fs::remove_file(&chunks).unwrap();
    let err = collection.snapshot().unwrap_err().to_string();
    assert!(err.contains("chunks.jsonl"), "{err}");
}

#[test]
fn one_writer_at_a_time_and_model_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let collection = Collection::open_or_create(dir.path()).unwrap();
    let mut writer = collection.writer().unwrap();
    assert!(matches!(
        collection.writer(),
        Err(crate::IndexError::Locked { .. })
    ));
    writer.ensure_embedding(&info()).unwrap();
    writer.commit().unwrap();
    let other = EmbeddingInfo {
        name: "other".into(),
        ..info()
    };
    assert!(matches!(
        writer.ensure_embedding(&other),
        Err(crate::IndexError::ModelMismatch { .. })
    ));
    drop(writer);
    // The embedding model alone was committed.
    assert_eq!(collection.snapshot().unwrap().embedding(), Some(&info()));
    // Wrong vector sizes are errors, not panics.
    let mut writer = collection.writer().unwrap();
    let mut bad = doc("x", "h", 2, 0);
    bad.vectors.pop();
    assert!(writer.upsert(bad).is_err());
}

#[test]
fn search_across_many_segments_matches_brute_force() {
    let dir = tempfile::tempdir().unwrap();
    let collection = Collection::open_or_create(dir.path()).unwrap();
    let mut writer = collection.writer().unwrap();
    writer.ensure_embedding(&info()).unwrap();
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let mut all: std::collections::BTreeMap<String, Vec<Vec<f32>>> = Default::default();
    for batch in 0..5 {
        for d in 0..7 {
            let id = format!("d{}", (batch * 3 + d) % 20); // some ids are replaced later
            let mut nd = doc(&id, &format!("h{batch}"), 1 + d % 3, 0);
            nd.vectors = (0..nd.chunks.len() * DIM).map(|_| next()).collect();
            all.insert(
                id.clone(),
                nd.vectors.chunks(DIM).map(|c| c.to_vec()).collect(),
            );
            writer.upsert(nd).unwrap();
        }
        if batch == 3 {
            writer.delete("d4");
            all.remove("d4");
        }
        writer.commit().unwrap();
    }
    let snapshot = collection.snapshot().unwrap();
    let query: Vec<f32> = (0..DIM).map(|_| next()).collect();
    let query_ref = &query;
    let mut expected: Vec<(f32, String)> = all
        .iter()
        .flat_map(|(id, vs)| {
            vs.iter().enumerate().map(move |(i, v)| {
                (
                    v.iter().zip(query_ref).map(|(a, b)| a * b).sum::<f32>(),
                    format!("{id}#{i}"),
                )
            })
        })
        .collect();
    expected.sort_by(|a, b| b.0.total_cmp(&a.0));
    let got: Vec<String> = snapshot.search(&query, 10).unwrap()[0]
        .iter()
        .map(|h| snapshot.chunk(h.segment, h.row).unwrap().chunk_id)
        .collect();
    let want: Vec<String> = expected.iter().take(10).map(|e| e.1.clone()).collect();
    assert_eq!(got, want);
    assert_eq!(
        snapshot.num_live_chunks() as usize,
        all.values().map(|v| v.len()).sum::<usize>()
    );
}
