//! `zrag`: index documents, search them, embed text, evaluate retrieval, build benchmarks.
//!
//! Each subcommand lives in its own module; this file holds the argument model and the shared
//! set-up (collection path, encoder, thread pool).

mod commands;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// zrag: retrieval-augmented generation, with the real mathematics, on a laptop CPU.
///
/// Start with `zrag index DIR` to build a collection (./.zrag by default) from text, Markdown,
/// HTML, PDF and JSONL files, then `zrag search "question"`.
#[derive(Parser, Debug)]
#[command(name = "zrag", version, about, long_about)]
pub struct Cli {
    /// Collection directory (the embedded store).
    #[arg(long, global = true, env = "ZRAG_COLLECTION", default_value = ".zrag")]
    pub collection: PathBuf,

    /// Where the collection lives: a directory, or a PostgreSQL + pgvector database as
    /// `postgres://user:password@host:port/db?schema=NAME` (schema default `zrag`). Overrides
    /// --collection.
    #[arg(long, global = true, env = "ZRAG_STORE")]
    pub store: Option<String>,

    /// PostgreSQL: send read queries (search, ask, eval, serve's reads) to this streaming
    /// replica of the --store database; writes still go to the primary.
    #[arg(long, global = true, env = "ZRAG_READ_REPLICA")]
    pub read_replica: Option<String>,

    /// PostgreSQL: connections per pool (primary, and replica if any).
    #[arg(long, global = true, env = "ZRAG_PG_POOL_SIZE", default_value_t = 8)]
    pub pg_pool_size: usize,

    /// Encoder directory (HF format: config.json, model.safetensors, tokenizer.json) used as
    /// both E_Q and E_D. Default: all-MiniLM-L6-v2 from `scripts/fetch-models.sh`.
    #[arg(long, global = true, env = "ZRAG_ENCODER")]
    pub encoder: Option<PathBuf>,

    /// Query encoder E_Q, when it differs from the document encoder (e.g. after training).
    #[arg(long, global = true)]
    pub query_encoder: Option<PathBuf>,

    /// Document encoder E_D, when it differs from the query encoder.
    #[arg(long, global = true)]
    pub doc_encoder: Option<PathBuf>,

    /// Arithmetic of the encoders' dense layers: `f32` (embeddings equal the reference model's)
    /// or `int8` (measured 1.3x faster on an AVX2 CPU; cosine to f32 ≥ 0.99, see
    /// BENCHMARKS.md). Vectors of either can be searched with queries of the other.
    #[arg(
        long,
        global = true,
        env = "ZRAG_ENCODER_PRECISION",
        default_value = "f32"
    )]
    pub encoder_precision: zrag_models::EncoderPrecision,

    /// Worker threads (default: all cores).
    #[arg(long, global = true, env = "ZRAG_THREADS")]
    pub threads: Option<usize>,

    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Add or update documents: files, directories (recursive) and BEIR-style .jsonl corpora.
    ///
    /// Incremental: unchanged documents are skipped, changed ones replaced. Files that cannot
    /// be read are reported (and make the exit code 2) without stopping the rest.
    Index(commands::index::IndexArgs),
    /// Retrieve the chunks closest to a query, with their retrieval probabilities p(z|x).
    Search(commands::search::SearchArgs),
    /// Answer a question from the collection (RAG-Sequence, RAG-Token or retrieve-then-read),
    /// citing sources by their posterior p(z|x,y).
    Ask(commands::ask::AskArgs),
    /// Print embeddings of texts (E_Q for queries, E_D for documents).
    Embed(commands::embed::EmbedArgs),
    /// Delete documents by id.
    Delete(commands::status::DeleteArgs),
    /// Show what the collection holds.
    Status,
    /// Evaluate against benchmark data.
    #[command(subcommand)]
    Eval(commands::eval::EvalCommand),
    /// Build benchmark data sets.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
    /// Adapt the retriever (DPR, LSR) or the generator (LoRA) to your data.
    #[command(subcommand)]
    Train(commands::train::TrainCommand),
    /// Serve the collection over HTTP: search, ask (streaming), document upserts, metrics,
    /// and OpenAI-compatible embeddings and chat completions.
    Serve(Box<commands::serve::ServeArgs>),
    /// Copy an embedded collection into another store (e.g. PostgreSQL) without re-encoding.
    Copy(commands::copy::CopyArgs),
}

fn main() -> ExitCode {
    zrag_models::tune_allocator();
    let cli = Cli::parse();
    if let Some(threads) = cli.threads {
        // Only fails if a pool was already built, which cannot happen this early.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build_global();
    }
    match commands::run(&cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("zrag: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
