//! `zrag embed`: print E_Q / E_D embeddings.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::{load_document_encoder, load_query_encoder, print_json};
use crate::Cli;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EmbedAs {
    /// Encode with E_Q.
    Query,
    /// Encode with E_D.
    Document,
}

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// Texts to embed.
    #[arg(required = true)]
    pub texts: Vec<String>,
    #[arg(long = "as", value_enum, default_value = "query")]
    pub as_: EmbedAs,
}

#[derive(Serialize)]
struct EmbedOutput {
    model: String,
    dim: usize,
    embeddings: Vec<Vec<f32>>,
}

pub fn run(cli: &Cli, args: &EmbedArgs) -> Result<ExitCode> {
    let encoder = match args.as_ {
        EmbedAs::Query => load_query_encoder(cli)?,
        EmbedAs::Document => std::sync::Arc::new(load_document_encoder(cli)?),
    };
    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let embeddings = encoder.embed(&texts)?;
    // Embeddings are data: JSON either way.
    let _ = cli.json;
    print_json(&EmbedOutput {
        model: encoder.identity().name.clone(),
        dim: encoder.dim(),
        embeddings,
    })?;
    Ok(ExitCode::SUCCESS)
}
