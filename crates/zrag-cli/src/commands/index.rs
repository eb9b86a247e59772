//! `zrag index`: ingest files into the collection.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use zrag_index::collection::{AnnState, VectorPrecision};
use zrag_index::store::Store;
use zrag_rag::{ingest, AnnSettings, IngestOptions, Shard};
use zrag_text::ChunkerConfig;

use super::{load_document_encoder, print_json};
use crate::progress::IngestBar;
use crate::Cli;

#[derive(Args, Debug)]
pub struct IndexArgs {
    /// Files and directories to index (.txt .md .html .pdf .jsonl).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Delete documents that came from these paths but no longer exist there.
    #[arg(long)]
    pub prune: bool,
    /// Maximum chunk length in model tokens.
    #[arg(long, default_value_t = ChunkerConfig::default().max_tokens)]
    pub chunk_tokens: usize,
    /// Tokens of overlap between consecutive chunks of a document.
    #[arg(long, default_value_t = ChunkerConfig::default().overlap_tokens)]
    pub chunk_overlap: usize,
    /// Commit every this many chunks (work since the last commit is lost on a crash).
    #[arg(long, default_value_t = IngestOptions::default().commit_every_chunks)]
    pub commit_every: usize,
    /// Encoder batch size.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Keep an HNSW graph for approximate dense search (on by default; stored in the
    /// collection, so it applies to later runs too).
    #[arg(long, value_name = "on|off")]
    pub hnsw: Option<OnOff>,
    /// HNSW links per node, M (2M on the bottom layer). Default 16.
    #[arg(long)]
    pub hnsw_m: Option<usize>,
    /// HNSW candidate list while inserting. Default 100.
    #[arg(long)]
    pub hnsw_ef_construction: Option<usize>,
    /// Keep no graph below this many chunks (exact search is fast there). Default 20000.
    #[arg(long)]
    pub hnsw_min_chunks: Option<u64>,
    /// Precision exact search scans at: f32, or a compact f16 / int8 copy (2 or 1 byte per
    /// value) whose shortlist is re-scored from f32. Stored in the collection.
    #[arg(long, value_name = "f32|f16|int8")]
    pub precision: Option<VectorPrecision>,
    /// Index only part i of n (0-based) of the documents, by a hash of their ids: n machines
    /// run `--shard 0/n` … `--shard n-1/n` against one PostgreSQL store. Re-running a shard
    /// after a crash resumes it (committed documents are skipped). `--prune` prunes only the
    /// shard's own documents.
    #[arg(long, value_name = "i/n", value_parser = Shard::parse)]
    pub shard: Option<Shard>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// The stored HNSW settings with the ones given on the command line applied (`None` if none
/// was given).
fn ann_settings(store: &Store, args: &IndexArgs) -> Result<Option<AnnSettings>> {
    if args.hnsw.is_none()
        && args.hnsw_m.is_none()
        && args.hnsw_ef_construction.is_none()
        && args.hnsw_min_chunks.is_none()
    {
        return Ok(None);
    }
    let stored = match store.as_embedded() {
        Some(collection) => collection.manifest()?.ann,
        // PostgreSQL fixes its index settings when the chunks table is created.
        None => AnnState::default(),
    };
    let m = args.hnsw_m.unwrap_or(stored.m);
    if !(2..=128).contains(&m) {
        anyhow::bail!("--hnsw-m must be between 2 and 128 (got {m})");
    }
    Ok(Some(AnnSettings {
        enabled: args.hnsw.map_or(stored.enabled, |v| v == OnOff::On),
        m,
        ef_construction: args
            .hnsw_ef_construction
            .unwrap_or(stored.ef_construction)
            .max(1),
        min_rows: args.hnsw_min_chunks.unwrap_or(stored.min_rows),
    }))
}

pub fn run(cli: &Cli, args: &IndexArgs) -> Result<ExitCode> {
    if args.chunk_overlap >= args.chunk_tokens {
        anyhow::bail!(
            "--chunk-overlap ({}) must be smaller than --chunk-tokens ({})",
            args.chunk_overlap,
            args.chunk_tokens
        );
    }
    let started = Instant::now();
    let mut encoder = load_document_encoder(cli)?;
    encoder.set_batch_size(args.batch_size.max(1));
    let store = cli.open_or_create_store()?;
    let options = IngestOptions {
        chunker: ChunkerConfig {
            max_tokens: args.chunk_tokens.min(encoder.max_tokens()),
            overlap_tokens: args.chunk_overlap,
        },
        commit_every_chunks: args.commit_every.max(1),
        prune: args.prune,
        ann: ann_settings(&store, args)?,
        precision: args.precision,
        shard: args.shard,
    };
    let mut bar = IngestBar::default();
    let report = ingest(&store, &encoder, &args.paths, &options, &mut bar)?;
    drop(bar);
    let seconds = started.elapsed().as_secs_f64();
    if cli.json {
        let mut value = serde_json::to_value(&report)?;
        value["seconds"] = seconds.into();
        value["collection"] = cli.store_name().into();
        print_json(&value)?;
    } else {
        println!(
            "indexed {} documents from {} files into {} in {:.1}s: {} added, {} updated, {} unchanged, {} pruned; {} chunks embedded (generation {})",
            report.documents_seen,
            report.files_seen,
            cli.store_name(),
            seconds,
            report.added,
            report.updated,
            report.unchanged,
            report.pruned,
            report.chunks_embedded,
            report.generation
        );
    }
    for failure in &report.failures {
        eprintln!("zrag: skipped {}: {}", failure.path, failure.error);
    }
    Ok(if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
