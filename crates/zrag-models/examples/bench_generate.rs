//! Generation speed of zrag's decoder on the workloads of `bench/generate/llamacpp_bench.py`,
//! read from its results file so that both engines see exactly the same token ids.
//!
//! `cargo run --release -p zrag-models --example bench_generate -- --workloads bench/generate/llamacpp-results.json [--model PATH] [--runs 3]`
//!
//! Threads: RAYON_NUM_THREADS (and CANDLE_NUM_THREADS for the few candle matmuls). Prints one
//! JSON object: decode tokens/s (128 greedy tokens, stop tokens ignored like the reference),
//! prompt processing tokens/s, teacher-forced scoring tokens/s, and the k-documents-as-one-
//! batch experiment (k prompts decoded together vs one after another).

use std::time::Instant;

use serde_json::{json, Value};
use zrag_models::generator::{default_generator_path, LocalGenerator};
use zrag_models::CausalLm;

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("token id array")
        .iter()
        .map(|v| v.as_u64().expect("token id") as u32)
        .collect()
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap_or(0) as u32
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Greedy decoding of `new_tokens` tokens for every prompt as one batch; returns (prompt
/// seconds, decode seconds for the remaining new_tokens - 1 steps).
fn decode(model: &dyn CausalLm, prompts: &[&[u32]], new_tokens: usize) -> (f64, f64) {
    let started = Instant::now();
    let mut state = model.start(prompts).expect("prompt");
    let mut next: Vec<u32> = (0..prompts.len())
        .map(|r| argmax(state.log_probs(r)))
        .collect();
    let prompt_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 1..new_tokens {
        state.advance(&next).expect("step");
        next = (0..prompts.len())
            .map(|r| argmax(state.log_probs(r)))
            .collect();
    }
    (prompt_seconds, started.elapsed().as_secs_f64())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The CLI's malloc settings, so the benchmark measures what users run.
    zrag_models::tune_allocator();
    let mut args = std::env::args().skip(1);
    let (mut workloads, mut model_path, mut runs) = (None, None, 3usize);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--workloads" => workloads = args.next(),
            "--model" => model_path = args.next().map(std::path::PathBuf::from),
            "--runs" => runs = args.next().ok_or("--runs N")?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let workloads: Value = serde_json::from_str(&std::fs::read_to_string(
        workloads.ok_or("--workloads PATH (llamacpp-results.json)")?,
    )?)?;
    let w = &workloads["workloads"];
    let decode_prompt = ids(&w["decode_prompt_ids"]);
    let new_tokens = w["decode_new_tokens"].as_u64().unwrap_or(128) as usize;
    let long_prompt = ids(&w["prompt_ids"]);
    let sequences: Vec<Vec<u32>> = w["score_sequences"]
        .as_array()
        .ok_or("score_sequences")?
        .iter()
        .map(ids)
        .collect();

    let path = match model_path {
        Some(p) => p,
        None => default_generator_path()?,
    };
    let generator = LocalGenerator::load(&path)?;
    let model = generator.model();
    let lm: &dyn CausalLm = model;

    // Warm-up, then timed runs; the prompt cache is cleared so every run is cold.
    let mut decode_rates = Vec::new();
    let mut decode_prompt_rates = Vec::new();
    let mut prompt_rates = Vec::new();
    let mut score_rates = Vec::new();
    let mut score_one_by_one_rates = Vec::new();
    let score_tokens: usize = sequences.iter().map(|s| s.len() - 1).sum();
    for run in 0..=runs {
        model.clear_prompt_cache();
        let (p, d) = decode(lm, &[&decode_prompt], new_tokens);
        model.clear_prompt_cache();
        let started = Instant::now();
        lm.start(&[&long_prompt])?;
        let prompt_seconds = started.elapsed().as_secs_f64();
        model.clear_prompt_cache();
        let heads: Vec<&[u32]> = sequences.iter().map(|s| &s[..1]).collect();
        let tails: Vec<&[u32]> = sequences.iter().map(|s| &s[1..]).collect();
        let started = Instant::now();
        lm.score(&heads, &tails)?;
        let score_seconds = started.elapsed().as_secs_f64();
        model.clear_prompt_cache();
        let started = Instant::now();
        for (head, tail) in heads.iter().zip(&tails) {
            lm.score(&[*head], &[*tail])?;
        }
        let one_by_one_seconds = started.elapsed().as_secs_f64();
        if run > 0 {
            decode_prompt_rates.push(decode_prompt.len() as f64 / p);
            decode_rates.push((new_tokens - 1) as f64 / d);
            prompt_rates.push(long_prompt.len() as f64 / prompt_seconds);
            score_rates.push(score_tokens as f64 / score_seconds);
            score_one_by_one_rates.push(score_tokens as f64 / one_by_one_seconds);
        }
    }

    // RAG shape: k document prompts (the score sequences cut to 150 tokens) and 32 greedy
    // tokens each, as one batch vs one document after another.
    let k = sequences.len();
    let doc_prompts: Vec<&[u32]> = sequences.iter().map(|s| &s[..s.len().min(150)]).collect();
    let (mut batched, mut sequential, mut batched_decode_rates) =
        (Vec::new(), Vec::new(), Vec::new());
    for run in 0..=runs {
        model.clear_prompt_cache();
        let started = Instant::now();
        let (_, batch_decode_seconds) = decode(lm, &doc_prompts, 32);
        let batched_seconds = started.elapsed().as_secs_f64();
        model.clear_prompt_cache();
        let started = Instant::now();
        for prompt in &doc_prompts {
            decode(lm, &[*prompt], 32);
        }
        let sequential_seconds = started.elapsed().as_secs_f64();
        if run > 0 {
            batched.push(batched_seconds);
            batched_decode_rates.push((k * 31) as f64 / batch_decode_seconds);
            sequential.push(sequential_seconds);
        }
    }
    let (batched, sequential) = (median(batched), median(sequential));
    let report = json!({
        "engine": "zrag",
        "model": generator.name(),
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
        "runs": runs,
        "decode": {
            "prompt_tokens": decode_prompt.len(),
            "new_tokens": new_tokens,
            "prompt_tokens_per_s": median(decode_prompt_rates),
            "decode_tokens_per_s": median(decode_rates),
        },
        "prompt": {"tokens": long_prompt.len(), "tokens_per_s": median(prompt_rates)},
        "score": {
            "sequences": sequences.len(),
            "tokens": score_tokens,
            "tokens_per_s": median(score_rates),
            "one_by_one_tokens_per_s": median(score_one_by_one_rates),
        },
        "rag_batch": {
            "documents": k,
            "prompt_tokens_each": doc_prompts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            "new_tokens": 32,
            "batched_seconds": batched,
            "batched_decode_tokens_per_s": median(batched_decode_rates),
            "sequential_seconds": sequential,
            "speedup": sequential / batched,
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
