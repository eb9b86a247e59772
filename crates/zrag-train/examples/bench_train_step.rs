//! Time of one bi-encoder training step (SPEC §2 recorded 8.5 s for a straightforward candle
//! BERT): a batch of questions and their positive passages through E_Q and E_D (two
//! all-MiniLM-L6-v2 copies, every weight trainable), DPR's in-batch contrastive loss, backward,
//! global-norm clipping, AdamW on both encoders, and re-deriving the forward weights.
//!
//! ```text
//! cargo run --release -p zrag-train --example bench_train_step -- \
//!     [--batch 32] [--query-tokens 32] [--passage-tokens 128] [--steps 3] [--threads 2]
//!     [--ops fused,composed] [--model DIR]
//! ```
//!
//! `fused` is zrag's kernels (what training uses); `composed` the same maths from candle's
//! primitive ops. Before timing, the first batch's loss and gradients are computed both ways
//! and compared weight by weight (the largest difference relative to that weight's largest
//! gradient is printed). Inputs are token ids drawn at random (exact lengths, no padding), so
//! no tokenisation is timed. Prints one JSON line per op set on stdout.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::json;
use zrag_models::bert::OpSet;
use zrag_models::default_encoder_dir;
use zrag_train::encoder::TrainableEncoder;
use zrag_train::loss::contrastive_loss;
use zrag_train::optim::{Optimizer, OptimizerSettings};

struct Args {
    batch: usize,
    query_tokens: usize,
    passage_tokens: usize,
    steps: usize,
    threads: usize,
    ops: Vec<OpSet>,
    model: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        batch: 32,
        query_tokens: 32,
        passage_tokens: 128,
        steps: 3,
        threads: 2,
        ops: vec![OpSet::Fused, OpSet::Composed],
        model: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--batch" => args.batch = value()?.parse().context("--batch")?,
            "--query-tokens" => args.query_tokens = value()?.parse().context("--query-tokens")?,
            "--passage-tokens" => {
                args.passage_tokens = value()?.parse().context("--passage-tokens")?
            }
            "--steps" => args.steps = value()?.parse().context("--steps")?,
            "--threads" => args.threads = value()?.parse().context("--threads")?,
            "--model" => args.model = Some(value()?.into()),
            "--ops" => {
                args.ops = value()?
                    .split(',')
                    .map(|name| match name {
                        "fused" => Ok(OpSet::Fused),
                        "composed" => Ok(OpSet::Composed),
                        other => bail!("--ops: unknown {other:?} (fused or composed)"),
                    })
                    .collect::<Result<_>>()?
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if args.batch < 2 || args.steps == 0 || args.query_tokens < 3 || args.passage_tokens < 3 {
        bail!("--batch ≥ 2, --steps ≥ 1 and at least 3 tokens per text are needed");
    }
    Ok(args)
}

/// `count` sequences of exactly `len` ids: [CLS], random word pieces, [SEP].
fn random_sequences(
    encoder: &TrainableEncoder,
    count: usize,
    len: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let framed = encoder.encoder().tokenize(&["word"])?.remove(0);
    let (cls, sep) = (framed[0], *framed.last().context("empty tokenisation")?);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // BERT's uncased vocabulary: ids 1996.. are ordinary word pieces.
    Ok((0..count)
        .map(|_| {
            let mut ids = vec![cls];
            ids.extend((0..len - 2).map(|_| 1996 + (next() % 28_000) as u32));
            ids.push(sep);
            ids
        })
        .collect())
}

fn embed(encoder: &TrainableEncoder, sequences: &[Vec<u32>]) -> Result<Tensor> {
    let slices: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
    Ok(encoder.encoder().embed_token_batch(&slices)?)
}

struct Setup {
    query_encoder: TrainableEncoder,
    passage_encoder: TrainableEncoder,
    optimizer: Optimizer,
}

fn setup(model: &std::path::Path, ops: OpSet, steps: usize) -> Result<Setup> {
    let mut query_encoder = TrainableEncoder::load(model)?;
    let mut passage_encoder = TrainableEncoder::load(model)?;
    query_encoder.set_ops(ops);
    passage_encoder.set_ops(ops);
    let mut vars = query_encoder.vars();
    vars.extend(passage_encoder.vars());
    let settings = OptimizerSettings {
        learning_rate: 2e-5,
        warmup_steps: 0,
        total_steps: steps + 1,
        ..OptimizerSettings::default()
    };
    let optimizer = Optimizer::new(vars, settings)?;
    Ok(Setup {
        query_encoder,
        passage_encoder,
        optimizer,
    })
}

fn loss_of(setup: &Setup, questions: &[Vec<u32>], passages: &[Vec<u32>]) -> Result<Tensor> {
    let q = embed(&setup.query_encoder, questions)?;
    let p = embed(&setup.passage_encoder, passages)?;
    let positives: Vec<u32> = (0..questions.len() as u32).collect();
    Ok(contrastive_loss(&q, &p, &positives, 0.05)?)
}

/// Flattened gradient of every weight, named "E_Q <weight>" or "E_D <weight>", sorted by name.
type NamedGradients = Vec<(String, Vec<f32>)>;

/// Loss and per-weight gradients of the first batch.
fn gradients(
    setup: &Setup,
    questions: &[Vec<u32>],
    passages: &[Vec<u32>],
) -> Result<(f32, NamedGradients)> {
    let loss = loss_of(setup, questions, passages)?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    for (role, encoder) in [
        ("E_Q", &setup.query_encoder),
        ("E_D", &setup.passage_encoder),
    ] {
        let data = encoder.varmap().data().lock().expect("varmap lock");
        for (name, var) in data.iter() {
            // The BERT pooler (unused by mean pooling) and position_ids (integer buffer) are in
            // the checkpoint but get no gradient; anything else without one is a bug.
            let Some(grad) = grads.get(var.as_tensor()) else {
                if name.starts_with("pooler.") || name.ends_with("position_ids") {
                    continue;
                }
                bail!("{role} {name}: no gradient");
            };
            out.push((
                format!("{role} {name}"),
                grad.flatten_all()?.to_vec1::<f32>()?,
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((loss.to_scalar::<f32>()?, out))
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> Result<()> {
    // The CLI's malloc settings, so the benchmark measures what users run.
    zrag_models::tune_allocator();
    let args = parse_args()?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .context("rayon thread pool")?;
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => default_encoder_dir()?,
    };

    // Gradient check on the first batch: fused kernels vs primitive ops.
    {
        let fused = setup(&model, OpSet::Fused, args.steps)?;
        let questions = random_sequences(&fused.query_encoder, args.batch, args.query_tokens, 1)?;
        let passages = random_sequences(&fused.query_encoder, args.batch, args.passage_tokens, 2)?;
        let (fused_loss, fused_grads) = gradients(&fused, &questions, &passages)?;
        drop(fused);
        let composed = setup(&model, OpSet::Composed, args.steps)?;
        let (composed_loss, composed_grads) = gradients(&composed, &questions, &passages)?;
        let names = |g: &NamedGradients| g.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        if names(&fused_grads) != names(&composed_grads) {
            bail!("fused and composed ops give gradients for different weights");
        }
        // Relative to each weight's largest gradient, floored at 1e-3 of the largest gradient
        // anywhere: some gradients are analytically zero (a key bias shifts every score of a
        // softmax row equally) and are rounding noise in both op sets.
        let abs_max = |g: &[f32]| g.iter().fold(0f32, |m, x| m.max(x.abs()));
        let global = composed_grads
            .iter()
            .fold(0f32, |m, (_, g)| m.max(abs_max(g)));
        let mut worst = (0f32, String::new());
        for ((name, a), (_, b)) in fused_grads.iter().zip(&composed_grads) {
            let scale = abs_max(b).max(1e-3 * global).max(1e-30);
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            if diff / scale > worst.0 {
                worst = (diff / scale, name.clone());
            }
        }
        eprintln!(
            "gradient check: loss fused {fused_loss:.6} composed {composed_loss:.6}; {} weights; \
             largest |Δg| / max(max|g|, 1e-3·global max|g|) = {:.2e} ({})",
            fused_grads.len(),
            worst.0,
            worst.1
        );
        println!(
            "{}",
            json!({"gradient_check": {"loss_fused": fused_loss, "loss_composed": composed_loss,
                   "weights": fused_grads.len(), "max_relative_difference": worst.0,
                   "worst_weight": worst.1}})
        );
    }

    for &ops in &args.ops {
        let mut setup = setup(&model, ops, args.steps)?;
        let mut times = Vec::new();
        for step in 0..=args.steps {
            let questions = random_sequences(
                &setup.query_encoder,
                args.batch,
                args.query_tokens,
                10 + step as u64,
            )?;
            let passages = random_sequences(
                &setup.query_encoder,
                args.batch,
                args.passage_tokens,
                100 + step as u64,
            )?;
            let start = Instant::now();
            let loss = loss_of(&setup, &questions, &passages)?;
            let forward = start.elapsed().as_secs_f64();
            let mut grads = loss.backward()?;
            let backward = start.elapsed().as_secs_f64() - forward;
            setup.optimizer.apply(&mut grads)?;
            setup.query_encoder.refresh()?;
            setup.passage_encoder.refresh()?;
            let total = start.elapsed().as_secs_f64();
            let loss = loss.to_scalar::<f32>()?;
            eprintln!(
                "{ops:?} step {step}{}: {total:.2} s (forward {forward:.2}, backward {backward:.2}, \
                 update {:.2}); loss {loss:.4}",
                if step == 0 { " (warm-up)" } else { "" },
                total - forward - backward
            );
            if step > 0 {
                times.push((total, forward, backward));
            }
        }
        times.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (total, forward, backward) = times[times.len() / 2];
        println!(
            "{}",
            json!({"ops": format!("{ops:?}").to_lowercase(), "batch": args.batch,
                   "query_tokens": args.query_tokens, "passage_tokens": args.passage_tokens,
                   "threads": args.threads, "steps": args.steps,
                   "median_step_s": total, "forward_s": forward, "backward_s": backward,
                   "best_step_s": times[0].0, "peak_rss_mib": peak_rss_mib()})
        );
    }
    Ok(())
}
