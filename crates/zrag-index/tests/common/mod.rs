//! Synthetic documents and vectors shared by the store tests.
#![allow(dead_code)]

use zrag_index::collection::{EmbeddingInfo, NewChunk, NewDocument};

pub const DIM: usize = 32;

pub fn model() -> EmbeddingInfo {
    EmbeddingInfo {
        name: "synthetic".into(),
        sha256: "0".repeat(64),
        dim: DIM,
    }
}

/// xorshift64*: deterministic vectors without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn vector(&mut self) -> Vec<f32> {
        let v: Vec<f32> = (0..DIM).map(|_| self.unit()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect()
    }
}

pub const WORDS: &[&str] = &[
    "river", "mountain", "copper", "violin", "harbour", "lantern", "orchard", "glacier", "meadow",
    "falcon", "granite", "saffron", "compass", "thunder", "willow", "ember",
];

pub fn document(i: usize, chunks: usize, rng: &mut Rng) -> NewDocument {
    let ext = if i.is_multiple_of(3) { "md" } else { "txt" };
    let mut metadata = serde_json::Map::new();
    metadata.insert(
        "lang".into(),
        (if i.is_multiple_of(4) { "fr" } else { "en" }).into(),
    );
    metadata.insert("year".into(), (1900 + i as i64).into());
    let chunks: Vec<NewChunk> = (0..chunks)
        .map(|c| {
            let text: Vec<&str> = (0..12)
                .map(|_| WORDS[(rng.next() % WORDS.len() as u64) as usize])
                .collect();
            NewChunk {
                chunk_id: format!("doc-{i}#{c}"),
                ordinal: c as u32,
                text: text.join(" "),
                start_byte: c * 100,
                end_byte: c * 100 + 90,
            }
        })
        .collect();
    let vectors = (0..chunks.len()).flat_map(|_| rng.vector()).collect();
    NewDocument {
        id: format!("doc-{i}"),
        source: format!("docs/{i}.{ext}"),
        title: Some(format!("Doc {i}")),
        content_hash: format!("hash-{i}-{}", rng.next()),
        metadata,
        chunks,
        vectors,
    }
}
