//! AdamW with a warm-up / decay learning-rate schedule and global gradient-norm clipping.
//!
//! candle-nn's `AdamW` does the moment updates; this module adds what a fine-tuning run needs
//! around it: the learning rate for every step, clipping the gradient of all variables
//! together (as `torch.nn.utils.clip_grad_norm_` does), and the step's statistics for the log.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer as _, ParamsAdamW};
use serde::Serialize;

use crate::error::{Result, TrainError};

/// How the learning rate falls after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Linearly to 0 at the last step (BERT / DPR fine-tuning).
    Linear,
    /// Half a cosine to 0 at the last step.
    Cosine,
    /// Stays at the peak.
    Constant,
}

#[derive(Clone, Debug, Serialize)]
pub struct OptimizerSettings {
    /// Peak learning rate, reached at the end of warm-up.
    pub learning_rate: f64,
    pub warmup_steps: usize,
    /// Steps of the whole run (the decay ends here).
    pub total_steps: usize,
    pub decay: Decay,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub max_grad_norm: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        OptimizerSettings {
            learning_rate: 2e-5,
            warmup_steps: 100,
            total_steps: 1000,
            decay: Decay::Linear,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl OptimizerSettings {
    /// The learning rate of step `step` (0-based): linear warm-up from lr/warmup to lr over the
    /// first `warmup_steps` steps, then the decay.
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.decay {
            Decay::Linear => self.learning_rate * (1.0 - progress),
            Decay::Cosine => {
                self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Decay::Constant => self.learning_rate,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let checks = [
            (
                "--lr",
                self.learning_rate > 0.0 && self.learning_rate.is_finite(),
            ),
            ("--weight-decay", self.weight_decay >= 0.0),
            ("--max-grad-norm", self.max_grad_norm >= 0.0),
            ("--steps", self.total_steps > 0),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((flag, _)) => Err(TrainError::setting(flag, "out of range")),
            None => Ok(()),
        }
    }
}

/// What one optimiser step did.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StepStats {
    pub learning_rate: f64,
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    pub clipped: bool,
}

/// AdamW over a fixed set of variables, stepping through the schedule.
pub struct Optimizer {
    adamw: AdamW,
    vars: Vec<Var>,
    settings: OptimizerSettings,
    step: usize,
}

impl Optimizer {
    pub fn new(vars: Vec<Var>, settings: OptimizerSettings) -> Result<Self> {
        settings.validate()?;
        let params = ParamsAdamW {
            lr: settings.learning_rate_at(0),
            beta1: settings.beta1,
            beta2: settings.beta2,
            eps: settings.eps,
            weight_decay: settings.weight_decay,
        };
        Ok(Optimizer {
            adamw: AdamW::new(vars.clone(), params)?,
            vars,
            settings,
            step: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// Back-propagates `loss` and applies one update: clip, set this step's learning rate, AdamW.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<StepStats> {
        let mut grads = loss.backward()?;
        self.apply(&mut grads)
    }

    /// One update from already computed gradients (accumulated over several losses, say).
    pub fn apply(&mut self, grads: &mut GradStore) -> Result<StepStats> {
        let grad_norm = global_norm(&self.vars, grads)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::Diverged {
                step: self.step,
                loss: grad_norm,
            });
        }
        let clipped = self.settings.max_grad_norm > 0.0 && grad_norm > self.settings.max_grad_norm;
        if clipped {
            let scale = self.settings.max_grad_norm / grad_norm;
            for var in &self.vars {
                if let Some(grad) = grads.remove(var.as_tensor()) {
                    grads.insert(var.as_tensor(), grad.affine(scale, 0.0)?);
                }
            }
        }
        let learning_rate = self.settings.learning_rate_at(self.step);
        self.adamw.set_learning_rate(learning_rate);
        self.adamw.step(grads)?;
        self.step += 1;
        Ok(StepStats {
            learning_rate,
            grad_norm,
            clipped,
        })
    }
}

/// sqrt(Σ_v ‖∂L/∂v‖²) over the variables that received a gradient.
pub fn global_norm(vars: &[Var], grads: &GradStore) -> Result<f64> {
    let mut sum = 0f64;
    for var in vars {
        if let Some(grad) = grads.get(var.as_tensor()) {
            sum += f64::from(grad.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    Ok(sum.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let settings = OptimizerSettings {
            learning_rate: 1.0,
            warmup_steps: 4,
            total_steps: 14,
            ..Default::default()
        };
        let lrs: Vec<f64> = (0..15).map(|s| settings.learning_rate_at(s)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert!((lrs[9] - 0.5).abs() < 1e-12, "{lrs:?}");
        assert_eq!(lrs[14], 0.0);
        let cosine = OptimizerSettings {
            decay: Decay::Cosine,
            ..settings.clone()
        };
        assert!((cosine.learning_rate_at(9) - 0.5).abs() < 1e-12);
        assert!(cosine.learning_rate_at(6) > settings.learning_rate_at(6));
    }

    #[test]
    fn clipping_bounds_the_global_norm_and_adamw_moves_against_the_gradient() {
        let x = Var::from_tensor(&Tensor::new(&[3f32, -4.0], &Device::Cpu).unwrap()).unwrap();
        let settings = OptimizerSettings {
            learning_rate: 0.1,
            warmup_steps: 0,
            total_steps: 10,
            decay: Decay::Constant,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            ..Default::default()
        };
        let mut optimizer = Optimizer::new(vec![x.clone()], settings).unwrap();
        // L = 0.5 ‖x‖², ∇ = x, norm 5.
        let loss = (x.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        let stats = optimizer.backward_step(&loss).unwrap();
        assert!((stats.grad_norm - 5.0).abs() < 1e-5);
        assert!(stats.clipped);
        let after = x.as_tensor().to_vec1::<f32>().unwrap();
        // Adam's first step moves every coordinate by lr against the sign of its gradient.
        assert!(
            (after[0] - 2.9).abs() < 1e-4 && (after[1] + 3.9).abs() < 1e-4,
            "{after:?}"
        );
    }
}
