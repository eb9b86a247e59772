//! AVX2+FMA versions of the encoder's two transcendental loops, GELU's `x · Φ(x)` and the
//! softmax's `exp(x - max)`, 8 lanes at a time with the scalar functions for the tail.
//!
//! The same formulas as [`super::normal_cdf`] and [`super::fast_exp`] (Abramowitz & Stegun
//! 7.1.26; range reduction and a degree-6 polynomial), but written with intrinsics: the
//! compiler, left to vectorise the scalar loop, keeps every multiply and add separate (no
//! contraction into FMA without fast-math) and divides with `vdivps`; here the polynomials
//! are FMA chains and the one division is a reciprocal estimate refined by a Newton step.
//! Results differ from the scalar functions by rounding only (tested below).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Whether this CPU runs the functions here (AVX2 and FMA); callers use the scalar loops
/// otherwise.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `values[i] = gelu_erf(values[i])` (the product in place).
///
/// # Safety
/// [`available`] must be true.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gelu_erf_in_place(values: &mut [f32]) {
    let mut chunks = values.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let x = _mm256_loadu_ps(chunk.as_ptr());
        _mm256_storeu_ps(chunk.as_mut_ptr(), gelu8(x));
    }
    for v in chunks.into_remainder() {
        *v *= super::normal_cdf(*v);
    }
}

/// `dst[i] = gelu_erf(src[i])`.
///
/// # Safety
/// [`available`] must be true.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gelu_erf(src: &[f32], dst: &mut [f32]) {
    let mut chunks = dst.chunks_exact_mut(8);
    let mut sources = src.chunks_exact(8);
    for (d, s) in (&mut chunks).zip(&mut sources) {
        _mm256_storeu_ps(d.as_mut_ptr(), gelu8(_mm256_loadu_ps(s.as_ptr())));
    }
    for (d, &x) in chunks.into_remainder().iter_mut().zip(sources.remainder()) {
        *d = x * super::normal_cdf(x);
    }
}

/// `row[i] = exp(row[i] - max)`, returning the sum of the results (in 8 lanes, then
/// across them).
///
/// # Safety
/// [`available`] must be true.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp_shifted_sum(row: &mut [f32], max: f32) -> f32 {
    let shift = _mm256_set1_ps(max);
    let mut sum = _mm256_setzero_ps();
    let mut chunks = row.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let x = _mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), shift);
        let e = exp8(x);
        sum = _mm256_add_ps(sum, e);
        _mm256_storeu_ps(chunk.as_mut_ptr(), e);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut total = lanes.iter().sum::<f32>();
    for x in chunks.into_remainder() {
        *x = super::fast_exp(*x - max);
        total += *x;
    }
    total
}

/// [`super::fast_exp`] on 8 lanes: exactly 0 below -87, saturating at `exp(88)`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    const ROUND_MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let clamped = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(88.0),
    );
    let shifted = _mm256_fmadd_ps(
        clamped,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(ROUND_MAGIC),
    );
    let n = _mm256_sub_ps(shifted, _mm256_set1_ps(ROUND_MAGIC));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), clamped);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(0.001_388_889);
    for c in [0.008_333_334, 0.041_666_668, 0.166_666_67, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let n_int = _mm256_sub_epi32(
        _mm256_castps_si256(shifted),
        _mm256_set1_epi32(ROUND_MAGIC.to_bits() as i32),
    );
    let two_to_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        n_int,
        _mm256_set1_epi32(127),
    )));
    let value = _mm256_mul_ps(p, two_to_n);
    // Below -87: exactly 0 (masked attention keys get exactly zero weight).
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
    _mm256_and_ps(value, keep)
}

/// `x · Φ(x)` on 8 lanes ([`super::normal_cdf`]'s formula).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gelu8(x: __m256) -> __m256 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
    let z = _mm256_mul_ps(magnitude, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
    let denominator = _mm256_fmadd_ps(_mm256_set1_ps(P), z, _mm256_set1_ps(1.0));
    // 1 / denominator: the estimate (12 bits) and one Newton step (≈ 23 bits).
    let estimate = _mm256_rcp_ps(denominator);
    let t = _mm256_mul_ps(
        estimate,
        _mm256_fnmadd_ps(denominator, estimate, _mm256_set1_ps(2.0)),
    );
    let mut poly = _mm256_set1_ps(A[4]);
    for &a in A[..4].iter().rev() {
        poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(a));
    }
    poly = _mm256_mul_ps(poly, t);
    let minus_z_squared = _mm256_mul_ps(_mm256_xor_ps(z, _mm256_set1_ps(-0.0)), z);
    let half_erfc = _mm256_mul_ps(
        _mm256_mul_ps(_mm256_set1_ps(0.5), poly),
        exp8(minus_z_squared),
    );
    let negative = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps());
    let cdf = _mm256_blendv_ps(
        _mm256_sub_ps(_mm256_set1_ps(1.0), half_erfc),
        half_erfc,
        negative,
    );
    _mm256_mul_ps(x, cdf)
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn gelu_erf_in_place(_: &mut [f32]) {
    unreachable!("available() is false off x86-64");
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn gelu_erf(_: &[f32], _: &mut [f32]) {
    unreachable!("available() is false off x86-64");
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn exp_shifted_sum(_: &mut [f32], _: f32) -> f32 {
    unreachable!("available() is false off x86-64");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_and_exp_match_the_scalar_functions() {
        if !available() {
            eprintln!("skipped: no AVX2+FMA");
            return;
        }
        // -12..12 in steps of 1e-3 (Φ's tails, 0, both signs), 24,001 values: not a multiple
        // of 8, so the scalar tail runs too.
        let xs: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 * 1e-3).collect();
        let mut in_place = xs.clone();
        let mut copied = vec![0f32; xs.len()];
        // SAFETY: checked `available()` above.
        unsafe {
            gelu_erf_in_place(&mut in_place);
            gelu_erf(&xs, &mut copied);
        }
        assert_eq!(in_place, copied);
        for (&x, &got) in xs.iter().zip(&in_place) {
            let want = x * super::super::normal_cdf(x);
            assert!(
                (got - want).abs() <= 2e-7 * (1.0 + want.abs()),
                "gelu({x}) = {got}, scalar {want}"
            );
        }

        // exp over [-100, 10] with the max at 10: values flush to exactly 0 below -87.
        let mut row: Vec<f32> = (-100_000..=10_000).map(|i| i as f32 * 1e-3).collect();
        let original = row.clone();
        // SAFETY: as above.
        let sum = unsafe { exp_shifted_sum(&mut row, 10.0) };
        let mut want_sum = 0f64;
        for (&x, &got) in original.iter().zip(&row) {
            let want = super::super::fast_exp(x - 10.0);
            want_sum += want as f64;
            assert!(
                (got - want).abs() <= 2e-7 * want,
                "exp({x} - 10) = {got}, scalar {want}"
            );
            if x - 10.0 < -87.0 {
                assert_eq!(got, 0.0);
            }
        }
        assert!(((sum as f64) - want_sum).abs() <= 1e-5 * want_sum);
    }
}
