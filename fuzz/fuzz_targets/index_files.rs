//! The collection's binary side files on arbitrary bytes: the HNSW graph file
//! (`ann/hnsw-g<gen>.graph`, read by `Hnsw::from_bytes` / `HnswFile::open`) and the compact
//! vector copies (`vectors.f16` / `vectors.i8`, read by `QuantizedView::from_bytes`).
//! Byte 0 picks the reader; the rest is the file.
//!
//! Both readers promise to validate completely, so that a damaged file is an error and never
//! an out-of-bounds access later. So after a successful read this target uses the result as
//! the collection would: it searches the graph (and extends it with new nodes, as a commit
//! does) over made-up vectors, checks the graph's write/read round trip, and decodes every
//! row of the vector copy.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use zrag_index::exact::quantized::QuantizedView;
use zrag_index::hnsw::{FlatVectors, Hnsw};

const DIM: usize = 3;

/// A made-up vector per node (the graph file stores none).
fn vectors(n: usize) -> Vec<f32> {
    (0..n * DIM)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    if selector % 2 == 0 {
        hnsw(bytes);
    } else {
        quantized(bytes);
    }
});

fn hnsw(bytes: &[u8]) {
    let path = Path::new("hnsw-g1.graph");
    let Ok(graph) = Hnsw::from_bytes(bytes, path) else {
        return;
    };
    let image = graph.to_bytes();
    let again = Hnsw::from_bytes(&image, path).expect("a written graph reads back");
    assert_eq!(again, graph);

    let n = graph.len();
    let data = vectors(n + 3);
    let existing = FlatVectors::new(&data[..n * DIM], DIM);
    let query = [0.5, -0.25, 1.0];
    let hits = graph.search(&existing, &query, 5, 16);
    assert!(hits.len() <= 5.min(n));
    assert!(hits.iter().all(|h| (h.row as usize) < n));

    // A commit extends the stored graph with the rows of new segments.
    let mut extended = graph;
    let all = FlatVectors::new(&data, DIM);
    extended.extend(&all, 1, &|node| node % 3 == 2, None);
    assert_eq!(extended.len(), n + 3);
    let _ = extended.search(&all, &query, 5, 16);
}

fn quantized(bytes: &[u8]) {
    let Ok(view) = QuantizedView::from_bytes(bytes) else {
        return;
    };
    let (rows, dim) = (view.rows(), view.dim());
    assert!(rows.saturating_mul(dim) <= bytes.len());
    match view {
        QuantizedView::F16(v) => {
            let mut out = vec![0.0f32; dim];
            for row in 0..rows {
                v.decode_row(row, &mut out);
            }
        }
        QuantizedView::Int8(v) => {
            for row in 0..rows {
                assert_eq!(v.codes(row).len(), dim);
                let _ = v.scale(row);
            }
        }
    }
}
