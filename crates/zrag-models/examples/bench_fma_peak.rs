//! This CPU's f32 FMA ceiling: 12 independent AVX2 FMA chains per thread, operands in
//! registers, on 1 and then `threads` threads at once. It is the bound every f32 encoder
//! number in BENCHMARKS.md is read against (an encoder cannot run its matmuls faster than
//! this), and it shows what running both cores costs each of them on this machine.
//!
//! ```text
//! cargo run --release -p zrag-models --example bench_fma_peak -- [threads]
//! ```

use std::time::Instant;

use anyhow::{bail, Result};

/// FMA steps per chain per thread: about a second at this CPU's peak.
const STEPS: usize = 200_000_000;
/// Independent accumulators: enough to cover FMA latency × the two FMA pipes.
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains(steps: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut chains = [_mm256_set1_ps(0.0); CHAINS];
    let (scale, offset) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    for _ in 0..steps {
        for chain in chains.iter_mut() {
            *chain = _mm256_fmadd_ps(*chain, scale, offset);
        }
    }
    // The result is returned so the loop cannot be optimised away.
    let mut lanes = [0f32; 8];
    let mut total = 0.0;
    for chain in chains {
        _mm256_storeu_ps(lanes.as_mut_ptr(), chain);
        total += lanes[0];
    }
    total
}

/// GFLOP/s of `threads` threads running the chains at once (2 FLOPs per lane per FMA).
#[cfg(target_arch = "x86_64")]
fn measure(threads: usize) -> f64 {
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            // SAFETY: main checked AVX2 and FMA before calling.
            std::thread::spawn(|| unsafe { fma_chains(STEPS) })
        })
        .collect();
    let total: f32 = workers.into_iter().map(|w| w.join().unwrap_or(0.0)).sum();
    std::hint::black_box(total);
    let flops = (threads * STEPS * CHAINS * 8 * 2) as f64;
    flops / start.elapsed().as_secs_f64() / 1e9
}

fn main() -> Result<()> {
    let threads: usize = std::env::args().nth(1).map_or(Ok(2), |a| a.parse())?;
    #[cfg(target_arch = "x86_64")]
    {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            bail!("this CPU has no AVX2+FMA");
        }
        let one = measure(1);
        let all = measure(threads);
        println!(
            "f32 FMA peak (AVX2, {CHAINS} chains): 1 thread {one:.1} GFLOP/s; \
             {threads} threads {all:.1} GFLOP/s ({:.1} per thread)",
            all / threads as f64
        );
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    bail!("x86-64 only")
}
