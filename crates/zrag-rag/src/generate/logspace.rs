//! Log-space arithmetic in f64.
//!
//! RAG multiplies many small probabilities (a 2000-token answer has p(y|x,z) far below the
//! smallest f64) and mixes documents whose priors differ by hundreds of nats, so every
//! quantity here is a natural log and every sum of probabilities is a log-sum-exp. The
//! functions accept −∞ (probability zero) anywhere, including "all −∞", without producing NaN.

/// log Σ_i exp(x_i), stable for any mix of finite values and −∞.
///
/// Returns −∞ for an empty slice or when every entry is −∞ (the sum of zero probabilities),
/// and returns the single entry unchanged for a one-element slice, so that the k = 1 case of
/// RAG (plain decoding) is bit-for-bit the model's own log-probabilities.
pub fn logsumexp(xs: &[f64]) -> f64 {
    match xs {
        [] => f64::NEG_INFINITY,
        [x] => *x,
        _ => {
            if xs.iter().any(|x| x.is_nan()) {
                return f64::NAN;
            }
            let (arg, max) = argmax(xs);
            if max.is_infinite() {
                // −∞: nothing to add. +∞: propagate rather than compute ∞ − ∞.
                return max;
            }
            // ln_1p over the non-maximal terms keeps precision when one term dominates.
            let rest: f64 = xs
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != arg)
                .map(|(_, &x)| (x - max).exp())
                .sum();
            max + rest.ln_1p()
        }
    }
}

/// log(exp(a) + exp(b)).
pub fn log_add(a: f64, b: f64) -> f64 {
    logsumexp(&[a, b])
}

/// x_i − logsumexp(x): the log of the normalised distribution ∝ exp(x_i).
///
/// If every entry is −∞ the distribution is undefined; the result is then all −∞ (callers
/// that need a fallback, such as a posterior given an impossible output, check for it).
pub fn log_normalize(xs: &[f64]) -> Vec<f64> {
    let z = logsumexp(xs);
    if z == f64::NEG_INFINITY {
        return vec![f64::NEG_INFINITY; xs.len()];
    }
    xs.iter().map(|&x| x - z).collect()
}

/// log-softmax of `scores / temperature`: the log prior log p_η(z|x) computed directly from
/// retrieval scores, without the underflow of `ln(softmax(..))` for far-apart scores.
pub fn log_softmax(scores: &[f64], temperature: f64) -> Vec<f64> {
    let scaled: Vec<f64> = scores.iter().map(|&s| s / temperature).collect();
    log_normalize(&scaled)
}

/// exp of a log distribution (entries that underflow become exactly 0).
pub fn exp_all(xs: &[f64]) -> Vec<f64> {
    xs.iter().map(|&x| x.exp()).collect()
}

/// Index and value of the largest entry: the first one on ties, and NaN never wins (an
/// all-NaN or empty slice gives `(0, −∞)`).
pub(crate) fn argmax(xs: &[f64]) -> (usize, f64) {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, &x) in xs.iter().enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logsumexp_matches_direct_sum_and_handles_infinities() {
        let xs = [0.1f64.ln(), 0.2f64.ln(), 0.7f64.ln()];
        assert!((logsumexp(&xs) - 0.0).abs() < 1e-15);
        assert_eq!(logsumexp(&[]), f64::NEG_INFINITY);
        assert_eq!(
            logsumexp(&[f64::NEG_INFINITY, f64::NEG_INFINITY]),
            f64::NEG_INFINITY
        );
        assert_eq!(logsumexp(&[f64::NEG_INFINITY, -3.0]), -3.0);
        assert_eq!(logsumexp(&[-1234.5]), -1234.5);
        // exp(-1000) underflows, the log-space sum does not.
        let v = logsumexp(&[-1000.0, -1000.0]);
        assert!((v - (-1000.0 + 2f64.ln())).abs() < 1e-12);
        assert_eq!((-1000f64).exp() + (-1000f64).exp(), 0.0);
        assert_eq!(logsumexp(&[f64::INFINITY, 0.0]), f64::INFINITY);
        assert!(logsumexp(&[f64::NAN, 0.0]).is_nan());
    }

    #[test]
    fn normalisation() {
        let l = log_normalize(&[-1000.0, -1001.0, f64::NEG_INFINITY]);
        let p = exp_all(&l);
        // Logs near −1000 carry an absolute rounding of ~1e-13 (their ulp), hence the bound.
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{p:?} {l:?}");
        assert!((p[0] / p[1] - 1f64.exp()).abs() < 1e-12);
        assert_eq!(p[2], 0.0);
        assert!(log_normalize(&[f64::NEG_INFINITY; 2])
            .iter()
            .all(|&x| x == f64::NEG_INFINITY));
        let s = log_softmax(&[1.0, 2.0], 0.5);
        assert!((s[1] - s[0] - 2.0).abs() < 1e-12);
        assert_eq!(log_add(f64::NEG_INFINITY, 1.5), 1.5);
    }
}
