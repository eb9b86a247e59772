//! Encoder throughput on the default model (all-MiniLM-L6-v2).
//!
//! `cargo run --release -p zrag-models --example bench_encoder [-- PASSAGES QUERIES]`
//! Embeds synthetic passages of about 128 tokens (batch 32) and queries of about 16 tokens,
//! and prints sentences per second. Threads: candle's default (all cores) or
//! `RAYON_NUM_THREADS`. Also prints the process CPU time per sentence (Linux), which stays
//! meaningful when other jobs compete for the cores and wall-clock rates drop.

use std::time::Instant;

use zrag_models::{default_encoder_dir, BertEncoder};

const WORDS: &[&str] = &[
    "retrieval",
    "the",
    "of",
    "dictionary",
    "meaning",
    "a",
    "ancient",
    "river",
    "to",
    "cast",
    "light",
    "and",
    "which",
    "organism",
    "small",
    "quickly",
    "government",
    "in",
    "by",
    "sound",
    "definition",
    "is",
    "water",
    "having",
    "state",
    "with",
    "music",
    "plant",
    "or",
    "animal",
    "people",
    "that",
    "from",
    "instrument",
    "measure",
    "be",
    "city",
    "as",
    "law",
    "color",
];

/// Deterministic pseudo-random text of roughly `tokens` word-piece tokens.
fn synthetic_text(encoder: &BertEncoder, seed: usize, tokens: usize) -> String {
    let mut text = String::new();
    let mut state = seed as u64 * 2_654_435_761 + 1;
    while encoder.count_tokens(&text) < tokens {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        let word = WORDS[(state >> 33) as usize % WORDS.len()];
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(word);
    }
    text
}

fn measure(encoder: &BertEncoder, texts: &[String], label: &str) {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    // Warm-up: page in weights, spin up thread pools.
    encoder
        .embed(&refs[..refs.len().min(encoder.batch_size())])
        .unwrap();
    let start = Instant::now();
    let cpu_start = process_cpu_seconds();
    let vectors = encoder.embed(&refs).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds()
        .zip(cpu_start)
        .map(|(end, start)| end - start);
    assert_eq!(vectors.len(), texts.len());
    let tokens: usize = texts.iter().map(|t| encoder.count_tokens(t) + 2).sum();
    let cpu_note = cpu
        .map(|cpu| {
            format!(
                ", {:.1} ms CPU per sentence",
                cpu * 1e3 / texts.len() as f64
            )
        })
        .unwrap_or_default();
    println!(
        "{label}: {} texts, {:.1} tokens avg, batch {}: {:.2} s, {:.1} sentences/s{cpu_note}",
        texts.len(),
        tokens as f64 / texts.len() as f64,
        encoder.batch_size(),
        seconds,
        texts.len() as f64 / seconds
    );
}

/// User + system CPU time of this process, from /proc/self/stat (Linux only).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // The kernel's USER_HZ is 100 on every Linux architecture zrag targets.
    Some(ticks / 100.0)
}

fn main() {
    // The CLI's malloc settings, so the benchmark measures what users run.
    zrag_models::tune_allocator();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("counts must be integers"))
        .collect();
    let passages = args.first().copied().unwrap_or(256);
    let queries = args.get(1).copied().unwrap_or(1024);

    let dir = default_encoder_dir().unwrap_or_else(|err| panic!("{err}"));
    let load_start = Instant::now();
    let mut encoder = BertEncoder::load(&dir).unwrap();
    println!(
        "loaded {} in {:.2} s; threads: {}",
        encoder.identity().name,
        load_start.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads()
    );
    encoder.set_batch_size(32);

    let long: Vec<String> = (0..passages)
        .map(|i| synthetic_text(&encoder, i, 126))
        .collect();
    measure(&encoder, &long, "passages ~128 tokens");

    let short: Vec<String> = (0..queries)
        .map(|i| synthetic_text(&encoder, 1_000_000 + i, 14))
        .collect();
    measure(&encoder, &short, "queries ~16 tokens");
}
