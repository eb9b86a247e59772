//! `zrag status` and `zrag delete`.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::print_json;
use crate::Cli;

pub fn run(cli: &Cli) -> Result<ExitCode> {
    let store = cli.open_store()?;
    let snapshot = store.snapshot()?;
    let Some(embedded) = snapshot.as_embedded() else {
        let value = json!({
            "collection": cli.store_name(),
            "store": "postgres",
            "generation": snapshot.generation(),
            "embedding": snapshot.embedding(),
            "documents": snapshot.num_documents(),
            "chunks": snapshot.num_live_chunks(),
        });
        if cli.json {
            print_json(&value)?;
        } else {
            println!(
                "{} (PostgreSQL + pgvector): {} documents, {} chunks (generation {}), embeddings {}",
                cli.store_name(),
                snapshot.num_documents(),
                snapshot.num_live_chunks(),
                snapshot.generation(),
                snapshot
                    .embedding()
                    .map_or("none yet".to_string(), |e| e.describe()),
            );
        }
        return Ok(ExitCode::SUCCESS);
    };
    let manifest = embedded.manifest();
    let value = json!({
        "collection": cli.store_name(),
        "store": "embedded",
        "format_version": manifest.version,
        "generation": manifest.generation,
        "embedding": manifest.embedding,
        "documents": embedded.num_documents(),
        "chunks": embedded.num_live_chunks(),
        "segments": manifest.segments.len(),
        "precision": manifest.precision,
        "hnsw": {
            "enabled": manifest.ann.enabled,
            "m": manifest.ann.m,
            "ef_construction": manifest.ann.ef_construction,
            "min_chunks": manifest.ann.min_rows,
            "graph_chunks": embedded.ann_rows(),
        },
    });
    if cli.json {
        print_json(&value)?;
    } else {
        println!(
            "{}: {} documents, {} chunks in {} segments (generation {}), embeddings {}, \
             scan precision {}, HNSW {}",
            cli.store_name(),
            embedded.num_documents(),
            embedded.num_live_chunks(),
            manifest.segments.len(),
            manifest.generation,
            manifest
                .embedding
                .as_ref()
                .map_or("none yet".to_string(), |e| e.describe()),
            manifest.precision,
            match embedded.ann_rows() {
                Some(rows) => format!("over {rows} chunks"),
                None if manifest.ann.enabled => {
                    format!("from {} chunks", manifest.ann.min_rows)
                }
                None => "off".to_string(),
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Document ids (a file's path as indexed, or a jsonl line's _id).
    #[arg(required = true)]
    pub ids: Vec<String>,
}

pub fn delete(cli: &Cli, args: &DeleteArgs) -> Result<ExitCode> {
    let store = cli.open_store()?;
    let mut writer = store.writer()?;
    let mut missing = Vec::new();
    for id in &args.ids {
        if !writer.delete(id)? {
            missing.push(id.clone());
        }
    }
    let stats = writer.commit()?;
    if cli.json {
        print_json(
            &json!({"deleted": stats.documents_deleted, "not_found": missing, "generation": stats.generation}),
        )?;
    } else {
        println!("deleted {} documents", stats.documents_deleted);
        for id in &missing {
            eprintln!("zrag: no document with id {id:?}");
        }
    }
    Ok(if missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
