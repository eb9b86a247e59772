//! `zrag serve`: the collection behind an HTTP API (zrag's own and OpenAI-compatible).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use zrag_server::{check_access, AppState, Engine, Limits};
use zrag_text::ChunkerConfig;

use super::ask::{GenerationArgs, MarginalizeArg};
use super::retrieval::{RerankArg, RetrievalFlags};
use super::{load_document_encoder, load_query_encoder};
use crate::Cli;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on. Anything but loopback requires --api-key.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Bearer token every request but GET /healthz must present.
    #[arg(long, env = "ZRAG_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Serve search, documents and embeddings only (ask and chat answer 503).
    #[arg(long)]
    pub no_generator: bool,
    /// Default marginalisation of /v1/ask.
    #[arg(long, value_enum, default_value = "sequence")]
    pub marginalize: MarginalizeArg,
    #[command(flatten)]
    pub generation: GenerationArgs,
    #[command(flatten)]
    pub retrieval: RetrievalFlags,
    /// Maximum chunk length in model tokens for documents sent to POST /v1/documents.
    #[arg(long, default_value_t = ChunkerConfig::default().max_tokens)]
    pub chunk_tokens: usize,
    /// Tokens of overlap between consecutive chunks.
    #[arg(long, default_value_t = ChunkerConfig::default().overlap_tokens)]
    pub chunk_overlap: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Seconds a request may take (a stream is cut after it).
    #[arg(long, default_value_t = Limits::default().request_timeout.as_secs_f64())]
    pub request_timeout: f64,
    /// Largest k a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_k)]
    pub max_request_k: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_tokens)]
    pub max_request_tokens: usize,
    /// Most texts per embeddings request and documents per upsert.
    #[arg(long, default_value_t = Limits::default().max_batch)]
    pub max_batch: usize,
    /// Searches (and embedding requests) at once; more get 503.
    #[arg(long, default_value_t = Limits::default().max_concurrent_searches)]
    pub max_concurrent_searches: usize,
    /// Generations at once; more get 503.
    #[arg(long, default_value_t = Limits::default().max_concurrent_generations)]
    pub max_concurrent_generations: usize,
}

pub fn run(cli: &Cli, args: &ServeArgs) -> Result<ExitCode> {
    check_access(args.addr, args.api_key.as_deref())?;
    anyhow::ensure!(
        args.retrieval.rerank == RerankArg::None,
        "zrag serve does not re-rank yet: drop --rerank"
    );
    anyhow::ensure!(
        args.generation.remote_generator.is_none(),
        "zrag serve generates locally: drop --remote-generator"
    );
    anyhow::ensure!(
        args.chunk_overlap < args.chunk_tokens,
        "--chunk-overlap ({}) must be smaller than --chunk-tokens ({})",
        args.chunk_overlap,
        args.chunk_tokens
    );
    anyhow::ensure!(
        args.request_timeout.is_finite() && args.request_timeout > 0.0,
        "--request-timeout must be a positive number of seconds"
    );
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_secs_f64(args.request_timeout),
        max_k: args.max_request_k.max(1),
        max_tokens: args.max_request_tokens.max(1),
        max_batch: args.max_batch.max(1),
        max_concurrent_searches: args.max_concurrent_searches.max(1),
        max_concurrent_generations: args.max_concurrent_generations.max(1),
    };
    let mut answer = args.generation.options(args.marginalize)?;
    answer.k = answer.k.min(limits.max_k);
    let generator = if args.no_generator {
        None
    } else {
        Some(Arc::new(args.generation.load_generator()?))
    };
    let query_encoder = load_query_encoder(cli)?;
    let doc_encoder = if cli.doc_encoder.is_none() && cli.query_encoder.is_none() {
        query_encoder.clone()
    } else {
        Arc::new(load_document_encoder(cli)?)
    };
    let store = cli.open_or_create_store()?;
    let engine = Engine {
        store,
        query_encoder,
        doc_encoder,
        generator,
        retrieval: args.retrieval.settings()?,
        answer,
        chunker: ChunkerConfig {
            max_tokens: args.chunk_tokens,
            overlap_tokens: args.chunk_overlap,
        },
    };
    let state = AppState::new(engine, limits, args.api_key.clone())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "zrag serve: {} on http://{addr} (generation {}, {} documents)",
            cli.store_name(),
            state.gauges().generation,
            state.gauges().documents
        );
        zrag_server::serve(listener, state, shutdown_signal()).await?;
        eprintln!("zrag serve: stopped");
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM: stop accepting, let requests in flight finish.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
}
