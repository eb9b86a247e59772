//! Domain adaptation for zrag (SPEC §1, "Advanced RAG"): training the retriever and the
//! generator on a user's data.
//!
//! - [`encoder`]: E_Q / E_D with trainable weights, checkpoints as model directories;
//! - [`optim`]: AdamW with warm-up and decay, global gradient clipping;
//! - [`loss`]: DPR's contrastive loss, p_LSR and KL(p_R ‖ p_LSR);
//! - [`corpus`]: the collection's chunks as training slots, and the index training retrieves
//!   from;
//! - [`generations`]: asynchronous re-indexing while E_D trains;
//! - [`retriever`]: the DPR / LSR training loop, dev evaluation, learning curves;
//! - [`data`]: training examples from BEIR qrels or question/answer pairs.

pub mod corpus;
pub mod data;
pub mod encoder;
mod error;
pub mod generations;
pub mod generator;
pub mod loss;
pub mod optim;
pub mod retriever;

pub use error::{Result, TrainError};
