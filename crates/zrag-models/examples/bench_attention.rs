//! The fused attention op's forward at an encoder batch's shape (32 sequences × 128 tokens,
//! MiniLM's 12 heads of 32 values), median of `rounds` calls.
//!
//! ```text
//! cargo run --release -p zrag-models --example bench_attention -- [rounds] [threads]
//! ```

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use zrag_models::ops::attention;

const BATCH: usize = 32;
const SEQ: usize = 128;
const HEADS: usize = 12;
const HEAD_DIM: usize = 32;

fn main() -> Result<()> {
    zrag_models::tune_allocator();
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(Ok(30), |a| a.parse())?;
    let threads: usize = args.next().map_or(Ok(2), |a| a.parse())?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let device = Device::Cpu;
    let hidden = HEADS * HEAD_DIM;
    let qkv = Tensor::randn(0f32, 1.0, (BATCH * SEQ, 3 * hidden), &device)?;
    // The last 20 positions of every other sequence are padding.
    let bias: Vec<f32> = (0..BATCH * SEQ)
        .map(|i| {
            if (i / SEQ) % 2 == 1 && i % SEQ >= SEQ - 20 {
                -1e9
            } else {
                0.0
            }
        })
        .collect();
    let bias = Tensor::from_vec(bias, (BATCH, SEQ), &device)?;
    attention(&qkv, &bias, BATCH, HEADS)?;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        attention(&qkv, &bias, BATCH, HEADS)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    // q kᵀ and p v: 2 · seq² · head_dim multiply-adds each, per (sequence, head).
    let flops = (BATCH * HEADS * 2 * 2 * SEQ * SEQ * HEAD_DIM) as f64;
    println!(
        "attention {BATCH}x{SEQ} tokens, {HEADS} heads x {HEAD_DIM}, {threads} thread(s): \
         {:.2} ms median of {rounds} ({:.1} GFLOP/s)",
        median * 1e3,
        flops / median / 1e9
    );
    Ok(())
}
