//! Behaviour of `BertEncoder` on a tiny random-weight BERT written in-process: masking,
//! batching, ordering, truncation, errors, gradients.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use sha2::{Digest, Sha256};
use zrag_models::bert::{l2_normalize, pool, BertModel, OpSet};
use zrag_models::config::{BertConfig, Pooling};
use zrag_models::testing::{write_tiny_bert, TinyBertSpec};
use zrag_models::{BertEncoder, BiEncoder, ModelError, ModelIdentity};

fn tiny_model(dir: &Path) -> BertEncoder {
    write_tiny_bert(dir, &TinyBertSpec::default()).unwrap();
    BertEncoder::load(dir).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const TEXTS: [&str; 10] = [
    "the cat sat on the mat",
    "a",
    "dog",
    "the quick brown fox jumps over the lazy dog and keeps running far away",
    "",
    "is 42 the answer?",
    "mat on sat cat the",
    "to be or not to be, that is the question",
    "x y z",
    "hello, world!",
];

#[test]
fn loads_shape_identity_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("tiny-bert");
    let encoder = tiny_model(&model_dir);
    assert_eq!(encoder.dim(), 32);
    // sentence_bert_config.json says 48; [CLS] and [SEP] take two of them.
    assert_eq!(encoder.max_tokens(), 46);
    let bytes = std::fs::read(model_dir.join("model.safetensors")).unwrap();
    let sha: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let expected = ModelIdentity {
        name: "tiny-bert".into(),
        sha256: sha,
        dim: 32,
    };
    assert_eq!(encoder.identity(), &expected);
    // A second load reads the cached checksum and agrees.
    assert_eq!(BertEncoder::load(&model_dir).unwrap().identity(), &expected);
    let json = serde_json::to_string(&expected).unwrap();
    assert_eq!(
        serde_json::from_str::<ModelIdentity>(&json).unwrap(),
        expected
    );
}

#[test]
fn embeddings_are_unit_length_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let encoder = tiny_model(dir.path());
    let a = encoder.embed(&TEXTS).unwrap();
    let b = encoder.embed(&TEXTS).unwrap();
    assert_eq!(a, b);
    for v in &a {
        assert_eq!(v.len(), 32);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
    // Different texts, different vectors.
    assert!(max_abs_diff(&a[0], &a[6]) > 1e-3);
    assert!(encoder.embed(&[]).unwrap().is_empty());
}

#[test]
fn fused_inference_path_matches_primitive_ops() {
    // The fused inference path (embedding gather + norm in one pass, dense layers with their
    // GELU / residual + norm epilogues) against candle's primitive ops on the same weights.
    let dir = tempfile::tempdir().unwrap();
    let mut encoder = tiny_model(dir.path());
    let fused = encoder.embed(&TEXTS).unwrap();
    encoder.set_ops(OpSet::Composed);
    let composed = encoder.embed(&TEXTS).unwrap();
    for (a, b) in fused.iter().zip(&composed) {
        assert!(max_abs_diff(a, b) < 1e-5, "{}", max_abs_diff(a, b));
    }
}

#[test]
fn padding_does_not_change_an_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let encoder = tiny_model(dir.path());
    let alone = encoder.embed(&["the cat"]).unwrap().remove(0);
    // Same batch as a much longer text: "the cat" is padded with many [PAD] tokens.
    let padded = encoder
        .embed(&[
            "the cat",
            "the quick brown fox jumps over the lazy dog again and again",
        ])
        .unwrap()
        .remove(0);
    assert!(max_abs_diff(&alone, &padded) < 1e-5);

    // The same through the lower-level batch API with explicit sequences.
    let ids = encoder
        .tokenize(&["the cat", "a much longer sequence of words"])
        .unwrap();
    let batch = encoder
        .embed_token_batch(&[&ids[0], &ids[1]])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(max_abs_diff(&alone, &batch[0]) < 1e-5);
}

#[test]
fn bucketed_batches_match_one_by_one_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut encoder = tiny_model(dir.path());
    let one_by_one: Vec<Vec<f32>> = TEXTS
        .iter()
        .map(|t| encoder.embed(&[t]).unwrap().remove(0))
        .collect();
    for batch_size in [1, 3, 4, 32] {
        encoder.set_batch_size(batch_size);
        let mut progress = Vec::new();
        let batched = encoder
            .embed_with_progress(&TEXTS, &mut |done| progress.push(done))
            .unwrap();
        for (i, (a, b)) in one_by_one.iter().zip(&batched).enumerate() {
            assert!(
                max_abs_diff(a, b) < 1e-5,
                "text {i} differs at batch size {batch_size}"
            );
        }
        assert_eq!(progress.len(), TEXTS.len().div_ceil(batch_size));
        assert!(progress.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(progress.last(), Some(&TEXTS.len()));
    }
    encoder.set_batch_size(0);
    assert_eq!(encoder.batch_size(), 1);
}

#[test]
fn long_texts_are_truncated_and_counted_without_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let encoder = tiny_model(dir.path());
    assert_eq!(encoder.count_tokens(""), 0);
    assert_eq!(encoder.count_tokens("the cat sat"), 3);
    // "hello" is not in the vocabulary: h ##e ##l ##l ##o.
    assert_eq!(encoder.count_tokens("hello"), 5);
    let long = "cat ".repeat(100);
    assert_eq!(encoder.count_tokens(&long), 100);
    let counter: &dyn zrag_text::TokenCounter = &encoder;
    assert_eq!(counter.count_tokens(&long), 100);

    let ids = encoder.tokenize(&[&long]).unwrap();
    assert_eq!(ids[0].len(), encoder.max_tokens() + 2);
    // Everything past the limit is ignored.
    let exactly_max = "cat ".repeat(encoder.max_tokens());
    let longer = format!("{exactly_max} dog dog dog");
    let v = encoder.embed(&[&long, &exactly_max, &longer]).unwrap();
    assert!(max_abs_diff(&v[0], &v[1]) < 1e-6);
    assert!(max_abs_diff(&v[1], &v[2]) < 1e-6);
}

#[test]
fn bi_encoder_shares_one_model_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), &TinyBertSpec::default()).unwrap();
    let shared = BiEncoder::load_shared(dir.path()).unwrap();
    assert!(Arc::ptr_eq(&shared.query, &shared.document));
    let same = BiEncoder::load(dir.path(), &dir.path().join(".")).unwrap();
    assert!(Arc::ptr_eq(&same.query, &same.document));

    let other = tempfile::tempdir().unwrap();
    let spec = TinyBertSpec {
        seed: 99,
        ..TinyBertSpec::default()
    };
    write_tiny_bert(other.path(), &spec).unwrap();
    let pair = BiEncoder::load(dir.path(), other.path()).unwrap();
    assert!(!Arc::ptr_eq(&pair.query, &pair.document));
    assert_ne!(
        pair.query.identity().sha256,
        pair.document.identity().sha256
    );
}

#[test]
fn broken_model_directories_name_the_file_at_fault() {
    let missing = BertEncoder::load(Path::new("/nonexistent/zrag-model")).unwrap_err();
    assert!(
        matches!(missing, ModelError::MissingFile { .. }),
        "{missing}"
    );

    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), &TinyBertSpec::default()).unwrap();

    std::fs::rename(
        dir.path().join("tokenizer.json"),
        dir.path().join("tokenizer.bak"),
    )
    .unwrap();
    let err = BertEncoder::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::rename(
        dir.path().join("tokenizer.bak"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();

    let config_path = dir.path().join("config.json");
    let good_config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        good_config.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 5"),
    )
    .unwrap();
    let err = BertEncoder::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("num_attention_heads"),
        "{err}"
    );

    std::fs::write(&config_path, "{ not json").unwrap();
    let err = BertEncoder::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");

    // Weights that do not match the config: the tensor is named.
    std::fs::write(
        &config_path,
        good_config.replace("\"intermediate_size\": 64", "\"intermediate_size\": 65"),
    )
    .unwrap();
    let err = BertEncoder::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("intermediate.dense.weight"),
        "{err}"
    );
    std::fs::write(&config_path, &good_config).unwrap();

    std::fs::write(dir.path().join("model.safetensors"), b"truncated").unwrap();
    let err = BertEncoder::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn default_dir_error_says_how_to_install() {
    let dir = tempfile::tempdir().unwrap();
    // Only this test in this binary touches ZRAG_HOME.
    std::env::set_var("ZRAG_HOME", dir.path());
    assert_eq!(zrag_models::zrag_home(), dir.path());
    let err = zrag_models::default_encoder_dir().unwrap_err().to_string();
    assert!(err.contains("scripts/fetch-models.sh"), "{err}");
    std::fs::create_dir_all(dir.path().join("models/all-MiniLM-L6-v2")).unwrap();
    assert_eq!(
        zrag_models::default_encoder_dir().unwrap(),
        dir.path().join("models/all-MiniLM-L6-v2")
    );
    std::env::remove_var("ZRAG_HOME");
}

/// Gradients of a DPR-like similarity loss over a tiny model's weights (held as variables, as a
/// trainer holds them), by weight name, with the model running `ops`; and the loss.
fn similarity_loss_gradients(dir: &Path, ops: OpSet) -> (f32, Vec<(String, Vec<f32>)>) {
    let encoder = BertEncoder::load(dir).unwrap();
    let config = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let varmap = VarMap::new();
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    {
        let mut vars = varmap.data().lock().unwrap();
        for (name, tensor) in weights {
            vars.insert(name, Var::from_tensor(&tensor).unwrap());
        }
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = BertModel::load(vb, &config, Path::new("(varmap)"))
        .unwrap()
        .with_ops(ops);

    let texts = [
        "the cat sat",
        "a dog",
        "the quick brown fox jumps over the lazy dog",
    ];
    let ids = encoder.tokenize(&texts).unwrap();
    let seq = ids.iter().map(Vec::len).max().unwrap();
    let mut flat = Vec::new();
    let mut mask = Vec::new();
    for s in &ids {
        flat.extend(
            s.iter()
                .copied()
                .chain(std::iter::repeat_n(0, seq - s.len())),
        );
        mask.extend((0..seq).map(|i| if i < s.len() { 1f32 } else { 0.0 }));
    }
    let ids = Tensor::from_vec(flat, (texts.len(), seq), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (texts.len(), seq), &Device::Cpu).unwrap();
    let states = model
        .forward(&ids, &ids.zeros_like().unwrap(), &mask)
        .unwrap();
    let vectors = l2_normalize(&pool(Pooling::Mean, &states, &mask).unwrap()).unwrap();
    // A similarity loss like DPR's: pull text 0 towards 1, push it from 2 (padding included).
    let scores = vectors.matmul(&vectors.t().unwrap()).unwrap();
    let loss =
        (scores.get(0).unwrap().get(2).unwrap() - scores.get(0).unwrap().get(1).unwrap()).unwrap();
    let grads = loss.backward().unwrap();

    let vars = varmap.data().lock().unwrap();
    let mut by_name: Vec<(String, Vec<f32>)> = vars
        .iter()
        .map(|(name, var)| {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            (
                name.clone(),
                grad.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    by_name.sort_by(|a, b| a.0.cmp(&b.0));
    (loss.to_scalar::<f32>().unwrap(), by_name)
}

#[test]
fn gradients_reach_every_weight() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), &TinyBertSpec::default()).unwrap();
    let (_, gradients) = similarity_loss_gradients(dir.path(), OpSet::Fused);
    assert!(!gradients.is_empty());
    for (name, grad) in &gradients {
        let magnitude: f32 = grad.iter().map(|g| g.abs()).sum();
        // Every parameter influences the loss except the second token-type row, unused by
        // single-sentence inputs (its gradient exists and is zero).
        assert!(magnitude.is_finite(), "gradient of {name} is not finite");
        if name != "embeddings.token_type_embeddings.weight" {
            assert!(magnitude > 0.0, "zero gradient for {name}");
        }
    }
}

/// The fused kernels' hand-written backward passes against candle's autodiff through
/// primitive ops, for every weight of a whole model (each op is also checked alone in
/// `ops.rs`; this checks how they are wired together).
#[test]
fn fused_ops_give_the_gradients_of_primitive_ops() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_bert(dir.path(), &TinyBertSpec::default()).unwrap();
    let (fused_loss, fused) = similarity_loss_gradients(dir.path(), OpSet::Fused);
    let (composed_loss, composed) = similarity_loss_gradients(dir.path(), OpSet::Composed);
    assert!(
        (fused_loss - composed_loss).abs() < 1e-5,
        "{fused_loss} vs {composed_loss}"
    );
    assert_eq!(fused.len(), composed.len());
    for ((name, a), (other, b)) in fused.iter().zip(&composed) {
        assert_eq!(name, other);
        let scale = b.iter().fold(0f32, |m, g| m.max(g.abs()));
        let diff = max_abs_diff(a, b);
        assert!(
            diff <= 1e-4 * scale + 1e-7,
            "{name}: fused and primitive gradients differ by {diff} (largest |g| {scale})"
        );
    }
}

#[test]
fn one_encoder_serves_several_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<BertEncoder>();
    assert_send_sync::<BiEncoder>();

    let dir = tempfile::tempdir().unwrap();
    let encoder = Arc::new(tiny_model(dir.path()));
    let expected = encoder.embed(&TEXTS).unwrap();
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let encoder = Arc::clone(&encoder);
            std::thread::spawn(move || encoder.embed(&TEXTS).unwrap())
        })
        .collect();
    for handle in handles {
        for (a, b) in handle.join().unwrap().iter().zip(&expected) {
            assert!(max_abs_diff(a, b) < 1e-6);
        }
    }
}
