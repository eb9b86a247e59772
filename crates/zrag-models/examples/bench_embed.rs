//! zrag's side of the embedding benchmark (`bench/embed/run.sh`): the same workloads, batch size
//! and thread count as the Python references, timed end to end (texts in, normalised embeddings
//! out, tokenisation included), best and median of `--repeats` passes after a one-batch warm-up.
//!
//! ```text
//! cargo run --release -p zrag-models --example bench_embed -- \
//!     --workloads bench-out/embed/workloads.jsonl --out-dir bench-out/embed \
//!     [--threads 2] [--batch 32] [--repeats 3] [--precision f32,int8] [--limit N] [--model DIR]
//! ```
//!
//! Writes `OUT/zrag-results.json` (one record per engine and workload, the keys of
//! `reference.py`'s records) and `OUT/zrag-<precision>-<workload>.f32` (raw little-endian f32,
//! texts × 384, in workload order) for `compare.py`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use zrag_models::{default_encoder_dir, BertEncoder, EncoderPrecision};

struct Args {
    workloads: PathBuf,
    out_dir: PathBuf,
    threads: usize,
    batch: usize,
    repeats: usize,
    precisions: Vec<EncoderPrecision>,
    limit: usize,
    model: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        workloads: PathBuf::from("bench-out/embed/workloads.jsonl"),
        out_dir: PathBuf::from("bench-out/embed"),
        threads: 2,
        batch: 32,
        repeats: 3,
        precisions: vec![EncoderPrecision::F32, EncoderPrecision::Int8],
        limit: 0,
        model: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--workloads" => args.workloads = value()?.into(),
            "--out-dir" => args.out_dir = value()?.into(),
            "--threads" => args.threads = value()?.parse().context("--threads")?,
            "--batch" => args.batch = value()?.parse().context("--batch")?,
            "--repeats" => args.repeats = value()?.parse().context("--repeats")?,
            "--limit" => args.limit = value()?.parse().context("--limit")?,
            "--model" => args.model = Some(value()?.into()),
            "--precision" => {
                args.precisions = value()?
                    .split(',')
                    .map(|p| p.parse().map_err(anyhow::Error::msg))
                    .collect::<Result<_>>()?
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if args.repeats == 0 || args.batch == 0 || args.threads == 0 {
        bail!("--repeats, --batch and --threads must be at least 1");
    }
    Ok(args)
}

struct Workload {
    texts: Vec<String>,
    tokens: usize,
}

/// `workloads.jsonl` lines `{"workload", "id", "text", "tokens"}`, grouped in file order.
fn read_workloads(path: &Path, limit: usize) -> Result<BTreeMap<String, Workload>> {
    let body =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut workloads: BTreeMap<String, Workload> = BTreeMap::new();
    for (number, line) in body
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), number + 1))?;
        let field = |name: &str| {
            row.get(name)
                .with_context(|| format!("{}:{}: missing {name:?}", path.display(), number + 1))
        };
        let name = field("workload")?
            .as_str()
            .context("workload: not a string")?;
        let text = field("text")?.as_str().context("text: not a string")?;
        let tokens = field("tokens")?.as_u64().context("tokens: not a number")? as usize;
        let entry = workloads.entry(name.to_string()).or_insert(Workload {
            texts: Vec::new(),
            tokens: 0,
        });
        if limit == 0 || entry.texts.len() < limit {
            entry.texts.push(text.to_string());
            entry.tokens += tokens;
        }
    }
    if workloads.is_empty() {
        bail!("{}: no workloads", path.display());
    }
    Ok(workloads)
}

fn main() -> Result<()> {
    // The CLI's malloc settings, so the benchmark measures what users run.
    zrag_models::tune_allocator();
    let args = parse_args()?;
    // Both the forward pass and the tokenizer run on rayon's global pool.
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .context("rayon thread pool")?;
    let workloads = read_workloads(&args.workloads, args.limit)?;
    let model_dir = match &args.model {
        Some(dir) => dir.clone(),
        None => default_encoder_dir()?,
    };
    let mut encoder = BertEncoder::load(&model_dir)
        .with_context(|| format!("loading the encoder from {}", model_dir.display()))?;
    encoder.set_batch_size(args.batch);
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;

    let mut results = Vec::new();
    for &precision in &args.precisions {
        encoder.set_precision(precision)?;
        let engine = format!("zrag-{precision}");
        for (name, workload) in &workloads {
            let texts: Vec<&str> = workload.texts.iter().map(String::as_str).collect();
            encoder.embed(&texts[..texts.len().min(args.batch)])?; // warm-up
            let mut seconds = Vec::new();
            let mut embeddings = Vec::new();
            for _ in 0..args.repeats {
                let start = Instant::now();
                embeddings = encoder.embed(&texts)?;
                seconds.push(start.elapsed().as_secs_f64());
            }
            seconds.sort_by(f64::total_cmp);
            let (best, median) = (seconds[0], seconds[seconds.len() / 2]);
            let raw = args.out_dir.join(format!("{engine}-{name}.f32"));
            let mut file = std::io::BufWriter::new(
                std::fs::File::create(&raw)
                    .with_context(|| format!("creating {}", raw.display()))?,
            );
            for value in embeddings.iter().flatten() {
                file.write_all(&value.to_le_bytes())?;
            }
            file.flush()?;
            eprintln!(
                "{engine:10} {name:12} {:>5} texts  best {best:7.3} s  median {median:7.3} s  {:8.1} sentences/s  {:9.0} tokens/s",
                texts.len(),
                texts.len() as f64 / best,
                workload.tokens as f64 / best
            );
            results.push(json!({
                "engine": engine,
                "workload": name,
                "texts": texts.len(),
                "tokens": workload.tokens,
                "batch": args.batch,
                "threads": args.threads,
                "seconds_best": best,
                "seconds_median": median,
                "sentences_per_s": texts.len() as f64 / best,
                "tokens_per_s": workload.tokens as f64 / best,
                "precision": precision.as_str(),
            }));
        }
    }
    let path = args.out_dir.join("zrag-results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
