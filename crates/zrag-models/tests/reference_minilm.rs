//! all-MiniLM-L6-v2 through zrag's encoder must match an independent numpy implementation
//! (`scripts/reference_minilm.py`) to cosine >= 0.9999 on every text.
//!
//! This test needs the model (`scripts/fetch-models.sh`) and Python with numpy and tokenizers
//! (`pip install numpy tokenizers`). Without them it fails and says so: a correctness check
//! that silently passes when it cannot run is worse than none.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use zrag_models::{default_encoder_dir, BertEncoder};

const MIN_COSINE: f64 = 0.9999;

fn texts() -> Vec<String> {
    let mut texts: Vec<String> = [
        "",
        " ",
        "a",
        "Hello world",
        "hello world",
        "HELLO WORLD!!!",
        "The quick brown fox jumps over the lazy dog.",
        "What is the capital of France?",
        "Paris is the capital and most populous city of France.",
        "A domesticated carnivorous mammal that typically has a long snout.",
        "Apple (n.): the fleshy usually rounded red, yellow, or green edible pome fruit.",
        "To give up one's office or position; to resign.",
        "Crème brûlée, naïve café, façade, jalapeño, São Paulo, Zürich.",
        "Ångström, Øresund, Łódź, Dvořák, İstanbul, Þingvellir.",
        "Résumé vs resume: accents are stripped or kept?",
        "¿Dónde está la biblioteca? ¡Aquí!",
        "Straße, Fußgänger, Größe — deutsche Wörter mit Umlauten.",
        "Москва — столица России.",
        "Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
        "東京は日本の首都です。",
        "北京是中华人民共和国的首都。",
        "서울은 대한민국의 수도이다.",
        "مرحبا بالعالم",
        "שלום עולם",
        "हिन्दी भाषा",
        "emoji test 😀🎉👍 and ✓ ✗ ★",
        "Numbers: 3.14159, 2.71828, 1,000,000 and 42.",
        "Call 555-0100 or e-mail jane.doe@example.com before 2024-12-31 23:59.",
        "Price: $19.99 (was €24,50); save 20%!",
        "((nested (parentheses) [brackets] {braces}))",
        "...,,,;;;:::!!!???",
        "\"Quoted\" and 'single-quoted' and «guillemets»",
        "fn main() { println!(\"Hello, world!\"); }",
        "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
        "SELECT id, name FROM users WHERE age > 30 ORDER BY name;",
        "def f(x):\n    return x ** 2 + 1\n",
        "https://example.org/path?query=1&lang=en#section",
        "Tabs\tand\nnewlines\r\nand    multiple   spaces",
        "Control\u{0007}characters\u{0000}inside",
        "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
        "supercalifragilisticexpialidocious",
        "The mitochondria is the powerhouse of the cell.",
        "E = mc^2, ∑ x_i, ∫ f(x) dx, √2 ≈ 1.414, α β γ δ.",
        "Hyphen-ated, en–dash, em—dash, and ellipsis…",
        "ALL CAPS SENTENCE ABOUT NOTHING IN PARTICULAR",
        "mIxEd CaSe TeXt",
        "The bank raised interest rates. The river bank flooded.",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "Webster 1913: Abandon, v. t. To cast or drive out; to banish; to expel; to reject.",
        "A small, nocturnal, insectivorous mammal covered with spines.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    // Long texts: well past 256 tokens, to exercise truncation.
    let paragraph = "Dense retrieval encodes queries and passages into the same vector space, \
        so that a maximum inner product search finds the passages most relevant to a query. \
        Unlike lexical methods such as BM25, it can match a question to an answer that uses \
        entirely different words. ";
    texts.push(paragraph.repeat(8));
    texts.push("word ".repeat(600));
    texts.push("東京大学 ".repeat(150));
    texts.push(format!("{} END", "1234567890 ".repeat(120)));
    // Exactly around the truncation boundary.
    texts.push("token ".repeat(254));
    texts.push("token ".repeat(255));
    texts
}

fn reference_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/reference_minilm.py")
}

fn require_python() {
    let probe = Command::new("python3")
        .args(["-c", "import numpy, tokenizers"])
        .output();
    match probe {
        Err(err) => panic!(
            "python3 is not on PATH ({err}); this test compares against \
             scripts/reference_minilm.py: install Python 3, then `pip install numpy tokenizers`"
        ),
        Ok(out) if !out.status.success() => panic!(
            "python3 cannot import numpy/tokenizers: run `pip install numpy tokenizers`\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => {}
    }
}

fn reference_embeddings(model_dir: &std::path::Path, texts: &[String]) -> Vec<Vec<f64>> {
    let mut child = Command::new("python3")
        .arg(reference_script())
        .arg("--model-dir")
        .arg(model_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python3 scripts/reference_minilm.py");
    let input = serde_json::to_vec(texts).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Write from a thread so a large output cannot deadlock against a full stdin pipe.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("wait for reference script");
    writer
        .join()
        .unwrap()
        .expect("write texts to reference script");
    assert!(
        out.status.success(),
        "scripts/reference_minilm.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference script printed invalid JSON")
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_numpy_reference() {
    let model_dir = default_encoder_dir().unwrap_or_else(|err| {
        panic!("{err}\n(the model is needed for this test: run scripts/fetch-models.sh)")
    });
    require_python();

    let texts = texts();
    assert!(texts.len() >= 50);
    let mut encoder = BertEncoder::load(&model_dir).expect("load all-MiniLM-L6-v2");
    assert_eq!(encoder.dim(), 384);
    assert_eq!(encoder.max_tokens(), 254);
    // A batch size that mixes lengths within batches, so padding and masking are exercised.
    encoder.set_batch_size(7);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ours = encoder.embed(&refs).expect("embed");
    let reference = reference_embeddings(&model_dir, &texts);
    assert_eq!(ours.len(), texts.len());
    assert_eq!(reference.len(), texts.len());

    let mut failures = Vec::new();
    let mut worst = f64::INFINITY;
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        assert_eq!(a.len(), 384);
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-4,
            "text {i} not unit length: {norm}"
        );
        let c = cosine(a, b);
        worst = worst.min(c);
        if c.is_nan() || c < MIN_COSINE {
            failures.push(format!("text {i} {:?}: cosine {c}", texts[i]));
        }
    }
    eprintln!("worst cosine vs numpy reference: {worst:.8}");
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));

    // Truncation: texts past the limit are cut at 254 text tokens.
    assert!(encoder.count_tokens(&texts[texts.len() - 5]) > encoder.max_tokens());
}
