//! `zrag search`: the top-k chunks for a query, with p_η(z|x).

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use zrag_rag::RetrievedChunk;

use super::print_json;
use super::retrieval::{self, Mode, RetrievalFlags};
use crate::Cli;

#[derive(Args, Debug)]
pub struct SearchArgs {
    /// The query.
    pub query: String,
    /// Number of chunks to return (p(z|x) is normalised over these).
    #[arg(long, short, default_value_t = 10)]
    pub k: usize,
    #[command(flatten)]
    pub retrieval: RetrievalFlags,
}

#[derive(Serialize)]
struct SearchOutput<'a> {
    query: &'a str,
    mode: Mode,
    hits: Vec<RetrievedChunk>,
}

pub fn run(cli: &Cli, args: &SearchArgs) -> Result<ExitCode> {
    let retriever = retrieval::open(cli, &args.retrieval)?;
    let hits = retriever.retrieve(&args.query, args.k)?;
    if cli.json {
        print_json(&SearchOutput {
            query: &args.query,
            mode: args.retrieval.mode,
            hits,
        })?;
    } else {
        if hits.is_empty() {
            println!("no results (is the collection empty?)");
        }
        for hit in &hits {
            let title = hit.title.as_deref().unwrap_or(&hit.doc_id);
            println!(
                "{:>2}. {title}  [{}]  score {:.4}  p {:.3}",
                hit.rank, hit.chunk_id, hit.score, hit.prob
            );
            println!("    {}", snippet(&hit.text, 240));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The first `max_chars` characters on one line.
pub fn snippet(text: &str, max_chars: usize) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}
