//! The int8 encoder path against f32 on the real all-MiniLM-L6-v2: the accuracy bound that
//! `EncoderPrecision::Int8` promises (BENCHMARKS.md: min cosine 0.995 on 1,792 benchmark
//! texts; this test allows 0.99 on its own mix of short, long, non-English and odd texts).
//! Needs the model (`scripts/fetch-models.sh`).

use zrag_models::{default_encoder_dir, BertEncoder, EncoderPrecision};

const MIN_COSINE: f32 = 0.99;

fn texts() -> Vec<String> {
    let mut texts: Vec<String> = [
        "a",
        "Hello world",
        "What is the capital of France?",
        "Paris is the capital and most populous city of France.",
        "a program devoted to current events, often using interviews and commentary",
        "Apple (n.): the fleshy usually rounded red, yellow, or green edible pome fruit.",
        "To give up one's office or position; to resign.",
        "Crème brûlée, naïve café, façade, jalapeño, São Paulo, Zürich.",
        "Москва — столица России.",
        "東京は日本の首都です。",
        "fn main() { println!(\"{}\", 1 + 2); }",
        "1234567890 3.14159 2.71828 1e-9",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    texts.push(
        "The Amazon River in South America is the largest river by discharge volume of water in \
         the world, and the disputed longest river system in the world in comparison to the Nile. "
            .repeat(6),
    );
    texts.push("Bees communicate the location of flowers through a waggle dance. ".repeat(3));
    texts
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn int8_embeddings_stay_within_the_stated_cosine_of_f32() {
    let dir = default_encoder_dir().expect("all-MiniLM-L6-v2: run scripts/fetch-models.sh");
    let texts = texts();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let mut encoder = BertEncoder::load(&dir).unwrap();
    let f32_vectors = encoder.embed(&refs).unwrap();
    encoder.set_precision(EncoderPrecision::Int8).unwrap();
    assert_eq!(encoder.precision(), EncoderPrecision::Int8);
    let int8_vectors = encoder.embed(&refs).unwrap();
    let mut worst = (f32::INFINITY, "");
    for ((a, b), text) in f32_vectors.iter().zip(&int8_vectors).zip(&refs) {
        let c = cosine(a, b);
        if c < worst.0 {
            worst = (c, text);
        }
    }
    eprintln!("min cosine int8 vs f32: {:.5} ({:?})", worst.0, worst.1);
    assert!(
        worst.0 >= MIN_COSINE,
        "int8 embedding of {:?} has cosine {} to f32 (bound {MIN_COSINE})",
        worst.1,
        worst.0
    );
    // Back to f32 gives the f32 embeddings again (the quantised copy is not left behind).
    encoder.set_precision(EncoderPrecision::F32).unwrap();
    let again = encoder.embed(&refs).unwrap();
    for (a, b) in f32_vectors.iter().zip(&again) {
        assert!(cosine(a, b) > 0.999_999);
    }
}
