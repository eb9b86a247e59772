//! Retriever training: DPR contrastive learning and LM-supervised retrieval (LSR), with E_Q
//! alone (the collection's index stays valid) or E_Q and E_D (a background worker re-encodes
//! the corpus every N steps; see [`crate::generations`]).
//!
//! One loop serves both methods; they differ only in the loss of a batch:
//! - DPR: positives are the best-scoring chunk of a judged document (BEIR qrels) or, for
//!   question/answer pairs, the best-ranked retrieved chunk containing an answer (DPR's rule);
//!   hard negatives are the best-ranked other chunks by BM25 or by the current dense index;
//!   the other queries' positives and negatives are in-batch negatives.
//! - LSR: the current index's top-k chunks C of x; p_LSR(c) ∝ exp(s_LM(c)/τ) with s_LM from
//!   log p_LM(y | c∘x), all k chunks scored by the generator in one batched pass and cached;
//!   loss KL(p_R ‖ p_LSR) with p_R the softmax of the retrieval scores over C.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;
use serde_json::json;
use zrag_eval::metrics::{evaluate_retrieval, Run};
use zrag_models::{CausalLm, LocalGenerator};
use zrag_rag::prompt::{Passage, PromptTemplate};

use crate::corpus::{IndexView, SlotHit, TrainingCorpus};
use crate::data::{contains_answer, EpochSampler, Example};
use crate::encoder::TrainableEncoder;
use crate::error::{Result, TrainError};
use crate::generations::{Generation, GenerationStore, Reindexer};
use crate::loss::{contrastive_loss, kl_to_target, lsr_target, LmScore};
use crate::optim::{Optimizer, OptimizerSettings};

/// Where DPR's hard negatives come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NegativeSource {
    Bm25,
    /// The current dense index (E_Q of this step against the live generation).
    Dense,
    /// In-batch negatives only.
    None,
}

#[derive(Clone, Debug, Serialize)]
pub struct DprSettings {
    pub negatives: NegativeSource,
    /// Hard negatives per query.
    pub hard_negatives: usize,
    /// How deep the mining search looks (and where QA positives are sought).
    pub mine_depth: usize,
}

/// The generator side of LSR.
pub struct LsrSettings {
    pub generator: Arc<LocalGenerator>,
    pub k: usize,
    pub tau: f64,
    pub score: LmScore,
    pub prompt: PromptTemplate,
    /// The question as the generator sees it; `{question}` is replaced by the query.
    pub question_template: String,
    /// Appended to the answer before scoring (e.g. the closing quote after an answer prefix
    /// `The word is "`), so the LM also has to end the answer there.
    pub answer_suffix: String,
    /// A file that keeps generator scores across runs (one JSON object per line).
    pub lm_cache: Option<PathBuf>,
}

pub enum Method {
    Dpr(DprSettings),
    Lsr(Box<LsrSettings>),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Dpr(_) => "dpr",
            Method::Lsr(_) => "lsr",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainSettings {
    pub batch_size: usize,
    pub steps: usize,
    pub optimizer: OptimizerSettings,
    /// τ of the retrieval softmax in both losses (scores of unit vectors are in [−1, 1]).
    pub temperature: f64,
    pub seed: u64,
    /// Evaluate on the dev queries every this many steps (0 = only at the end).
    pub eval_every: usize,
    /// Save `checkpoint/` every this many steps (0 = only at the end).
    pub save_every: usize,
    /// With E_D training: request a re-encoding of the corpus every this many steps.
    pub reindex_every: usize,
    pub out_dir: PathBuf,
}

/// One line of the training log.
#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    /// Index generation the batch retrieved from (0 = the collection's vectors).
    pub generation: u64,
    pub seconds: f64,
    /// Queries of the batch that produced a loss term (others had no usable positive).
    pub used: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct DevLog {
    pub step: usize,
    pub ndcg_at_10: f64,
    pub recall_at_10: f64,
    pub recall_at_100: f64,
    pub queries: usize,
}

/// What the command line shows while training runs.
pub trait TrainObserver {
    fn step(&mut self, log: &StepLog);
    fn dev(&mut self, log: &DevLog);
    fn message(&mut self, text: &str);
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub method: &'static str,
    pub steps: usize,
    pub stopped_early: bool,
    pub seconds: f64,
    pub final_loss: Option<f64>,
    pub dev: Vec<DevLog>,
    pub best_step: Option<usize>,
    pub generations: u64,
    pub query_encoder: PathBuf,
    pub doc_encoder: Option<PathBuf>,
}

/// Everything a run needs.
pub struct RetrieverTraining<'a> {
    pub corpus: TrainingCorpus,
    pub query: TrainableEncoder,
    /// `Some` when E_D trains too.
    pub doc: Option<TrainableEncoder>,
    pub examples: Vec<Example>,
    pub dev: Vec<Example>,
    pub method: Method,
    pub settings: TrainSettings,
    /// Set by Ctrl-C: the loop saves a checkpoint and returns.
    pub stop: &'a AtomicBool,
}

/// Per-(query, chunk) generator scores: Σ log p(y | c∘x) and |y|.
struct LmScores {
    scores: HashMap<(String, String), f64>,
    answer_tokens: HashMap<String, usize>,
    file: Option<std::fs::File>,
    path: Option<PathBuf>,
}

impl LmScores {
    fn open(path: Option<&Path>, fingerprint: &str) -> Result<Self> {
        let mut cache = LmScores {
            scores: HashMap::new(),
            answer_tokens: HashMap::new(),
            file: None,
            path: path.map(Path::to_path_buf),
        };
        let Some(path) = path else { return Ok(cache) };
        if path.is_file() {
            let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
            for (n, line) in text.lines().enumerate() {
                let value: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| TrainError::Data {
                        path: path.to_path_buf(),
                        message: format!("line {}: {e}", n + 1),
                    })?;
                if let Some(found) = value.get("fingerprint").and_then(|v| v.as_str()) {
                    if found != fingerprint {
                        return Err(TrainError::Data {
                            path: path.to_path_buf(),
                            message: "holds scores of another generator or prompt; use another \
                                      --lm-cache file"
                                .into(),
                        });
                    }
                    continue;
                }
                let (Some(q), Some(c), Some(ll), Some(n)) = (
                    value["q"].as_str(),
                    value["c"].as_str(),
                    value["ll"].as_f64(),
                    value["n"].as_u64(),
                ) else {
                    // A line cut by a crash: the scores before it are good.
                    break;
                };
                cache.scores.insert((q.to_string(), c.to_string()), ll);
                cache.answer_tokens.insert(q.to_string(), n as usize);
            }
        }
        let fresh = !path.is_file() || std::fs::metadata(path).map_or(true, |m| m.len() == 0);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        if fresh {
            writeln!(file, "{}", json!({ "fingerprint": fingerprint }))
                .map_err(|e| TrainError::io(path, e))?;
        }
        cache.file = Some(file);
        Ok(cache)
    }

    fn insert(&mut self, query: &str, chunk: &str, ll: f64, tokens: usize) -> Result<()> {
        self.scores
            .insert((query.to_string(), chunk.to_string()), ll);
        self.answer_tokens.insert(query.to_string(), tokens);
        if let (Some(file), Some(path)) = (&mut self.file, &self.path) {
            writeln!(
                file,
                "{}",
                json!({"q": query, "c": chunk, "ll": ll, "n": tokens})
            )
            .map_err(|e| TrainError::io(path, e))?;
        }
        Ok(())
    }
}

impl RetrieverTraining<'_> {
    pub fn run(mut self, observer: &mut dyn TrainObserver) -> Result<TrainSummary> {
        let started = Instant::now();
        let settings = self.settings.clone();
        if settings.batch_size == 0 {
            return Err(TrainError::setting("--batch-size", "must be at least 1"));
        }
        if self.corpus.is_empty() {
            return Err(TrainError::setting(
                "--collection",
                "the collection holds no chunks",
            ));
        }
        if let Method::Lsr(lsr) = &self.method {
            if lsr.k < 2 || lsr.tau <= 0.0 {
                return Err(TrainError::setting(
                    "--k/--tau",
                    "LSR needs k ≥ 2 and τ > 0",
                ));
            }
        }
        std::fs::create_dir_all(&settings.out_dir)
            .map_err(|e| TrainError::io(&settings.out_dir, e))?;
        let log_path = settings.out_dir.join("train-log.jsonl");
        let mut log = std::fs::File::create(&log_path).map_err(|e| TrainError::io(&log_path, e))?;
        let mut write_log = |value: serde_json::Value| -> Result<()> {
            writeln!(log, "{value}").map_err(|e| TrainError::io(&log_path, e))
        };

        let mut vars = self.query.vars();
        if let Some(doc) = &self.doc {
            vars.extend(doc.vars());
        }
        let mut optimizer = Optimizer::new(vars, settings.optimizer.clone())?;

        // E_D training: generation 0 = the collection's vectors, then the worker's.
        let (store, mut reindexer) = match &self.doc {
            Some(_) => {
                let generation =
                    Generation::new(0, 0, self.corpus.dim(), self.corpus.stored_vectors());
                let store = Arc::new(GenerationStore::create(
                    &settings.out_dir.join("index"),
                    generation,
                )?);
                observer.message(&format!(
                    "E_D trains: reading {} chunk texts for re-indexing every {} steps",
                    self.corpus.len(),
                    settings.reindex_every
                ));
                let texts = (0..self.corpus.len())
                    .map(|slot| self.corpus.embedding_text(slot))
                    .collect::<Result<Vec<_>>>()?;
                let reindexer = Reindexer::start(store.clone(), Arc::new(texts), None);
                (Some(store), Some(reindexer))
            }
            None => {
                observer
                    .message("only E_Q trains: the collection's index stays valid, no re-encoding");
                (None, None)
            }
        };

        let mut lm_scores = match &self.method {
            Method::Lsr(lsr) => Some(LmScores::open(
                lsr.lm_cache.as_deref(),
                &format!(
                    "{}|{}|{}|{}|{}|{}",
                    lsr.generator.name(),
                    lsr.prompt.instruction,
                    lsr.prompt.answer_prefix,
                    lsr.prompt.max_context_tokens,
                    lsr.question_template,
                    lsr.answer_suffix
                ),
            )?),
            Method::Dpr(_) => None,
        };

        let mut sampler = EpochSampler::new(self.examples.len(), settings.seed);
        let mut dev_logs: Vec<DevLog> = Vec::new();
        let mut best: Option<(f64, usize)> = None;
        let mut last_loss = None;
        let mut generation_seen = 0;
        let mut stopped_early = false;
        let mut steps_done = 0;

        if !self.dev.is_empty() {
            let dev = self.evaluate_dev(0, store.as_deref())?;
            observer.dev(&dev);
            write_log(json!({"event": "dev", "dev": dev}))?;
            best = Some((dev.ndcg_at_10, 0));
            dev_logs.push(dev);
        }

        for step in 0..settings.steps {
            if self.stop.load(Ordering::SeqCst) {
                stopped_early = true;
                observer.message(&format!("stopping at step {step}: saving the checkpoint"));
                break;
            }
            let step_started = Instant::now();
            let batch = sampler.next_batch(settings.batch_size);
            let generation = store.as_ref().map(|s| s.current());
            let view = match &generation {
                Some(g) => IndexView::Generation(&self.corpus, g.clone()),
                None => IndexView::Collection(&self.corpus),
            };
            if view.generation() != generation_seen {
                let g = generation.as_ref().map_or(0, |g| g.step);
                observer.message(&format!(
                    "step {step}: retrieving from index generation {} (E_D of step {g}); training did not wait",
                    view.generation()
                ));
                generation_seen = view.generation();
            }
            let batch_loss = match &self.method {
                Method::Dpr(dpr) => self.dpr_loss(&batch, dpr, &view, settings.temperature)?,
                Method::Lsr(lsr) => {
                    let cache = lm_scores.as_mut().expect("LSR opens its score cache");
                    self.lsr_loss(&batch, lsr, &view, settings.temperature, cache)?
                }
            };
            drop(view);
            let Some((loss, used)) = batch_loss else {
                observer.message(&format!(
                    "step {step}: no usable example in the batch, skipped"
                ));
                continue;
            };
            let loss_value = f64::from(loss.to_scalar::<f32>()?);
            if !loss_value.is_finite() {
                return Err(TrainError::Diverged {
                    step,
                    loss: loss_value,
                });
            }
            let stats = optimizer.backward_step(&loss)?;
            self.query.refresh()?;
            if let Some(doc) = &mut self.doc {
                doc.refresh()?;
            }
            steps_done = step + 1;
            last_loss = Some(loss_value);
            let entry = StepLog {
                step: steps_done,
                loss: loss_value,
                learning_rate: stats.learning_rate,
                grad_norm: stats.grad_norm,
                generation: generation_seen,
                seconds: step_started.elapsed().as_secs_f64(),
                used,
            };
            observer.step(&entry);
            write_log(json!({"event": "step", "step": entry}))?;

            if let (Some(reindexer), Some(doc)) = (&reindexer, &self.doc) {
                for event in reindexer.drain_events() {
                    observer.message(&event.describe());
                    write_log(
                        json!({"event": "reindex", "at_step": steps_done, "reindex": event}),
                    )?;
                }
                // The last step's E_D is re-encoded after the loop anyway.
                if settings.reindex_every > 0
                    && steps_done.is_multiple_of(settings.reindex_every)
                    && steps_done < settings.steps
                {
                    reindexer.request(steps_done, doc.frozen_copy()?);
                    write_log(json!({"event": "reindex-requested", "step": steps_done}))?;
                }
            }
            if !self.dev.is_empty()
                && settings.eval_every > 0
                && steps_done.is_multiple_of(settings.eval_every)
                && steps_done < settings.steps
            {
                let dev = self.evaluate_dev(steps_done, store.as_deref())?;
                observer.dev(&dev);
                write_log(json!({"event": "dev", "dev": dev}))?;
                if best.is_none_or(|(b, _)| dev.ndcg_at_10 > b) {
                    best = Some((dev.ndcg_at_10, steps_done));
                    self.save(&settings.out_dir.join("best"), steps_done)?;
                }
                dev_logs.push(dev);
            }
            if settings.save_every > 0 && steps_done.is_multiple_of(settings.save_every) {
                self.save(&settings.out_dir.join("checkpoint"), steps_done)?;
            }
        }

        self.save(&settings.out_dir.join("checkpoint"), steps_done)?;
        if let (Some(reindexer), Some(doc)) = (reindexer.take(), &self.doc) {
            // The loop is over: the final index must be the final E_D's, so this one re-index
            // is waited for (unless Ctrl-C asked to stop).
            if stopped_early {
                for event in reindexer.abort() {
                    write_log(
                        json!({"event": "reindex", "at_step": steps_done, "reindex": event}),
                    )?;
                }
            } else {
                observer.message(&format!(
                    "re-encoding the corpus with the final E_D (step {steps_done})"
                ));
                reindexer.request(steps_done, doc.frozen_copy()?);
                write_log(json!({"event": "reindex-requested", "step": steps_done}))?;
                for event in reindexer.finish() {
                    observer.message(&event.describe());
                    write_log(
                        json!({"event": "reindex", "at_step": steps_done, "reindex": event}),
                    )?;
                }
            }
        }
        if !self.dev.is_empty()
            && steps_done > 0
            && dev_logs.last().is_none_or(|d| d.step != steps_done)
        {
            let dev = self.evaluate_dev(steps_done, store.as_deref())?;
            observer.dev(&dev);
            write_log(json!({"event": "dev", "dev": dev}))?;
            if best.is_none_or(|(b, _)| dev.ndcg_at_10 > b) {
                best = Some((dev.ndcg_at_10, steps_done));
                self.save(&settings.out_dir.join("best"), steps_done)?;
            }
            dev_logs.push(dev);
        }
        if best.is_some_and(|(_, s)| s == 0) {
            // Training never beat the starting point on dev: the best model is the initial one.
            self.save_initial(&settings.out_dir.join("best"))?;
        }
        let generations = store.as_ref().map_or(0, |s| s.current().number);
        let chosen = if best.is_some() { "best" } else { "checkpoint" };
        let summary = TrainSummary {
            method: self.method.name(),
            steps: steps_done,
            stopped_early,
            seconds: started.elapsed().as_secs_f64(),
            final_loss: last_loss,
            dev: dev_logs,
            best_step: best.map(|(_, s)| s),
            generations,
            query_encoder: settings.out_dir.join(chosen).join("query-encoder"),
            doc_encoder: self
                .doc
                .as_ref()
                .map(|_| settings.out_dir.join(chosen).join("doc-encoder")),
        };
        write_learning_curves(&settings.out_dir, self.method.name())?;
        let path = settings.out_dir.join("summary.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&summary).unwrap_or_default(),
        )
        .map_err(|e| TrainError::io(&path, e))?;
        Ok(summary)
    }

    fn save(&self, dir: &Path, step: usize) -> Result<()> {
        let info = json!({
            "method": self.method.name(),
            "step": step,
            "settings": self.settings,
            "base": self.query.base_dir(),
        });
        self.query.save(&dir.join("query-encoder"), &info)?;
        if let Some(doc) = &self.doc {
            doc.save(&dir.join("doc-encoder"), &info)?;
        }
        Ok(())
    }

    /// `best/` as the starting encoders, when no step improved on them.
    fn save_initial(&self, dir: &Path) -> Result<()> {
        let query = TrainableEncoder::load(self.query.base_dir())?;
        let info = json!({"method": self.method.name(), "step": 0, "note": "no step beat the initial encoder on dev"});
        query.save(&dir.join("query-encoder"), &info)?;
        if let Some(doc) = &self.doc {
            TrainableEncoder::load(doc.base_dir())?.save(&dir.join("doc-encoder"), &info)?;
        }
        Ok(())
    }

    /// nDCG@10 and recall on the dev queries, documents scored by their best chunk, searched
    /// in the index training currently uses.
    fn evaluate_dev(&self, step: usize, store: Option<&GenerationStore>) -> Result<DevLog> {
        let generation = store.map(|s| s.current());
        let view = match &generation {
            Some(g) => IndexView::Generation(&self.corpus, g.clone()),
            None => IndexView::Collection(&self.corpus),
        };
        let texts: Vec<&str> = self.dev.iter().map(|e| e.query.as_str()).collect();
        let vectors: Vec<f32> = self
            .query
            .encoder()
            .embed(&texts)?
            .into_iter()
            .flatten()
            .collect();
        let hits = view.search(&vectors, 200)?;
        let mut run: Run = Run::new();
        let mut qrels = zrag_eval::beir::Qrels::new();
        for (example, hits) in self.dev.iter().zip(hits) {
            let mut docs: Vec<(String, f32)> = Vec::new();
            for hit in hits {
                let doc = self.corpus.doc_id(hit.slot);
                if !docs.iter().any(|(d, _)| d == doc) {
                    docs.push((doc.to_string(), hit.score));
                }
                if docs.len() == 100 {
                    break;
                }
            }
            run.insert(example.id.clone(), docs);
            qrels.insert(
                example.id.clone(),
                example
                    .positive_docs
                    .iter()
                    .map(|d| (d.clone(), 1))
                    .collect(),
            );
        }
        let report = evaluate_retrieval(&run, &qrels, &[10, 100]);
        let metric = |name: &str| report.metrics.get(name).copied().unwrap_or(0.0);
        Ok(DevLog {
            step,
            ndcg_at_10: metric("ndcg@10"),
            recall_at_10: metric("recall@10"),
            recall_at_100: metric("recall@100"),
            queries: report.num_queries,
        })
    }

    /// Passage vectors `(n, d)` of slots: from E_D with gradients when it trains, else the
    /// index's (constant) vectors.
    fn passage_vectors(&self, slots: &[usize], view: &IndexView) -> Result<Tensor> {
        match &self.doc {
            Some(doc) => {
                let texts = slots
                    .iter()
                    .map(|&s| self.corpus.embedding_text(s))
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                doc.embed(&refs)
            }
            None => {
                let flat: Vec<f32> = slots
                    .iter()
                    .flat_map(|&s| view.vector(s).to_vec())
                    .collect();
                Ok(Tensor::from_vec(
                    flat,
                    (slots.len(), self.corpus.dim()),
                    &Device::Cpu,
                )?)
            }
        }
    }

    fn dpr_loss(
        &self,
        batch: &[usize],
        dpr: &DprSettings,
        view: &IndexView,
        temperature: f64,
    ) -> Result<Option<(Tensor, usize)>> {
        let examples: Vec<&Example> = batch.iter().map(|&i| &self.examples[i]).collect();
        let texts: Vec<&str> = examples.iter().map(|e| e.query.as_str()).collect();
        let queries = self.query.embed(&texts)?;
        let values = queries.to_vec2::<f32>()?;
        let dense_hits = if dpr.negatives == NegativeSource::Dense
            || examples.iter().any(|e| e.positive_docs.is_empty())
        {
            let flat: Vec<f32> = values.iter().flatten().copied().collect();
            Some(view.search(&flat, dpr.mine_depth)?)
        } else {
            None
        };

        let mut keep = Vec::new();
        let mut positives = Vec::new();
        let mut negatives = Vec::new();
        for (b, example) in examples.iter().enumerate() {
            let mined: Vec<SlotHit> = match (dpr.negatives, &dense_hits) {
                (NegativeSource::Dense, Some(hits)) => hits[b].clone(),
                (NegativeSource::Bm25, _) => self.corpus.bm25(&example.query, dpr.mine_depth)?,
                _ => Vec::new(),
            };
            let positive = if example.positive_docs.is_empty() {
                // DPR's rule for question/answer pairs: the best retrieved chunk that
                // contains an answer.
                let candidates = dense_hits
                    .as_ref()
                    .map(|h| h[b].clone())
                    .unwrap_or_default();
                let mut found = None;
                for hit in candidates.iter().chain(&mined) {
                    let (_, text) = self.corpus.chunk(hit.slot)?;
                    if contains_answer(&text, &example.answers) {
                        found = Some(hit.slot);
                        break;
                    }
                }
                found
            } else {
                example
                    .positive_docs
                    .iter()
                    .flat_map(|d| self.corpus.slots_of(d).iter().copied())
                    .max_by(|&a, &c| {
                        dot(&values[b], view.vector(a)).total_cmp(&dot(&values[b], view.vector(c)))
                    })
            };
            let Some(positive) = positive else { continue };
            let mut chosen = Vec::new();
            for hit in &mined {
                if chosen.len() == dpr.hard_negatives {
                    break;
                }
                let is_positive = if example.positive_docs.is_empty() {
                    let (_, text) = self.corpus.chunk(hit.slot)?;
                    contains_answer(&text, &example.answers)
                } else {
                    example
                        .positive_docs
                        .iter()
                        .any(|d| d == self.corpus.doc_id(hit.slot))
                };
                if !is_positive {
                    chosen.push(hit.slot);
                }
            }
            keep.push(b as u32);
            positives.push(positive);
            negatives.extend(chosen);
        }
        if keep.is_empty() {
            return Ok(None);
        }
        let queries = if keep.len() == examples.len() {
            queries
        } else {
            queries.index_select(&Tensor::from_slice(&keep, keep.len(), &Device::Cpu)?, 0)?
        };
        let mut slots = positives.clone();
        slots.extend(negatives);
        let passages = self.passage_vectors(&slots, view)?;
        let targets: Vec<u32> = (0..positives.len() as u32).collect();
        let loss = contrastive_loss(&queries, &passages, &targets, temperature)?;
        Ok(Some((loss, keep.len())))
    }

    fn lsr_loss(
        &self,
        batch: &[usize],
        lsr: &LsrSettings,
        view: &IndexView,
        temperature: f64,
        cache: &mut LmScores,
    ) -> Result<Option<(Tensor, usize)>> {
        let examples: Vec<&Example> = batch
            .iter()
            .map(|&i| &self.examples[i])
            .filter(|e| !e.answers.is_empty())
            .collect();
        if examples.is_empty() {
            return Ok(None);
        }
        let texts: Vec<&str> = examples.iter().map(|e| e.query.as_str()).collect();
        let queries = self.query.embed(&texts)?;
        let flat: Vec<f32> = queries.to_vec2::<f32>()?.into_iter().flatten().collect();
        let hits = view.search(&flat, lsr.k)?;
        let k = hits.iter().map(Vec::len).min().unwrap_or(0);
        if k < 2 {
            return Ok(None);
        }
        let slots: Vec<Vec<usize>> = hits
            .iter()
            .map(|h| h[..k].iter().map(|hit| hit.slot).collect())
            .collect();

        // Generator scores of every (query, chunk) not cached, in one batched pass.
        let tokenizer = lsr.generator.tokenizer();
        let mut prompts = Vec::new();
        let mut targets = Vec::new();
        let mut pending = Vec::new();
        let mut chunk_ids = vec![Vec::with_capacity(k); examples.len()];
        for (b, example) in examples.iter().enumerate() {
            let answer = format!("{}{}", example.answers[0], lsr.answer_suffix);
            let target = tokenizer.encode(&answer)?;
            let question = lsr.question_template.replace("{question}", &example.query);
            for &slot in &slots[b] {
                let (chunk_id, text) = self.corpus.chunk(slot)?;
                if !cache
                    .scores
                    .contains_key(&(example.id.clone(), chunk_id.clone()))
                {
                    let passage = Passage {
                        title: self.corpus.title(slot),
                        text: &text,
                    };
                    prompts.push(lsr.prompt.document(tokenizer, passage, &question)?);
                    targets.push(target.clone());
                    pending.push((example.id.clone(), chunk_id.clone()));
                }
                chunk_ids[b].push(chunk_id);
            }
        }
        if !prompts.is_empty() {
            let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            let t: Vec<&[u32]> = targets.iter().map(Vec::as_slice).collect();
            let scored = lsr.generator.model().score(&p, &t)?;
            for ((query, chunk), (token_lps, target)) in
                pending.iter().zip(scored.iter().zip(&targets))
            {
                let ll: f64 = token_lps.iter().map(|&v| f64::from(v)).sum();
                cache.insert(query, chunk, ll, target.len())?;
            }
        }
        let mut target_log_probs = Vec::with_capacity(examples.len());
        for (b, example) in examples.iter().enumerate() {
            let lls: Vec<f64> = chunk_ids[b]
                .iter()
                .map(|c| cache.scores[&(example.id.clone(), c.clone())])
                .collect();
            let tokens = cache.answer_tokens.get(&example.id).copied().unwrap_or(1);
            target_log_probs.push(lsr_target(&lls, tokens, lsr.score, lsr.tau));
        }

        let all_slots: Vec<usize> = slots.iter().flatten().copied().collect();
        let dim = self.corpus.dim();
        let passages = self
            .passage_vectors(&all_slots, view)?
            .reshape((examples.len(), k, dim))?;
        let scores = passages.broadcast_mul(&queries.unsqueeze(1)?)?.sum(2)?;
        let loss = kl_to_target(&scores, temperature, &target_log_probs)?;
        Ok(Some((loss, examples.len())))
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `learning-curve.svg` (training loss, smoothed) and `dev-curve.svg` from the run's log.
pub fn write_learning_curves(out_dir: &Path, method: &str) -> Result<()> {
    let log_path = out_dir.join("train-log.jsonl");
    let text = std::fs::read_to_string(&log_path).map_err(|e| TrainError::io(&log_path, e))?;
    let mut losses = Vec::new();
    let mut ndcg = Vec::new();
    let mut recall = Vec::new();
    for line in text.lines() {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match value["event"].as_str() {
            Some("step") => {
                if let (Some(s), Some(l)) = (
                    value["step"]["step"].as_f64(),
                    value["step"]["loss"].as_f64(),
                ) {
                    losses.push((s, l));
                }
            }
            Some("dev") => {
                let d = &value["dev"];
                if let (Some(s), Some(n), Some(r)) = (
                    d["step"].as_f64(),
                    d["ndcg_at_10"].as_f64(),
                    d["recall_at_10"].as_f64(),
                ) {
                    ndcg.push((s, n));
                    recall.push((s, r));
                }
            }
            _ => {}
        }
    }
    // Exponential moving average: per-batch losses are noisy.
    let mut smoothed = Vec::with_capacity(losses.len());
    let mut average = None;
    for &(s, l) in &losses {
        let a = match average {
            None => l,
            Some(a) => 0.9 * a + 0.1 * l,
        };
        average = Some(a);
        smoothed.push((s, a));
    }
    let loss_svg = zrag_eval::report::line_chart_svg(
        &format!("{method}: training loss"),
        "step",
        "loss",
        &[("batch loss", losses), ("moving average", smoothed)],
    );
    let dev_svg = zrag_eval::report::line_chart_svg(
        &format!("{method}: dev retrieval"),
        "step",
        "metric",
        &[("nDCG@10", ndcg), ("recall@10", recall)],
    );
    for (name, svg) in [("learning-curve.svg", loss_svg), ("dev-curve.svg", dev_svg)] {
        let path = out_dir.join(name);
        std::fs::write(&path, svg).map_err(|e| TrainError::io(&path, e))?;
    }
    Ok(())
}
