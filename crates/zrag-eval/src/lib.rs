//! zrag-eval: everything needed to measure zrag.
//!
//! - [`metrics`]: retrieval metrics (recall@k, MRR@10, nDCG@10) over a run and BEIR qrels.
//! - [`answers`]: answer metrics (SQuAD normalisation, exact match, token F1).
//! - [`beir`]: readers and writers for BEIR-format files (corpus.jsonl, queries.jsonl, qrels tsv)
//!   and the question/answer jsonl of `zrag eval qa`.
//! - [`revdict`]: the builder of the reverse-dictionary benchmark (Webster 1913 from Debian's
//!   dict-gcide, WordNet noun glosses as queries; SPEC §4).
//! - [`report`]: `metrics.json`, `report.md` and hand-written SVG plots.
//!
//! All fallible functions return [`EvalError`], whose messages name the file (and line) at fault.

pub mod answers;
pub mod beir;
mod error;
pub mod metrics;
pub mod report;
pub mod revdict;

pub use error::EvalError;
