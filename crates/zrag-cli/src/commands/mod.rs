//! One module per subcommand, plus the set-up they share.

pub mod ask;
pub mod copy;
pub mod data;
pub mod embed;
pub mod eval;
pub mod index;
pub mod qa;
pub mod retrieval;
pub mod search;
pub mod serve;
pub mod status;
pub mod train;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use zrag_index::store::{PgOptions, Store, StoreLocation};
use zrag_models::BertEncoder;

use crate::{Cli, Command};

impl Cli {
    /// `--store` if given, else `--collection`.
    pub fn store_location(&self) -> StoreLocation {
        match &self.store {
            Some(spec) => StoreLocation::parse(spec),
            None => StoreLocation::Embedded(self.collection.clone()),
        }
    }

    /// For messages: the directory or the URL without its password.
    pub fn store_name(&self) -> String {
        self.store_location().describe()
    }

    fn pg_options(&self) -> Result<PgOptions> {
        if self.read_replica.is_some()
            && !matches!(self.store_location(), StoreLocation::Postgres(_))
        {
            anyhow::bail!("--read-replica needs a PostgreSQL --store");
        }
        Ok(PgOptions {
            read_replica: self.read_replica.clone(),
            pool_size: self.pg_pool_size.max(1),
            ..PgOptions::default()
        })
    }

    /// The existing collection.
    pub fn open_store(&self) -> Result<Store> {
        Store::open(&self.store_location(), &self.pg_options()?)
            .with_context(|| format!("opening the collection {}", self.store_name()))
    }

    /// The collection, created empty if there is none yet.
    pub fn open_or_create_store(&self) -> Result<Store> {
        Store::open_or_create(&self.store_location(), &self.pg_options()?)
            .with_context(|| format!("opening the collection {}", self.store_name()))
    }
}

pub fn run(cli: &Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Index(args) => index::run(cli, args),
        Command::Ask(args) => ask::run(cli, args),
        Command::Search(args) => search::run(cli, args),
        Command::Embed(args) => embed::run(cli, args),
        Command::Delete(args) => status::delete(cli, args),
        Command::Status => status::run(cli),
        Command::Eval(cmd) => eval::run(cli, cmd),
        Command::Data(cmd) => data::run(cli, cmd),
        Command::Train(cmd) => train::run(cli, cmd),
        Command::Serve(args) => serve::run(cli, args),
        Command::Copy(args) => copy::run(cli, args),
    }
}

pub fn encoder_dir(cli: &Cli, specific: &Option<PathBuf>) -> Result<PathBuf> {
    match specific.as_ref().or(cli.encoder.as_ref()) {
        Some(dir) => Ok(dir.clone()),
        None => Ok(zrag_models::default_encoder_dir()?),
    }
}

pub fn load_query_encoder(cli: &Cli) -> Result<Arc<BertEncoder>> {
    let dir = encoder_dir(cli, &cli.query_encoder)?;
    Ok(Arc::new(load_encoder(cli, &dir, "query")?))
}

pub fn load_document_encoder(cli: &Cli) -> Result<BertEncoder> {
    let dir = encoder_dir(cli, &cli.doc_encoder)?;
    load_encoder(cli, &dir, "document")
}

/// An encoder for inference, at `--encoder-precision`.
fn load_encoder(cli: &Cli, dir: &std::path::Path, role: &str) -> Result<BertEncoder> {
    let mut encoder = BertEncoder::load(dir)
        .with_context(|| format!("loading the {role} encoder from {}", dir.display()))?;
    encoder.set_precision(cli.encoder_precision)?;
    Ok(encoder)
}

/// Prints `value` as pretty JSON. A closed pipe (`zrag ... | head`) ends quietly instead of
/// panicking as `println!` would.
pub fn print_json(value: &impl serde::Serialize) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = serde_json::to_writer_pretty(&mut out, value)
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(out));
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => Ok(other?),
    }
}
