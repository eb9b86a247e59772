//! `zrag data`: build benchmark data sets.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use zrag_eval::revdict::{self, RevdictConfig};

use super::print_json;
use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Build the reverse-dictionary benchmark (SPEC §4) in BEIR format.
    ///
    /// Corpus: Webster's 1913 entries (Debian dict-gcide) without WordNet-sourced paragraphs;
    /// queries: WordNet noun glosses (Debian wordnet-base); answer: the lemma. Fetch the
    /// sources first with `scripts/fetch-revdict-data.sh`.
    Revdict(RevdictArgs),
}

#[derive(Args, Debug)]
pub struct RevdictArgs {
    /// Output directory (corpus.jsonl, queries.jsonl, qrels/{train,dev,test}.tsv, answers.jsonl).
    #[arg(long, default_value = "bench-out/revdict")]
    pub out: PathBuf,
    /// Keep at most this many corpus entries (every relevant entry of a kept query is kept).
    #[arg(long)]
    pub max_docs: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value_t = 0.1)]
    pub dev_fraction: f64,
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f64,
}

pub fn run(cli: &Cli, cmd: &DataCommand) -> Result<ExitCode> {
    match cmd {
        DataCommand::Revdict(args) => {
            let mut config = RevdictConfig::from_zrag_home(args.out.clone());
            config.max_docs = args.max_docs;
            config.seed = args.seed;
            config.dev_fraction = args.dev_fraction;
            config.test_fraction = args.test_fraction;
            let started = Instant::now();
            let stats = revdict::build(&config)?;
            if cli.json {
                print_json(&stats)?;
            } else {
                println!(
                    "{}\nwritten to {} in {:.1}s",
                    serde_json::to_string_pretty(&stats)?,
                    args.out.display(),
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
