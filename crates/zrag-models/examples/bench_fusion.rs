//! The feed-forward block of one MiniLM layer at an encoder batch's shape (4,096 rows), with
//! the epilogues fused into the packed gemm (`linear_gelu_erf`, `linear_add_layer_norm`)
//! against the same maths as separate ops, interleaved round by round so that this machine's
//! minute-to-minute speed drift falls on both sides alike. Checks that both give the same bits.
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo run --release -p zrag-models --example bench_fusion -- [rounds]
//! ```
//! One thread is what the encoder runs per batch (one batch per thread).

use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use zrag_models::ops::{gelu_erf, layer_norm, linear, linear_add_layer_norm, linear_gelu_erf};

const ROWS: usize = 4096;
const HIDDEN: usize = 384;
const INTERMEDIATE: usize = 1536;

fn values(shape: (usize, usize), seed: u64, device: &Device) -> Result<Tensor> {
    // A fixed-seed generator, so runs compare the same inputs.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 0.2 - 0.1
        })
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

fn main() -> Result<()> {
    zrag_models::tune_allocator();
    let rounds: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 20,
    };
    let device = Device::Cpu;
    let states = values((ROWS, HIDDEN), 1, &device)?;
    let up_weight = values((HIDDEN, INTERMEDIATE), 2, &device)?;
    let up_bias = values((1, INTERMEDIATE), 3, &device)?.flatten_all()?;
    let down_weight = values((INTERMEDIATE, HIDDEN), 4, &device)?;
    let down_bias = values((1, HIDDEN), 5, &device)?.flatten_all()?;
    let gamma = (values((1, HIDDEN), 6, &device)?.flatten_all()? + 1.0)?;
    let beta = values((1, HIDDEN), 7, &device)?.flatten_all()?;

    let separate = || -> Result<Tensor> {
        let activated = gelu_erf(&linear(&states, &up_weight, &up_bias)?)?;
        let summed = (linear(&activated, &down_weight, &down_bias)? + &states)?;
        Ok(layer_norm(&summed, &gamma, &beta, 1e-12)?)
    };
    let fused = || -> Result<Tensor> {
        let activated = linear_gelu_erf(&states, &up_weight, &up_bias)?;
        Ok(linear_add_layer_norm(
            &activated,
            &down_weight,
            &down_bias,
            &states,
            (&gamma, &beta),
            1e-12,
        )?)
    };
    let (a, b) = (separate()?, fused()?);
    let same = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    ensure!(same == 0.0, "fused and separate differ by {same}");

    let (mut separate_times, mut fused_times) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let start = Instant::now();
        separate()?;
        separate_times.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        fused()?;
        fused_times.push(start.elapsed().as_secs_f64());
    }
    let median = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let (separate_median, fused_median) = (median(&mut separate_times), median(&mut fused_times));
    println!(
        "feed-forward block, {ROWS} rows, {} thread(s), {rounds} interleaved rounds: \
         separate ops {:.1} ms, fused epilogues {:.1} ms (median): {:.3}x; outputs identical",
        candle_core::utils::get_num_threads(),
        separate_median * 1e3,
        fused_median * 1e3,
        separate_median / fused_median
    );
    Ok(())
}
