//! The collection's BM25 index follows every commit (upserts, replacements, deletions), is
//! rebuilt when it does not match the manifest, and never returns a row its snapshot lacks.

use super::*;
use crate::filter::Filter;

const DIM: usize = 8;

fn info() -> EmbeddingInfo {
    EmbeddingInfo {
        name: "test-model".into(),
        sha256: "0".repeat(64),
        dim: DIM,
    }
}

/// A one-chunk document whose text is `text`.
fn doc(id: &str, source: &str, text: &str) -> NewDocument {
    let mut vector = vec![0.0f32; DIM];
    vector[id.len() % DIM] = 1.0;
    NewDocument {
        id: id.into(),
        source: source.into(),
        title: None,
        content_hash: format!("hash of {text}"),
        metadata: Default::default(),
        chunks: vec![NewChunk {
            chunk_id: format!("{id}#0"),
            ordinal: 0,
            text: text.into(),
            start_byte: 0,
            end_byte: text.len(),
        }],
        vectors: vector,
    }
}

/// Document ids of the BM25 top-`k` for `query`.
fn bm25_ids(collection: &Collection, query: &str, k: usize) -> Vec<String> {
    let snapshot = collection.snapshot().unwrap();
    snapshot
        .bm25_search(query, k, None)
        .unwrap()
        .iter()
        .map(|h| snapshot.chunk(h.segment, h.row).unwrap().doc_id)
        .collect()
}

#[test]
fn bm25_follows_upserts_replacements_and_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let collection = Collection::open_or_create(dir.path().join("c")).unwrap();
    let mut writer = collection.writer().unwrap();
    writer.ensure_embedding(&info()).unwrap();
    writer
        .upsert(doc("a", "/a.txt", "the aardvark digs burrows at night"))
        .unwrap();
    writer
        .upsert(doc("b", "/b.txt", "a badger also digs, but in the day"))
        .unwrap();
    writer
        .upsert(doc("c", "/c.txt", "cormorants dive for fish"))
        .unwrap();
    writer.commit().unwrap();
    assert_eq!(bm25_ids(&collection, "aardvark", 10), ["a"]);
    // Stemming: "digging" matches "digs"; the rarer extra term ranks "a" first.
    assert_eq!(bm25_ids(&collection, "digging at night", 10), ["a", "b"]);

    // A replacement removes the old text from BM25 and adds the new one.
    writer
        .upsert(doc("a", "/a.txt", "the anteater eats termites"))
        .unwrap();
    writer.commit().unwrap();
    assert!(bm25_ids(&collection, "aardvark", 10).is_empty());
    assert_eq!(bm25_ids(&collection, "termites", 10), ["a"]);
    assert_eq!(bm25_ids(&collection, "digs", 10), ["b"]);

    // A deletion removes it.
    let snapshot_before_delete = collection.snapshot().unwrap();
    assert!(writer.delete("b"));
    writer.commit().unwrap();
    assert!(bm25_ids(&collection, "badger", 10).is_empty());
    // A snapshot taken before the deletion still only returns rows it holds.
    for hit in snapshot_before_delete
        .bm25_search("digs", 10, None)
        .unwrap()
    {
        snapshot_before_delete.chunk(hit.segment, hit.row).unwrap();
    }

    // Reopening finds the index in step; new commits keep working.
    drop(writer);
    let collection = Collection::open(dir.path().join("c")).unwrap();
    let mut writer = collection.writer().unwrap();
    writer
        .upsert(doc("d", "/d.txt", "dolphins and cormorants both fish"))
        .unwrap();
    writer.commit().unwrap();
    assert_eq!(bm25_ids(&collection, "cormorants fish", 10).len(), 2);
    assert_eq!(bm25_ids(&collection, "dolphins", 10), ["d"]);
}

#[test]
fn a_missing_or_stale_bm25_index_is_rebuilt_by_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let collection = Collection::open_or_create(&path).unwrap();
    {
        let mut writer = collection.writer().unwrap();
        writer.ensure_embedding(&info()).unwrap();
        for i in 0..30 {
            let text = format!("entry number{i} about topic{}", i % 3);
            writer
                .upsert(doc(&format!("d{i}"), &format!("/d{i}.txt"), &text))
                .unwrap();
        }
        writer.commit().unwrap();
    }
    let expected = bm25_ids(&collection, "topic1", 100);
    assert_eq!(expected.len(), 10);

    // Lost entirely (e.g. a collection from before BM25, or removed by hand): a snapshot
    // says so by name, and the next writer rebuilds it from the segments.
    std::fs::remove_dir_all(path.join("bm25")).unwrap();
    let err = collection
        .snapshot()
        .unwrap()
        .bm25_search("topic1", 5, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bm25"), "{err}");
    drop(collection.writer().unwrap());
    let mut rebuilt = bm25_ids(&collection, "topic1", 100);
    let mut want = expected.clone();
    rebuilt.sort();
    want.sort();
    assert_eq!(rebuilt, want);

    // Behind the manifest (a crash between the manifest rename and the BM25 commit): a
    // BM25 index copied from an older generation is detected and rebuilt.
    let old_bm25 = dir.path().join("old-bm25");
    copy_dir(&path.join("bm25"), &old_bm25);
    {
        let mut writer = collection.writer().unwrap();
        assert!(writer.delete("d1"));
        writer
            .upsert(doc("new", "/new.txt", "a fresh entry about topic1"))
            .unwrap();
        writer.commit().unwrap();
    }
    std::fs::remove_dir_all(path.join("bm25")).unwrap();
    copy_dir(&old_bm25, &path.join("bm25"));
    drop(collection.writer().unwrap());
    let ids = bm25_ids(&collection, "topic1", 100);
    assert_eq!(ids.len(), 10);
    assert!(ids.contains(&"new".to_string()) && !ids.contains(&"d1".to_string()));
}

#[test]
fn bm25_search_applies_metadata_filters() {
    let dir = tempfile::tempdir().unwrap();
    let collection = Collection::open_or_create(dir.path().join("c")).unwrap();
    let mut writer = collection.writer().unwrap();
    writer.ensure_embedding(&info()).unwrap();
    for i in 0..40 {
        let folder = if i % 4 == 0 { "keep" } else { "skip" };
        writer
            .upsert(doc(
                &format!("d{i}"),
                &format!("/{folder}/d{i}.md"),
                "shared words in every document",
            ))
            .unwrap();
    }
    writer.commit().unwrap();
    let snapshot = collection.snapshot().unwrap();
    let filter = snapshot.filter_rows(&Filter::parse(&["source=/keep/*"]).unwrap());
    let hits = snapshot
        .bm25_search("shared words", 100, Some(&filter))
        .unwrap();
    assert_eq!(hits.len(), 10);
    for hit in hits {
        let chunk = snapshot.chunk(hit.segment, hit.row).unwrap();
        let number: usize = chunk.doc_id[1..].parse().unwrap();
        assert_eq!(number % 4, 0, "{} passed the filter", chunk.doc_id);
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}
