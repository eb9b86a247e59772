//! `zrag copy`: move an embedded collection into another store (PostgreSQL) without
//! re-encoding anything.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use zrag_index::collection::Collection;
use zrag_index::store::{copy_collection, PgOptions, Store, StoreLocation};

use super::print_json;
use crate::progress::bar;
use crate::Cli;

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The embedded collection to copy (default: --collection; --store and ZRAG_STORE are
    /// not read here, so `ZRAG_STORE` can name the target's database in the same shell).
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// The target store: a `postgres://` URL (or another collection directory).
    #[arg(long)]
    pub to: String,
    /// Commit every this many chunks (an interrupted copy resumes from the last commit).
    #[arg(long, default_value_t = 8192)]
    pub commit_every: usize,
}

pub fn run(cli: &Cli, args: &CopyArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let from = args.from.clone().unwrap_or_else(|| cli.collection.clone());
    let snapshot = Collection::open(&from)
        .and_then(|c| c.snapshot())
        .with_context(|| format!("opening the collection {}", from.display()))?;
    let location = StoreLocation::parse(&args.to);
    let target = Store::open_or_create(
        &location,
        &PgOptions {
            pool_size: cli.pg_pool_size.max(1),
            ..PgOptions::default()
        },
    )
    .with_context(|| format!("opening the target {}", location.describe()))?;
    let progress = bar(snapshot.num_live_chunks(), "copying");
    let stats = copy_collection(
        &snapshot,
        &target,
        args.commit_every.max(1),
        &mut |done, _| progress.set_position(done as u64),
    )?;
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if cli.json {
        let mut value = serde_json::to_value(&stats)?;
        value["seconds"] = seconds.into();
        value["to"] = location.describe().into();
        print_json(&value)?;
    } else {
        println!(
            "copied {} documents ({} chunks) from {} to {} in {seconds:.1}s; {} unchanged (generation {})",
            stats.documents_copied,
            stats.chunks_copied,
            from.display(),
            location.describe(),
            stats.documents_unchanged,
            stats.generation
        );
    }
    Ok(ExitCode::SUCCESS)
}
