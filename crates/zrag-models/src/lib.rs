//! Tokenizers and neural models for zrag.
//!
//! Today: the BERT bi-encoder of the retriever (SPEC §1–§3). [`BertEncoder`] loads any
//! Hugging Face-format BERT directory (by default all-MiniLM-L6-v2, installed by
//! `scripts/fetch-models.sh`) and turns texts into L2-normalised vectors with zrag's own,
//! differentiable BERT forward pass; [`BiEncoder`] pairs the query and document encoders E_Q
//! and E_D.
//!
//! Modules: [`bert`] (the transformer and pooling), [`ops`] (fused CPU kernels with
//! gradients), [`config`] (the model directory's JSON files), [`testing`] (tiny random-weight
//! models for tests). `scripts/reference_minilm.py` is an independent numpy implementation
//! that `tests/reference_minilm.rs` checks this crate against.
//!
//! Speed: matmuls are about three quarters of the time. The encoder's dense layers run on
//! `ops::packed_gemm`, an AVX2+FMA kernel blocked for their shapes; the other matmuls (and the
//! dense layers on inputs under 1,024 rows, CPUs without AVX2 or with AVX-512) go through `gemm`, with its
//! AVX-512 kernels turned on (`x86-v4`, runtime-detected).
//! `examples/bench_encoder.rs` measures throughput.

/// Defines `fn $name(args) [-> ret]` that runs `$body` compiled for AVX2+FMA when the CPU
/// supports it, and for the baseline target otherwise: plain loops then vectorise with 256-bit
/// FMA instead of SSE2.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        multiversion!($(#[$meta])* fn $name($($arg: $ty),*) -> () $body);
    };
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn portable($($arg: $ty),*) -> $ret $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    portable($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` is compiled with.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

mod allocator;
pub mod bert;
pub mod config;
mod encoder;
mod error;
pub mod generator;
mod identity;
mod int8;
pub mod ops;
pub mod testing;

use std::path::PathBuf;

pub use allocator::tune_allocator;
pub use encoder::{BertEncoder, BiEncoder, EncoderPrecision, DEFAULT_BATCH_SIZE};
pub use error::ModelError;
pub use generator::{CausalLm, DecodeState, GeneratorTokenizer, Llama, LocalGenerator};
pub use identity::ModelIdentity;

/// Name of the default encoder's directory under `zrag_home()/models`.
pub const DEFAULT_ENCODER_NAME: &str = "all-MiniLM-L6-v2";

/// zrag's data directory: `$ZRAG_HOME`, or `~/.cache/zrag`.
pub fn zrag_home() -> PathBuf {
    if let Some(home) = std::env::var_os("ZRAG_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    let user_home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    user_home.join(".cache").join("zrag")
}

/// The default encoder's directory, `zrag_home()/models/all-MiniLM-L6-v2`; an error telling
/// the user to run `scripts/fetch-models.sh` if it is not there.
pub fn default_encoder_dir() -> Result<PathBuf, ModelError> {
    let dir = zrag_home().join("models").join(DEFAULT_ENCODER_NAME);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(ModelError::ModelNotInstalled { path: dir })
    }
}
