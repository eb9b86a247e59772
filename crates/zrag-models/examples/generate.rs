//! Greedy generation with the default (or given) generator, timing prompt and decode.
//!
//! `cargo run --release -p zrag-models --example generate -- [--model PATH] [--tokens N] [--batch K] QUESTION`

use std::time::Instant;

use zrag_models::generator::{default_generator_path, ChatMessage, LocalGenerator};
use zrag_models::CausalLm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut model_path = None;
    let mut max_tokens = 64usize;
    let mut batch = 1usize;
    let mut question = String::from("What is the capital of France?");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" => model_path = args.next().map(std::path::PathBuf::from),
            "--tokens" => max_tokens = args.next().ok_or("--tokens N")?.parse()?,
            "--batch" => batch = args.next().ok_or("--batch K")?.parse()?,
            _ => question = arg,
        }
    }
    let path = match model_path {
        Some(p) => p,
        None => default_generator_path()?,
    };
    let started = Instant::now();
    let generator = LocalGenerator::load(&path)?;
    eprintln!(
        "loaded {} in {:.2}s",
        generator.name(),
        started.elapsed().as_secs_f64()
    );
    let prompt = generator
        .tokenizer()
        .chat_prompt(&[ChatMessage::new("user", question)])?;
    let prompts: Vec<&[u32]> = (0..batch).map(|_| prompt.as_slice()).collect();
    let model = generator.model();

    let started = Instant::now();
    let mut state = model.start(&prompts)?;
    let prompt_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let lp = state.log_probs(0);
        let next = (0..lp.len())
            .max_by(|&a, &b| lp[a].total_cmp(&lp[b]))
            .unwrap() as u32;
        out.push(next);
        if model.stop_tokens().contains(&next) {
            break;
        }
        state.advance(&vec![next; batch])?;
    }
    let decode_seconds = started.elapsed().as_secs_f64();
    println!("{}", generator.tokenizer().decode(&out)?);
    eprintln!(
        "prompt: {} tokens x {batch} rows in {prompt_seconds:.3}s ({:.1} tokens/s)",
        prompt.len(),
        (prompt.len() * batch) as f64 / prompt_seconds
    );
    eprintln!(
        "decode: {} steps x {batch} rows in {decode_seconds:.3}s ({:.1} steps/s, {:.1} tokens/s)",
        out.len(),
        out.len() as f64 / decode_seconds,
        (out.len() * batch) as f64 / decode_seconds
    );
    eprintln!("prompt ids: {:?}", &prompt[..prompt.len().min(40)]);
    Ok(())
}
