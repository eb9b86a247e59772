//! SmolLM2-135M-Instruct (GGUF, Q4_1) through zrag's decoder must match an independent
//! float64 numpy forward pass over the same de-quantised weights
//! (`scripts/reference_llama_gguf.py`, which reads the file with the `gguf` package).
//!
//! zrag multiplies quantised weights with Q8-quantised activations, as llama.cpp does, while
//! the reference uses exact float64 activations; the tolerances below allow for that and no
//! more. Needs the model (`scripts/fetch-models.sh`) and Python with numpy and gguf; without
//! them the test fails and says so.

use std::path::PathBuf;
use std::process::Command;

use zrag_models::generator::{
    default_generator_path, ChatMessage, LocalGenerator, WeightPrecision,
};

fn reference_logits(model: &std::path::Path, ids: &[u32]) -> Vec<Vec<f64>> {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/reference_llama_gguf.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(model)
        .arg(serde_json::to_string(ids).unwrap())
        .output()
        .expect("python3 must be installed for the reference test");
    assert!(
        output.status.success(),
        "reference script failed (pip install numpy gguf?): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    json["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn log_softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let log_z = max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    row.iter().map(|v| v - log_z).collect()
}

/// Worst absolute logit gap, and worst log-probability gap over the tokens the reference
/// gives p > e^-10, across all positions; plus the positions whose argmax differs.
fn compare(ours: &[Vec<f32>], reference: &[Vec<f64>]) -> (f64, f64, Vec<(usize, f64)>) {
    assert_eq!(ours.len(), reference.len());
    let (mut worst_logit, mut worst_logprob, mut argmax_changes) = (0.0f64, 0.0f64, Vec::new());
    for (position, (a, b)) in ours.iter().zip(reference).enumerate() {
        let a: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let (la, lb) = (log_softmax(&a), log_softmax(b));
        for i in 0..a.len() {
            worst_logit = worst_logit.max((a[i] - b[i]).abs());
            if lb[i] > -10.0 {
                worst_logprob = worst_logprob.max((la[i] - lb[i]).abs());
            }
        }
        let top_ref = (0..b.len()).max_by(|&i, &j| b[i].total_cmp(&b[j])).unwrap();
        let top_ours = (0..a.len()).max_by(|&i, &j| a[i].total_cmp(&a[j])).unwrap();
        if top_ref != top_ours {
            argmax_changes.push((position, lb[top_ref] - lb[top_ours]));
        }
    }
    (worst_logit, worst_logprob, argmax_changes)
}

#[test]
fn smollm2_logits_match_numpy_reference() {
    let path = default_generator_path().expect("run scripts/fetch-models.sh first");
    let exact = LocalGenerator::load_with(&path, WeightPrecision::F32).unwrap();
    let ids = exact
        .tokenizer()
        .chat_prompt(&[ChatMessage::new(
            "user",
            "Paris is the capital of France. Berlin is the capital of Germany. What is the capital of France?",
        )])
        .unwrap();
    let reference = reference_logits(&path, &ids);

    // Same weights, f32 arithmetic: the architecture must agree to rounding.
    let (logit_gap, logprob_gap, changes) =
        compare(&exact.model().logits_all(&ids).unwrap(), &reference);
    eprintln!("f32 weights: worst logit gap {logit_gap:.5}, log-prob gap {logprob_gap:.5}");
    assert!(
        logit_gap < 0.01,
        "f32 path differs from the reference by {logit_gap} in a logit"
    );
    assert!(
        changes.is_empty(),
        "f32 path changes the argmax at {changes:?}"
    );
    drop(exact);

    // Quantised weights with 8-bit activations (llama.cpp's arithmetic): close, not equal.
    // Argmax changes are allowed only where the reference has a near-tie.
    let quantised = LocalGenerator::load(&path).unwrap();
    let (logit_gap, logprob_gap, changes) =
        compare(&quantised.model().logits_all(&ids).unwrap(), &reference);
    eprintln!("Q4_1 weights: worst logit gap {logit_gap:.4}, log-prob gap {logprob_gap:.4}, argmax changes {changes:?}");
    assert!(logprob_gap < 1.5, "quantised log-prob gap {logprob_gap}");
    assert!(
        changes.len() <= 2 && changes.iter().all(|(_, gap)| *gap < 1.0),
        "{changes:?}"
    );
}
