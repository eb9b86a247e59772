//! The collection's HNSW graph and filters: maintained by commits, equal to exact search
//! where it must be, never returning deleted or filtered rows.

use super::*;
use crate::filter::Filter;

const DIM: usize = 32;

fn info() -> EmbeddingInfo {
    EmbeddingInfo {
        name: "test-model".into(),
        sha256: "0".repeat(64),
        dim: DIM,
    }
}

/// Deterministic unit vectors in 12 clusters.
fn vector(seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xABCD;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let cluster = seed % 12;
    let v: Vec<f32> = (0..DIM)
        .map(|d| if d as u64 % 12 == cluster { 2.0 } else { 0.0 } + next())
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

/// Document `i` has 3 chunks; every 10th document is in French (a metadata field).
fn doc(i: u64) -> NewDocument {
    let id = format!("d{i:05}");
    let chunks = (0..3)
        .map(|c| NewChunk {
            chunk_id: format!("{id}#{c}"),
            ordinal: c,
            text: format!("{id} chunk {c}"),
            start_byte: 0,
            end_byte: 1,
        })
        .collect();
    let vectors = (0..3).flat_map(|c| vector(i * 3 + c)).collect();
    let lang = if i.is_multiple_of(10) { "fr" } else { "en" };
    NewDocument {
        id: id.clone(),
        source: format!("/corpus/{lang}/{id}.txt"),
        title: None,
        content_hash: "h".into(),
        metadata: serde_json::json!({ "lang": lang })
            .as_object()
            .unwrap()
            .clone(),
        chunks,
        vectors,
    }
}

fn ids(snapshot: &Snapshot, hits: &[ChunkHit]) -> Vec<String> {
    hits.iter()
        .map(|h| snapshot.chunk(h.segment, h.row).unwrap().chunk_id)
        .collect()
}

fn overlap(a: &[String], b: &[String]) -> usize {
    a.iter().filter(|x| b.contains(x)).count()
}

fn exact(snapshot: &Snapshot, q: &[f32], k: usize, filter: Option<&RowFilter>) -> Vec<ChunkHit> {
    let options = SearchOptions {
        exact: true,
        filter,
        ..SearchOptions::default()
    };
    snapshot.search_with(q, k, options).unwrap().remove(0)
}

#[test]
fn commits_build_and_extend_the_graph_and_search_matches_exact() {
    let dir = tempfile::tempdir().unwrap();
    let collection = Collection::open_or_create(dir.path().join("c")).unwrap();
    let mut writer = collection.writer().unwrap();
    writer.ensure_embedding(&info()).unwrap();
    writer.set_ann_settings(true, 12, 80, 1000);
    for i in 0..300 {
        writer.upsert(doc(i)).unwrap();
    }
    writer.commit().unwrap();
    // 900 rows: below min_rows, so no graph.
    assert_eq!(collection.snapshot().unwrap().ann_rows(), None);
    for i in 300..700 {
        writer.upsert(doc(i)).unwrap();
    }
    writer.commit().unwrap();
    let first = collection.manifest().unwrap().ann.graph.unwrap();
    assert_eq!(collection.snapshot().unwrap().ann_rows(), Some(2100));
    // A later commit extends the graph over the new segment.
    for i in 700..1000 {
        writer.upsert(doc(i)).unwrap();
    }
    writer.commit().unwrap();
    let second = collection.manifest().unwrap().ann.graph.unwrap();
    assert_eq!(second.segments[..2], first.segments[..]);
    assert_eq!(second.segments.len(), 3);
    assert!(
        !dir.path().join("c/ann").join(&first.file.name).exists(),
        "the old graph file is swept"
    );

    let snapshot = collection.snapshot().unwrap();
    assert_eq!(snapshot.ann_rows(), Some(3000));
    let mut found = 0;
    for q in 0..40u64 {
        let query = vector(10_000 + q);
        let approx = snapshot.search(&query, 10).unwrap().remove(0);
        let truth = exact(&snapshot, &query, 10, None);
        for h in &approx {
            let v = snapshot.vector(h.segment, h.row).unwrap();
            assert_eq!(h.score, crate::exact::dot(&query, v), "scores are exact");
        }
        found += overlap(&ids(&snapshot, &approx), &ids(&snapshot, &truth));
    }
    let recall = found as f64 / 400.0;
    assert!(recall >= 0.95, "recall@10 through the collection: {recall}");
}

#[test]
fn deleted_rows_are_never_returned_and_many_deletions_rebuild_the_graph() {
    let dir = tempfile::tempdir().unwrap();
    let collection = Collection::open_or_create(dir.path().join("c")).unwrap();
    let mut writer = collection.writer().unwrap();
    writer.ensure_embedding(&info()).unwrap();
    writer.set_ann_settings(true, 12, 80, 100);
    for i in 0..400 {
        writer.upsert(doc(i)).unwrap();
    }
    writer.commit().unwrap();
    let built = collection.manifest().unwrap().ann.graph.unwrap();
    // Delete 20%: the graph is kept (same file), deleted rows are filtered.
    for i in (0..400).filter(|i| i % 5 == 1) {
        assert!(writer.delete(&format!("d{i:05}")));
    }
    writer.commit().unwrap();
    assert_eq!(collection.manifest().unwrap().ann.graph.unwrap(), built);
    let snapshot = collection.snapshot().unwrap();
    for q in 0..30u64 {
        let hits = snapshot.search(&vector(q * 7), 20).unwrap().remove(0);
        assert_eq!(hits.len(), 20);
        for id in ids(&snapshot, &hits) {
            let n: u64 = id[1..6].parse().unwrap();
            assert_ne!(n % 5, 1, "deleted chunk {id} returned");
        }
    }
    // Past the dead fraction the graph is rebuilt from live rows only.
    for i in (0..400).filter(|i| i % 5 == 2) {
        writer.delete(&format!("d{i:05}"));
    }
    writer.commit().unwrap();
    let rebuilt = collection.manifest().unwrap().ann.graph.unwrap();
    assert_ne!(rebuilt.file.name, built.file.name);
    let snapshot = collection.snapshot().unwrap();
    let hits = snapshot.search(&vector(5), 10).unwrap().remove(0);
    let truth = exact(&snapshot, &vector(5), 10, None);
    assert!(overlap(&ids(&snapshot, &hits), &ids(&snapshot, &truth)) >= 9);
}

#[test]
fn filters_apply_inside_the_search_and_selective_ones_fall_back_to_exact() {
    let dir = tempfile::tempdir().unwrap();
    let collection = Collection::open_or_create(dir.path().join("c")).unwrap();
    let mut writer = collection.writer().unwrap();
    writer.ensure_embedding(&info()).unwrap();
    writer.set_ann_settings(true, 12, 80, 100);
    for i in 0..1000 {
        writer.upsert(doc(i)).unwrap();
    }
    // One rare document: 3 of 3000 rows pass its filter (0.1%).
    let mut rare = doc(5000);
    rare.source = "/special/rare.txt".into();
    writer.upsert(rare).unwrap();
    writer.commit().unwrap();
    let snapshot = collection.snapshot().unwrap();
    assert!(snapshot.ann_rows().is_some());

    // 10% French (the rare document too) is above the exact-fallback threshold: the graph
    // search runs with the filter inside; every hit passes and recall stays high.
    let french = snapshot.filter_rows(&Filter::parse(&["lang=fr"]).unwrap());
    assert_eq!(french.allowed_rows(), 303);
    let mut found = 0;
    for q in 0..30u64 {
        let query = vector(20_000 + q);
        let options = SearchOptions {
            filter: Some(&french),
            ..SearchOptions::default()
        };
        let hits = snapshot.search_with(&query, 10, options).unwrap().remove(0);
        assert_eq!(hits.len(), 10, "a filtered search still returns k hits");
        for h in &hits {
            let chunk = snapshot.chunk(h.segment, h.row).unwrap();
            let doc = snapshot.document(&chunk.doc_id).unwrap();
            assert_eq!(doc.metadata["lang"], "fr");
        }
        let truth = exact(&snapshot, &query, 10, Some(&french));
        found += overlap(&ids(&snapshot, &hits), &ids(&snapshot, &truth));
    }
    assert!(
        found as f64 / 300.0 >= 0.9,
        "filtered recall {}",
        found as f64 / 300.0
    );

    // Very selective: exact fallback, so the result is exactly the matching rows.
    let rare = snapshot.filter_rows(&Filter::parse(&["source=/special/*"]).unwrap());
    assert_eq!(rare.allowed_rows(), 3);
    assert!((rare.allowed_rows() as f64) / 3003.0 < FILTER_EXACT_BELOW);
    let options = SearchOptions {
        filter: Some(&rare),
        ..SearchOptions::default()
    };
    let hits = snapshot
        .search_with(&vector(1), 10, options)
        .unwrap()
        .remove(0);
    assert_eq!(hits.len(), 3);
    assert!(ids(&snapshot, &hits)
        .iter()
        .all(|id| id.starts_with("d05000")));
    assert_eq!(hits, exact(&snapshot, &vector(1), 10, Some(&rare)));
    // A filter nothing passes returns nothing rather than an error.
    let no_match = snapshot.filter_rows(&Filter::parse(&["lang=de"]).unwrap());
    let options = SearchOptions {
        filter: Some(&no_match),
        ..SearchOptions::default()
    };
    assert!(snapshot.search_with(&vector(1), 10, options).unwrap()[0].is_empty());
}

#[test]
fn a_damaged_graph_file_is_named_on_open_and_old_manifests_get_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let collection = Collection::open_or_create(&path).unwrap();
    let mut writer = collection.writer().unwrap();
    writer.ensure_embedding(&info()).unwrap();
    writer.set_ann_settings(true, 8, 40, 10);
    for i in 0..20 {
        writer.upsert(doc(i)).unwrap();
    }
    writer.commit().unwrap();
    drop(writer);
    let graph = collection.manifest().unwrap().ann.graph.unwrap();
    let file = path.join("ann").join(&graph.file.name);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let err = collection.snapshot().unwrap_err().to_string();
    assert!(err.contains(&graph.file.name), "{err}");

    // A manifest written before the ann field existed reads with the default settings.
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path.join(MANIFEST_FILE)).unwrap()).unwrap();
    value.as_object_mut().unwrap().remove("ann");
    let manifest = Manifest::parse(
        &path.join(MANIFEST_FILE),
        &serde_json::to_vec(&value).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest.ann, AnnState::default());
}

#[test]
fn f16_and_int8_scans_rescore_exactly_and_follow_precision_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c");
    let collection = Collection::open_or_create(&path).unwrap();
    let mut writer = collection.writer().unwrap();
    writer.ensure_embedding(&info()).unwrap();
    writer.set_ann_settings(false, 16, 100, 1_000_000);
    for i in 0..200 {
        writer.upsert(doc(i)).unwrap();
    }
    writer.commit().unwrap();
    let queries: Vec<Vec<f32>> = (0..30u64).map(|q| vector(50_000 + q)).collect();

    for precision in [VectorPrecision::Int8, VectorPrecision::F16] {
        // Switching precision writes the compact copy of the existing segment; a new
        // segment gets one when it is written.
        writer.set_precision(precision);
        assert!(writer.has_changes());
        writer.commit().unwrap();
        for i in 200..210 {
            writer.upsert(doc(i)).unwrap();
        }
        writer.commit().unwrap();
        assert!(writer.delete(&format!("d{:05}", 205)));
        writer.commit().unwrap();
        let manifest = collection.manifest().unwrap();
        assert_eq!(manifest.precision, precision);
        let name = segment::quantized_file(precision).unwrap();
        for entry in &manifest.segments {
            assert!(entry.files.contains_key(name), "{} lacks {name}", entry.id);
            assert!(path.join("segments").join(&entry.id).join(name).exists());
        }

        let snapshot = collection.snapshot().unwrap();
        let mut found = 0;
        for q in &queries {
            let want = brute_force_ids(&snapshot, q, 10);
            let hits = exact(&snapshot, q, 10, None);
            for h in &hits {
                // The streaming f32 kernel's summation order, so equal to the last bits only
                // up to rounding.
                let v = snapshot.vector(h.segment, h.row).unwrap();
                let f32_score = crate::exact::dot(q, v);
                assert!(
                    (h.score - f32_score).abs() <= 1e-6,
                    "{} vs {f32_score}",
                    h.score
                );
                let id = snapshot.chunk(h.segment, h.row).unwrap().doc_id;
                assert_ne!(id, "d00205", "a deleted row came back");
            }
            let got = ids(&snapshot, &hits);
            found += overlap(&got, &want);
            assert!(
                overlap(&got, &want) >= 8,
                "{precision}: {got:?} vs {want:?}"
            );
        }
        assert!(
            found >= 295,
            "{precision}: {found}/300 of the f32 top-10 found"
        );
        for i in 200..210 {
            writer.delete(&format!("d{i:05}"));
        }
        writer.commit().unwrap();
    }

    // A damaged compact copy is named on open.
    let manifest = collection.manifest().unwrap();
    let entry = &manifest.segments[0];
    let file = path.join("segments").join(&entry.id).join("vectors.f16");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 0xFF;
    std::fs::write(&file, bytes).unwrap();
    let err = collection.snapshot().err().unwrap().to_string();
    assert!(err.contains("vectors.f16"), "{err}");
}

/// The exact top-`k` chunk ids by a plain loop over every live row.
fn brute_force_ids(snapshot: &Snapshot, q: &[f32], k: usize) -> Vec<String> {
    let mut scored = Vec::new();
    for (segment, reader) in snapshot.segments().iter().enumerate() {
        for row in 0..reader.rows {
            if reader.is_live(row) {
                let v = snapshot.vector(segment as u32, row).unwrap();
                let score: f64 = q
                    .iter()
                    .zip(v)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                scored.push((score, segment as u32, row));
            }
        }
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored
        .iter()
        .take(k)
        .map(|&(_, segment, row)| snapshot.chunk(segment, row).unwrap().chunk_id)
        .collect()
}
