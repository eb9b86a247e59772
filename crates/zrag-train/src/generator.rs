//! Training the generator to use retrieved context (RA-DIT's LM fine-tuning, SPEC §1):
//! LoRA adapters on a de-quantised copy of the generator, loss
//! L = −Σ_i Σ_j log p_LM(y_i | c_ij ∘ x_i), each of question i's k retrieved chunks prepended
//! separately (the same z∘x prompt RAG-Sequence uses), averaged over the batch's questions.
//!
//! The retriever is fixed here (the current E_Q and the collection's index). The adapter is
//! saved as a safetensors file that `zrag ask --adapter` and `zrag eval qa --adapter` merge
//! into the generator.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;
use serde_json::json;
use zrag_models::generator::{LoraConfig, LoraModel};
use zrag_models::LocalGenerator;
use zrag_rag::prompt::{Passage, PromptTemplate};
use zrag_rag::Retriever;

use crate::data::{EpochSampler, Example};
use crate::error::{Result, TrainError};
use crate::optim::{Optimizer, OptimizerSettings};
use crate::retriever::{StepLog, TrainObserver};

#[derive(Clone, Debug, Serialize)]
pub struct GeneratorTrainSettings {
    /// Questions per step (each contributes k prompts).
    pub batch_size: usize,
    pub steps: usize,
    pub k: usize,
    pub optimizer: OptimizerSettings,
    pub rank: usize,
    pub alpha: f32,
    /// Adapted projections (`q`, `k`, `v`, `o`, `gate`, `up`, `down`).
    pub targets: Vec<String>,
    pub seed: u64,
    /// Dev loss every this many steps (0 = start and end only).
    pub eval_every: usize,
    pub save_every: usize,
    pub question_template: String,
    pub answer_suffix: String,
    pub out_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct GeneratorDevLog {
    pub step: usize,
    /// Mean over dev questions of −Σ_j log p(y | c_j ∘ x), the training loss's definition.
    pub loss: f64,
    pub questions: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct GeneratorSummary {
    pub steps: usize,
    pub stopped_early: bool,
    pub seconds: f64,
    pub final_loss: Option<f64>,
    pub dev: Vec<GeneratorDevLog>,
    pub adapter: PathBuf,
}

pub struct GeneratorTraining<'a> {
    /// Loaded with f32 weights (`WeightPrecision::F32`).
    pub generator: &'a LocalGenerator,
    pub retriever: &'a Retriever,
    pub prompt: PromptTemplate,
    pub examples: Vec<Example>,
    pub dev: Vec<Example>,
    pub settings: GeneratorTrainSettings,
    pub stop: &'a AtomicBool,
}

/// The (prompt, target) token pairs of a batch: k per question.
type Pairs = (Vec<Vec<u32>>, Vec<Vec<u32>>);

impl GeneratorTraining<'_> {
    pub fn run(self, observer: &mut dyn TrainObserver) -> Result<GeneratorSummary> {
        let started = Instant::now();
        let settings = &self.settings;
        if settings.batch_size == 0 || settings.k == 0 {
            return Err(TrainError::setting(
                "--batch-size/--k",
                "must be at least 1",
            ));
        }
        let targets = settings
            .targets
            .iter()
            .map(|t| {
                t.parse()
                    .map_err(|e: String| TrainError::setting("--lora-targets", e))
            })
            .collect::<Result<Vec<_>>>()?;
        let config = LoraConfig {
            rank: settings.rank,
            alpha: settings.alpha,
            targets,
        };
        let model = LoraModel::new(self.generator.model(), config, settings.seed)?;
        let mut optimizer = Optimizer::new(model.vars(), settings.optimizer.clone())?;
        std::fs::create_dir_all(&settings.out_dir)
            .map_err(|e| TrainError::io(&settings.out_dir, e))?;
        let log_path = settings.out_dir.join("train-log.jsonl");
        let mut log = std::fs::File::create(&log_path).map_err(|e| TrainError::io(&log_path, e))?;
        let mut write_log = |value: serde_json::Value| -> Result<()> {
            writeln!(log, "{value}").map_err(|e| TrainError::io(&log_path, e))
        };
        let adapter_path = settings.out_dir.join("adapter.safetensors");

        // Retrieval is fixed during generator training: do it once per question.
        observer.message(&format!(
            "retrieving {} chunks for {} training and {} dev questions",
            settings.k,
            self.examples.len(),
            self.dev.len()
        ));
        let train_pairs = self.pairs(&self.examples)?;
        let dev_pairs = self.pairs(&self.dev)?;

        let mut dev_logs: Vec<GeneratorDevLog> = Vec::new();
        // Dev loss at `step`, logged and shown.
        let dev_loss = |step: usize| -> Result<Option<GeneratorDevLog>> {
            if dev_pairs.is_empty() {
                return Ok(None);
            }
            let mut total = 0f64;
            for (prompts, targets) in &dev_pairs {
                total += question_nll(&model, prompts, targets)?;
            }
            Ok(Some(GeneratorDevLog {
                step,
                loss: total / dev_pairs.len() as f64,
                questions: dev_pairs.len(),
            }))
        };
        record(dev_loss(0)?, &mut dev_logs, &mut write_log, observer)?;

        let mut sampler = EpochSampler::new(train_pairs.len(), settings.seed);
        let mut steps_done = 0;
        let mut last_loss = None;
        let mut stopped_early = false;
        for step in 0..settings.steps {
            if self.stop.load(Ordering::SeqCst) {
                stopped_early = true;
                observer.message(&format!("stopping at step {step}: saving the adapter"));
                break;
            }
            let step_started = Instant::now();
            let mut prompts: Vec<&[u32]> = Vec::new();
            let mut targets: Vec<&[u32]> = Vec::new();
            for index in sampler.next_batch(settings.batch_size) {
                let (p, t) = &train_pairs[index];
                prompts.extend(p.iter().map(Vec::as_slice));
                targets.extend(t.iter().map(Vec::as_slice));
            }
            // −Σ_i Σ_j log p(y_i | c_ij ∘ x_i), averaged over the batch's questions.
            let log_probs = model.sequence_log_probs(&prompts, &targets)?;
            let loss = (log_probs.sum_all()? / -(settings.batch_size as f64))?;
            let value = f64::from(loss.to_scalar::<f32>()?);
            if !value.is_finite() {
                return Err(TrainError::Diverged { step, loss: value });
            }
            let stats = optimizer.backward_step(&loss)?;
            steps_done = step + 1;
            last_loss = Some(value);
            let entry = StepLog {
                step: steps_done,
                loss: value,
                learning_rate: stats.learning_rate,
                grad_norm: stats.grad_norm,
                generation: 0,
                seconds: step_started.elapsed().as_secs_f64(),
                used: settings.batch_size,
            };
            observer.step(&entry);
            write_log(json!({"event": "step", "step": entry}))?;
            if settings.eval_every > 0
                && steps_done.is_multiple_of(settings.eval_every)
                && steps_done < settings.steps
            {
                record(
                    dev_loss(steps_done)?,
                    &mut dev_logs,
                    &mut write_log,
                    observer,
                )?;
            }
            if settings.save_every > 0 && steps_done.is_multiple_of(settings.save_every) {
                model.save_adapter(&adapter_path)?;
            }
        }
        model.save_adapter(&adapter_path)?;
        if steps_done > 0 && dev_logs.last().is_none_or(|d| d.step != steps_done) {
            record(
                dev_loss(steps_done)?,
                &mut dev_logs,
                &mut write_log,
                observer,
            )?;
        }
        let summary = GeneratorSummary {
            steps: steps_done,
            stopped_early,
            seconds: started.elapsed().as_secs_f64(),
            final_loss: last_loss,
            dev: dev_logs,
            adapter: adapter_path,
        };
        write_curves(&settings.out_dir)?;
        let path = settings.out_dir.join("summary.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&summary).unwrap_or_default(),
        )
        .map_err(|e| TrainError::io(&path, e))?;
        Ok(summary)
    }

    /// For each question: its k prompts (chunk ∘ question) and k copies of its answer tokens.
    fn pairs(&self, examples: &[Example]) -> Result<Vec<Pairs>> {
        let tokenizer = self.generator.tokenizer();
        let mut out = Vec::with_capacity(examples.len());
        for batch in examples.chunks(64) {
            let queries: Vec<&str> = batch.iter().map(|e| e.query.as_str()).collect();
            let retrieved = self.retriever.retrieve_batch(&queries, self.settings.k)?;
            for (example, chunks) in batch.iter().zip(retrieved) {
                let Some(answer) = example.answers.first() else {
                    continue;
                };
                let target =
                    tokenizer.encode(&format!("{answer}{}", self.settings.answer_suffix))?;
                let question = self
                    .settings
                    .question_template
                    .replace("{question}", &example.query);
                let mut prompts = Vec::with_capacity(chunks.len());
                for chunk in &chunks {
                    let passage = Passage {
                        title: chunk.title.as_deref(),
                        text: &chunk.text,
                    };
                    prompts.push(self.prompt.document(tokenizer, passage, &question)?);
                }
                let targets = vec![target; prompts.len()];
                if !prompts.is_empty() {
                    out.push((prompts, targets));
                }
            }
        }
        Ok(out)
    }
}

/// Logs and shows a dev evaluation.
fn record(
    entry: Option<GeneratorDevLog>,
    dev_logs: &mut Vec<GeneratorDevLog>,
    write_log: &mut dyn FnMut(serde_json::Value) -> Result<()>,
    observer: &mut dyn TrainObserver,
) -> Result<()> {
    if let Some(entry) = entry {
        observer.message(&format!(
            "dev @ step {}: −Σ_j log p(y | c_j∘x) = {:.4} nats per question",
            entry.step, entry.loss
        ));
        write_log(json!({"event": "dev", "dev": entry}))?;
        dev_logs.push(entry);
    }
    Ok(())
}

/// −Σ_j log p(y | c_j ∘ x) for one question (no update).
fn question_nll(model: &LoraModel, prompts: &[Vec<u32>], targets: &[Vec<u32>]) -> Result<f64> {
    let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let t: Vec<&[u32]> = targets.iter().map(Vec::as_slice).collect();
    let log_probs = model.sequence_log_probs(&p, &t)?.detach();
    let sum = f64::from(log_probs.sum_all()?.to_scalar::<f32>()?);
    Ok(-sum)
}

fn write_curves(out_dir: &Path) -> Result<()> {
    let log_path = out_dir.join("train-log.jsonl");
    let text = std::fs::read_to_string(&log_path).map_err(|e| TrainError::io(&log_path, e))?;
    let (mut train, mut dev) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match v["event"].as_str() {
            Some("step") => {
                if let (Some(s), Some(l)) = (v["step"]["step"].as_f64(), v["step"]["loss"].as_f64())
                {
                    train.push((s, l));
                }
            }
            Some("dev") => {
                if let (Some(s), Some(l)) = (v["dev"]["step"].as_f64(), v["dev"]["loss"].as_f64()) {
                    dev.push((s, l));
                }
            }
            _ => {}
        }
    }
    let svg = zrag_eval::report::line_chart_svg(
        "generator (LoRA): −Σ_j log p(y | c_j∘x) per question",
        "step",
        "nats",
        &[("train batch", train), ("dev", dev)],
    );
    let path = out_dir.join("learning-curve.svg");
    std::fs::write(&path, svg).map_err(|e| TrainError::io(&path, e))
}
