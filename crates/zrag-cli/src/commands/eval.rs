//! `zrag eval retrieval`: recall@k, MRR@10 and nDCG@10 on BEIR-format queries and qrels.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use zrag_eval::{beir, metrics, report};

use super::print_json;
use super::retrieval::{self, RetrievalFlags};
use crate::progress::bar;
use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Retrieval quality against relevance judgements (BEIR queries.jsonl + qrels .tsv).
    ///
    /// The collection must already hold the corpus (`zrag index corpus.jsonl`). Only the
    /// queries that appear in the qrels file are evaluated, so one queries.jsonl can serve
    /// train/dev/test qrels.
    Retrieval(RetrievalArgs),
    /// Answer quality (exact match, token F1) against gold answers, for closed-book,
    /// retrieve-then-read, RAG-Sequence and RAG-Token side by side.
    Qa(Box<super::qa::QaArgs>),
}

#[derive(Args, Debug)]
pub struct RetrievalArgs {
    /// BEIR queries.jsonl ({"_id", "text"} per line).
    #[arg(long)]
    pub queries: PathBuf,
    /// BEIR qrels .tsv (query-id, corpus-id, score).
    #[arg(long)]
    pub qrels: PathBuf,
    #[command(flatten)]
    pub retrieval: RetrievalFlags,
    /// Evaluate at most this many queries (the first ones in qrels order).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write metrics.json, report.md and plots into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Queries encoded and searched per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
}

pub fn run(cli: &Cli, cmd: &EvalCommand) -> Result<ExitCode> {
    match cmd {
        EvalCommand::Retrieval(args) => retrieval(cli, args),
        EvalCommand::Qa(args) => super::qa::run(cli, args),
    }
}

const DEPTH: usize = 100;
const CUTOFFS: [usize; 6] = [1, 5, 10, 20, 50, 100];

fn retrieval(cli: &Cli, args: &RetrievalArgs) -> Result<ExitCode> {
    let queries = beir::load_queries(&args.queries)?;
    let qrels = beir::load_qrels(&args.qrels)?;
    let mut selected: Vec<&beir::Query> = queries
        .iter()
        .filter(|q| qrels.contains_key(&q.id))
        .collect();
    let missing = qrels.len() - selected.len();
    if let Some(limit) = args.limit {
        selected.truncate(limit);
    }
    anyhow::ensure!(
        !selected.is_empty(),
        "none of the {} queries in {} has judgements in {}",
        queries.len(),
        args.queries.display(),
        args.qrels.display()
    );
    let judged: beir::Qrels = selected
        .iter()
        .map(|q| (q.id.clone(), qrels[&q.id].clone()))
        .collect();

    let retriever = retrieval::open(cli, &args.retrieval)?;
    let started = Instant::now();
    let progress = bar(selected.len() as u64, "queries");
    let mut run: BTreeMap<String, Vec<(String, f32)>> = BTreeMap::new();
    for batch in selected.chunks(args.batch_size.max(1)) {
        let texts: Vec<&str> = batch.iter().map(|q| q.text.as_str()).collect();
        let results = retriever
            .retrieve_documents(&texts, DEPTH)
            .context("retrieving")?;
        for (query, docs) in batch.iter().zip(results) {
            run.insert(
                query.id.clone(),
                docs.into_iter().map(|d| (d.doc_id, d.score)).collect(),
            );
        }
        progress.inc(batch.len() as u64);
    }
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let evaluation = metrics::evaluate_retrieval(&run, &judged, &CUTOFFS);

    let mut output = serde_json::Map::new();
    for (name, value) in &evaluation.metrics {
        output.insert(name.clone(), json!(value));
    }
    output.insert("num_queries".into(), json!(evaluation.num_queries));
    output.insert("mode".into(), json!(args.retrieval.mode));
    output.insert("fusion".into(), json!(args.retrieval.fusion));
    output.insert("dense_weight".into(), json!(args.retrieval.dense_weight));
    output.insert("hybrid_depth".into(), json!(args.retrieval.hybrid_depth));
    output.insert("rerank".into(), json!(args.retrieval.rerank));
    output.insert("rerank_depth".into(), json!(args.retrieval.rerank_depth));
    output.insert("ef".into(), json!(args.retrieval.ef));
    output.insert("filters".into(), json!(args.retrieval.filters));
    output.insert("exact".into(), json!(args.retrieval.exact));
    output.insert("seconds".into(), json!(seconds));
    output.insert(
        "queries_per_second".into(),
        json!(selected.len() as f64 / seconds.max(1e-9)),
    );
    output.insert("collection".into(), json!(cli.store_name()));
    output.insert("queries_without_text".into(), json!(missing));
    let output = serde_json::Value::Object(output);
    if let Some(dir) = &args.report {
        report::write_retrieval_report(dir, "Retrieval evaluation", &evaluation, &output)?;
    }
    if cli.json {
        print_json(&output)?;
    } else {
        for (name, value) in &evaluation.metrics {
            println!("{name:>12}  {value:.4}");
        }
        println!(
            "{} queries in {seconds:.1}s ({:.1} queries/s)",
            evaluation.num_queries,
            selected.len() as f64 / seconds.max(1e-9)
        );
        if let Some(dir) = &args.report {
            println!("report: {}", dir.join("report.md").display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
