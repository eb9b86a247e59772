//! Seeded randomness for sampling: a SplitMix64 generator and a temperature / top-p sampler.
//!
//! Written here rather than taken from a crate because decoding must be reproducible from a
//! seed across versions and platforms, and SplitMix64 is a dozen lines with a fixed, published
//! output sequence.

/// SplitMix64 (Steele, Lea and Flood 2014): a 64-bit state advanced by a Weyl constant and
/// passed through a bijective mixer; every seed, including 0, gives a full-period stream.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits (every representable multiple of 2⁻⁵³).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Draws an index from the distribution ∝ exp(log_weights / temperature), restricted to the
/// nucleus (the most probable entries whose total probability first reaches `top_p`).
///
/// Returns `None` when no entry has positive weight. `temperature > 0` and `0 < top_p ≤ 1`
/// are checked by the caller.
pub(crate) fn sample_index(
    log_weights: &[f64],
    temperature: f64,
    top_p: f64,
    rng: &mut SplitMix64,
) -> Option<usize> {
    let max = log_weights
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return None;
    }
    // Subtracting the max before exp keeps the largest weight at 1, so temperature scaling
    // cannot overflow and at least one weight is positive.
    let weights: Vec<f64> = log_weights
        .iter()
        .map(|&l| ((l - max) / temperature).exp())
        .collect();
    let mut order: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0.0).collect();
    if top_p < 1.0 {
        order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        let total: f64 = order.iter().map(|&i| weights[i]).sum();
        let mut cumulative = 0.0;
        let mut keep = order.len();
        for (n, &i) in order.iter().enumerate() {
            cumulative += weights[i];
            if cumulative >= top_p * total {
                keep = n + 1;
                break;
            }
        }
        order.truncate(keep);
    }
    let total: f64 = order.iter().map(|&i| weights[i]).sum();
    let target = rng.next_f64() * total;
    let mut cumulative = 0.0;
    for &i in &order {
        cumulative += weights[i];
        if target < cumulative {
            return Some(i);
        }
    }
    // Rounding can leave `target` a hair above the final cumulative sum.
    order.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_values() {
        // First outputs for seed 1234567, from the reference C implementation.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
        assert_eq!(r.next_u64(), 9817491932198370423);
    }

    #[test]
    fn unit_interval() {
        let mut r = SplitMix64::new(0);
        for _ in 0..10_000 {
            let u = r.next_f64();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // p = 0.5, 0.3, 0.2: the nucleus for top_p = 0.6 is {0, 1}.
        let logs = [0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln()];
        let mut r = SplitMix64::new(7);
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            counts[sample_index(&logs, 1.0, 0.6, &mut r).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0);
        let f0 = counts[0] as f64 / 20_000.0;
        assert!((f0 - 0.625).abs() < 0.02, "{f0}");
        // A tiny temperature is (almost) greedy.
        assert_eq!(sample_index(&logs, 1e-3, 1.0, &mut r), Some(0));
        assert_eq!(
            sample_index(&[f64::NEG_INFINITY; 2], 1.0, 1.0, &mut r),
            None
        );
    }
}
