//! The training objectives of the retriever (SPEC §1), on candle tensors so that gradients
//! reach the encoders:
//! - DPR's contrastive loss, −log softmax over in-batch and hard negatives;
//! - LM-supervised retrieval: KL(p_R(c|x) ‖ p_LSR(c|x,y)) over the top-k, p_LSR a fixed target
//!   built from the generator's scores.
//!
//! Scores of unit vectors lie in [−1, 1], so both losses divide them by a temperature before
//! the softmax; without it no distribution over the candidates could be peaked enough to
//! fit a target (DPR's unnormalised BERT vectors get the same effect from their norm).

use candle_core::{Tensor, D};
use candle_nn::ops::log_softmax;
use serde::Serialize;

use crate::error::{Result, TrainError};

/// DPR's loss: for each query b, −log exp(s(q_b, p⁺_b)/τ) / Σ_p exp(s(q_b, p)/τ), where p
/// ranges over every passage of the batch (the other queries' positives are in-batch
/// negatives, plus all hard negatives). `queries` is `(B, d)`, `passages` `(P, d)`,
/// `positives[b]` the row of `passages` that is query b's positive. Mean over the batch.
pub fn contrastive_loss(
    queries: &Tensor,
    passages: &Tensor,
    positives: &[u32],
    temperature: f64,
) -> Result<Tensor> {
    let (batch, _) = queries.dims2()?;
    let (n_passages, _) = passages.dims2()?;
    if positives.len() != batch || positives.iter().any(|&p| p as usize >= n_passages) {
        return Err(TrainError::setting(
            "contrastive loss",
            format!("{batch} queries need {batch} positive rows below {n_passages}"),
        ));
    }
    let logits = (queries.matmul(&passages.t()?)? / temperature)?;
    let log_probs = log_softmax(&logits, D::Minus1)?;
    let index = Tensor::from_slice(positives, (batch, 1), queries.device())?;
    let picked = log_probs.gather(&index, 1)?;
    Ok((picked.sum_all()? / -(batch as f64))?)
}

/// How the generator's likelihood of the answer becomes s_LM(c) (SPEC §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LmScore {
    /// p_LM(y | c∘x) itself, as the seed text writes it.
    Prob,
    /// log p_LM(y | c∘x) (REPLUG, RA-DIT).
    Logprob,
    /// log p_LM(y | c∘x) / |y|: per-token, so long answers are not penalised.
    MeanLogprob,
}

/// ln p_LSR(c|x,y) = log_softmax(s_LM(c)/τ) over the candidates, from each candidate's summed
/// answer log-likelihood and the answer's length in tokens. In f64; `prob` is evaluated as
/// exp(log p), which may underflow to 0 for every candidate and then gives the uniform target
/// (the seed text's definition does that too).
pub fn lsr_target(
    log_likelihoods: &[f64],
    answer_tokens: usize,
    score: LmScore,
    tau: f64,
) -> Vec<f64> {
    let s: Vec<f64> = log_likelihoods
        .iter()
        .map(|&ll| match score {
            LmScore::Prob => ll.exp(),
            LmScore::Logprob => ll,
            LmScore::MeanLogprob => ll / answer_tokens.max(1) as f64,
        })
        .map(|s| s / tau)
        .collect();
    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_z = max + s.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    s.iter().map(|v| v - log_z).collect()
}

/// E_b[KL(p_R ‖ p_LSR)] = mean_b Σ_c p_R(c) (ln p_R(c) − ln p_LSR(c)), with
/// p_R = softmax(retrieval_scores / τ_R) over the k candidates of each row. `retrieval_scores`
/// is `(B, k)` and carries the gradient; `target_log_probs` (B rows of k) is a constant.
pub fn kl_to_target(
    retrieval_scores: &Tensor,
    retrieval_temperature: f64,
    target_log_probs: &[Vec<f64>],
) -> Result<Tensor> {
    let (batch, k) = retrieval_scores.dims2()?;
    if target_log_probs.len() != batch || target_log_probs.iter().any(|t| t.len() != k) {
        return Err(TrainError::setting(
            "KL loss",
            format!("the target must be {batch} rows of {k} log-probabilities"),
        ));
    }
    let flat: Vec<f32> = target_log_probs
        .iter()
        .flatten()
        .map(|&v| v as f32)
        .collect();
    let target = Tensor::from_vec(flat, (batch, k), retrieval_scores.device())?;
    let log_p = log_softmax(&(retrieval_scores / retrieval_temperature)?, D::Minus1)?;
    let kl = (log_p.exp()? * (log_p - target)?)?;
    Ok((kl.sum_all()? / batch as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn tensor(rows: &[&[f32]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
    }

    #[test]
    fn contrastive_loss_matches_a_direct_computation() {
        let q = tensor(&[&[1.0, 0.0], &[0.6, 0.8]]);
        let p = tensor(&[&[0.0, 1.0], &[1.0, 0.0], &[0.8, 0.6]]);
        let loss = contrastive_loss(&q, &p, &[1, 0], 0.5).unwrap();
        let direct = |scores: [f64; 3], pos: usize| {
            let z: f64 = scores.iter().map(|s| (s / 0.5).exp()).sum();
            -((scores[pos] / 0.5).exp() / z).ln()
        };
        let expected = (direct([0.0, 1.0, 0.8], 1) + direct([0.8, 0.6, 0.96], 0)) / 2.0;
        let got = f64::from(loss.to_scalar::<f32>().unwrap());
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }

    #[test]
    fn contrastive_gradient_matches_finite_differences() {
        let values = [0.3f32, -0.2, 0.5, 0.1, 0.9, -0.4];
        let p = tensor(&[&[0.2, 0.7], &[1.0, -0.3], &[-0.5, 0.5]]);
        let loss_at = |v: &[f32]| -> f64 {
            let q = Tensor::from_slice(v, (3, 2), &Device::Cpu).unwrap();
            let l = contrastive_loss(&q, &p, &[0, 1, 2], 0.3).unwrap();
            f64::from(l.to_scalar::<f32>().unwrap())
        };
        let q =
            Var::from_tensor(&Tensor::from_slice(&values, (3, 2), &Device::Cpu).unwrap()).unwrap();
        let loss = contrastive_loss(q.as_tensor(), &p, &[0, 1, 2], 0.3).unwrap();
        let grads = loss.backward().unwrap();
        let grad: Vec<f32> = grads
            .get(q.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for i in 0..values.len() {
            let h = 1e-2f32;
            let mut plus = values;
            plus[i] += h;
            let mut minus = values;
            minus[i] -= h;
            let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * f64::from(h));
            assert!(
                (numeric - f64::from(grad[i])).abs() < 2e-3,
                "coordinate {i}: numeric {numeric} vs autograd {}",
                grad[i]
            );
        }
    }

    #[test]
    fn lsr_targets_follow_their_definitions() {
        let ll = [-2.0, -4.0, -3.0];
        let logprob = lsr_target(&ll, 2, LmScore::Logprob, 0.5);
        let direct: Vec<f64> = {
            let z: f64 = ll.iter().map(|l| (l / 0.5f64).exp()).sum();
            ll.iter().map(|l| (l / 0.5f64).exp() / z).collect()
        };
        for (a, b) in logprob.iter().zip(&direct) {
            assert!((a.exp() - b).abs() < 1e-12);
        }
        // Mean log-prob at τ equals log-prob at τ·|y|.
        let mean = lsr_target(&ll, 2, LmScore::MeanLogprob, 0.25);
        for (a, b) in mean.iter().zip(&logprob) {
            assert!((a - b).abs() < 1e-12);
        }
        let prob = lsr_target(&ll, 2, LmScore::Prob, 0.1);
        let s: Vec<f64> = ll.iter().map(|l: &f64| l.exp() / 0.1).collect();
        let z: f64 = s.iter().map(|v| v.exp()).sum();
        for (a, v) in prob.iter().zip(&s) {
            assert!((a.exp() - v.exp() / z).abs() < 1e-12);
        }
        // Far below exp's range the target is uniform, not NaN.
        let tiny = lsr_target(&[-1e5, -2e5], 1, LmScore::Prob, 0.1);
        assert!(tiny.iter().all(|v| (v - 0.5f64.ln()).abs() < 1e-12));
    }

    #[test]
    fn kl_is_zero_at_the_target_and_its_gradient_points_to_it() {
        let target = lsr_target(&[0.0, -1.0, -2.0], 1, LmScore::Logprob, 1.0);
        // Scores equal to the target's logits at τ_R = 1: KL = 0.
        let at_target = tensor(&[&[0.0, -1.0, -2.0]]);
        let kl = kl_to_target(&at_target, 1.0, std::slice::from_ref(&target)).unwrap();
        assert!(kl.to_scalar::<f32>().unwrap().abs() < 1e-6);

        let scores = Var::from_tensor(&tensor(&[&[0.0, 0.0, 0.0]])).unwrap();
        let kl = kl_to_target(scores.as_tensor(), 1.0, std::slice::from_ref(&target)).unwrap();
        let expected: f64 = target
            .iter()
            .map(|t| (1.0f64 / 3.0) * ((1.0f64 / 3.0).ln() - t))
            .sum();
        assert!((f64::from(kl.to_scalar::<f32>().unwrap()) - expected).abs() < 1e-5);
        let grad = kl
            .backward()
            .unwrap()
            .get(scores.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Descending the gradient raises the score of the target's favourite.
        assert!(grad[0] < 0.0 && grad[2] > 0.0, "{grad:?}");
    }
}
