//! The retrieval flags shared by `search`, `ask` and `eval`: mode, fusion, exact or HNSW,
//! filters, re-ranking.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use zrag_index::filter::Filter;
use zrag_models::generator::{default_generator_path, LocalGenerator};
use zrag_rag::rerank::{BiEncoderReranker, GeneratorReranker};
use zrag_rag::{FusionMethod, RetrievalMode, RetrievalSettings, Retriever};

use super::load_query_encoder;
use crate::Cli;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Inner product of E_Q(query) and E_D(chunk) (HNSW when the collection has a graph).
    Dense,
    /// BM25 over the chunk text.
    Bm25,
    /// Dense and BM25 fused (see --fusion).
    Hybrid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// Reciprocal rank fusion.
    Rrf,
    /// Weighted sum of min-max normalised scores (see --dense-weight).
    Score,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RerankArg {
    /// Keep the first-stage order.
    None,
    /// Score log p(query | chunk) with the generator (unsupervised passage re-ranking).
    Generator,
    /// Re-score by the bi-encoder's inner product E_Q(x) · E_D(z).
    BiEncoder,
}

#[derive(Args, Debug, Clone)]
pub struct RetrievalFlags {
    #[arg(long, value_enum, default_value = "dense")]
    pub mode: Mode,
    /// How hybrid search combines its two lists.
    #[arg(long, value_enum, default_value = "rrf")]
    pub fusion: Fusion,
    /// Weight of the dense scores in --fusion score (BM25 gets 1 − this).
    #[arg(long, default_value_t = 0.5)]
    pub dense_weight: f64,
    /// Candidates each side contributes to hybrid fusion.
    #[arg(long, default_value_t = 100)]
    pub hybrid_depth: usize,
    /// Exact dense search even when the collection has an HNSW graph.
    #[arg(long)]
    pub exact: bool,
    /// HNSW beam width at search time (default 128, at least 2k).
    #[arg(long)]
    pub ef: Option<usize>,
    /// Only chunks of matching documents: key=glob on source, id, title or a metadata field
    /// (repeat to require several), e.g. --filter 'source=docs/*.md' --filter lang=en.
    #[arg(long = "filter", value_name = "KEY=GLOB")]
    pub filters: Vec<String>,
    /// Re-rank the first-stage candidates.
    #[arg(long, value_enum, default_value = "none")]
    pub rerank: RerankArg,
    /// Candidates the re-ranker sees.
    #[arg(long, default_value_t = 20)]
    pub rerank_depth: usize,
    /// GGUF generator that --rerank generator scores with (default: the installed SmolLM2).
    #[arg(long, value_name = "GGUF")]
    pub rerank_model: Option<PathBuf>,
}

impl RetrievalFlags {
    pub fn settings(&self) -> Result<RetrievalSettings> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.dense_weight),
            "--dense-weight must be between 0 and 1"
        );
        let filter = if self.filters.is_empty() {
            None
        } else {
            Some(Filter::parse(&self.filters).map_err(anyhow::Error::msg)?)
        };
        Ok(RetrievalSettings {
            mode: match self.mode {
                Mode::Dense => RetrievalMode::Dense,
                Mode::Bm25 => RetrievalMode::Bm25,
                Mode::Hybrid => RetrievalMode::Hybrid,
            },
            fusion: match self.fusion {
                Fusion::Rrf => FusionMethod::Rrf,
                Fusion::Score => FusionMethod::Score,
            },
            hybrid_depth: self.hybrid_depth.max(1),
            dense_weight: self.dense_weight,
            exact: self.exact,
            ef: self.ef,
            filter,
        })
    }
}

/// A retriever over the collection, set up as the flags say.
pub fn open(cli: &Cli, flags: &RetrievalFlags) -> Result<Retriever> {
    let store = cli.open_store()?;
    let retriever = Retriever::over(load_query_encoder(cli)?, store.snapshot()?)?
        .with_settings(flags.settings()?);
    anyhow::ensure!(flags.rerank_depth >= 1, "--rerank-depth must be at least 1");
    Ok(match flags.rerank {
        RerankArg::None => retriever,
        RerankArg::BiEncoder => {
            retriever.with_reranker(Box::new(BiEncoderReranker), flags.rerank_depth)
        }
        RerankArg::Generator => {
            let path = match &flags.rerank_model {
                Some(path) => path.clone(),
                None => default_generator_path()?,
            };
            let generator = LocalGenerator::load(&path).with_context(|| {
                format!("loading the re-ranking generator from {}", path.display())
            })?;
            retriever.with_reranker(
                Box::new(GeneratorReranker::new(Arc::new(generator))),
                flags.rerank_depth,
            )
        }
    })
}
