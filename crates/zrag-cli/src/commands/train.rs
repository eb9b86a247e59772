//! `zrag train retriever --method dpr|lsr` and `zrag train generator`: domain adaptation
//! (SPEC §1, §5). The work is in `zrag-train`; this module turns flags into its settings,
//! shows progress, and turns Ctrl-C into a clean stop that keeps the last checkpoint.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::ProgressBar;
use zrag_models::generator::{default_generator_path, LocalGenerator, WeightPrecision};
use zrag_rag::prompt::PromptTemplate;
use zrag_train::corpus::TrainingCorpus;
use zrag_train::data::{self, Example};
use zrag_train::encoder::TrainableEncoder;
use zrag_train::generator::{GeneratorTrainSettings, GeneratorTraining};
use zrag_train::loss::LmScore;
use zrag_train::optim::{Decay, OptimizerSettings};
use zrag_train::retriever::{
    DevLog, DprSettings, LsrSettings, Method, NegativeSource, RetrieverTraining, StepLog,
    TrainObserver, TrainSettings,
};

use super::{encoder_dir, print_json};
use crate::progress::bar;
use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Train the retriever's encoders on the collection: DPR contrastive learning or
    /// LM-supervised retrieval (KL to p_LSR). Only E_Q trains unless --train-doc-encoder.
    Retriever(Box<RetrieverArgs>),
    /// Train LoRA adapters on a de-quantised copy of the generator to answer from retrieved
    /// chunks: loss −Σ_i Σ_j log p(y_i | c_ij ∘ x_i), each chunk prepended separately.
    Generator(Box<GeneratorArgs>),
}

#[derive(Args, Debug)]
pub struct GeneratorArgs {
    /// Question/answer pairs (`{"_id","question","answers","split"}` lines).
    #[arg(long)]
    pub qa: PathBuf,
    /// Training split of --qa (all lines if not given).
    #[arg(long)]
    pub split: Option<String>,
    /// Dev split of --qa, for the dev loss.
    #[arg(long)]
    pub dev_split: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub dev_limit: usize,
    /// Use at most this many training questions (after shuffling with --seed).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output directory: adapter.safetensors, train-log.jsonl, learning-curve.svg, summary.json.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub retrieval: super::retrieval::RetrievalFlags,
    /// Chunks retrieved per question (each is one training prompt).
    #[arg(long, default_value_t = 5)]
    pub k: usize,
    /// Questions per step.
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Warm-up steps (default: 10% of --steps).
    #[arg(long)]
    pub warmup: Option<usize>,
    #[arg(long, value_enum, default_value = "linear")]
    pub decay: DecayArg,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (updates are scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// Projections that get adapters, comma-separated among q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,v", value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 25)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 25)]
    pub save_every: usize,
    /// The generator to adapt (.gguf or HF directory; default: the installed SmolLM2).
    #[arg(long, env = "ZRAG_GENERATOR")]
    pub generator: Option<PathBuf>,
    #[arg(long, default_value = "{question}")]
    pub question_template: String,
    #[arg(long, default_value = zrag_rag::prompt::DEFAULT_INSTRUCTION)]
    pub instruction: String,
    #[arg(long, default_value = "")]
    pub answer_prefix: String,
    /// Appended to the answer (e.g. the closing quote of --answer-prefix).
    #[arg(long, default_value = "")]
    pub answer_suffix: String,
    #[arg(long, default_value_t = 160)]
    pub max_context_tokens: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// In-batch and hard negatives, −log softmax of the positive.
    Dpr,
    /// LM-supervised retrieval: KL(p_R ‖ p_LSR) over the top-k, p_LSR from the generator.
    Lsr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NegativesArg {
    Bm25,
    Dense,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LmScoreArg {
    Prob,
    Logprob,
    MeanLogprob,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DecayArg {
    Linear,
    Cosine,
    Constant,
}

#[derive(Args, Debug)]
pub struct RetrieverArgs {
    #[arg(long, value_enum)]
    pub method: MethodArg,
    /// Output directory: checkpoint/, best/, train-log.jsonl, learning curves, summary.json.
    #[arg(long)]
    pub out: PathBuf,
    /// BEIR queries.jsonl (with --qrels).
    #[arg(long)]
    pub queries: Option<PathBuf>,
    /// BEIR qrels of the training queries.
    #[arg(long, requires = "queries")]
    pub qrels: Option<PathBuf>,
    /// Answers of the BEIR queries (a `zrag eval qa` file): LSR's y.
    #[arg(long)]
    pub answers: Option<PathBuf>,
    /// Question/answer pairs instead of qrels (`{"id","question","answers","split"}` lines).
    #[arg(long, conflicts_with = "qrels")]
    pub qa: Option<PathBuf>,
    /// Only the --qa lines of this split.
    #[arg(long)]
    pub split: Option<String>,
    /// Dev qrels (queries from --queries): evaluated every --eval-every steps; best/ keeps the
    /// best nDCG@10.
    #[arg(long)]
    pub dev_qrels: Option<PathBuf>,
    /// Dev queries evaluated (the first ones).
    #[arg(long, default_value_t = 500)]
    pub dev_limit: usize,
    /// Use at most this many training examples (after shuffling with --seed).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Train E_D too; a background worker re-encodes the corpus every --reindex-every steps.
    #[arg(long)]
    pub train_doc_encoder: bool,
    #[arg(long, default_value_t = 50)]
    pub reindex_every: usize,

    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 500)]
    pub steps: usize,
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    /// Warm-up steps (default: 10% of --steps).
    #[arg(long)]
    pub warmup: Option<usize>,
    #[arg(long, value_enum, default_value = "linear")]
    pub decay: DecayArg,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Temperature of the retrieval softmax in the loss.
    #[arg(long, default_value_t = 0.05)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 100)]
    pub save_every: usize,

    /// DPR: where hard negatives come from.
    #[arg(long, value_enum, default_value = "bm25")]
    pub negatives: NegativesArg,
    /// DPR: hard negatives per query.
    #[arg(long, default_value_t = 1)]
    pub hard_negatives: usize,
    /// DPR: depth of the mining search.
    #[arg(long, default_value_t = 30)]
    pub mine_depth: usize,

    /// LSR: chunks retrieved per query (C).
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// LSR: τ of p_LSR.
    #[arg(long, default_value_t = 0.1)]
    pub tau: f64,
    /// LSR: s_LM(c) from p(y|c∘x).
    #[arg(long, value_enum, default_value = "logprob")]
    pub lm_score: LmScoreArg,
    /// LSR: the generator (.gguf or HF directory; default: the installed SmolLM2).
    #[arg(long, env = "ZRAG_GENERATOR")]
    pub generator: Option<PathBuf>,
    /// LSR: the question as the generator sees it.
    #[arg(long, default_value = "{question}")]
    pub question_template: String,
    #[arg(long, default_value = zrag_rag::prompt::DEFAULT_INSTRUCTION)]
    pub instruction: String,
    #[arg(long, default_value = "")]
    pub answer_prefix: String,
    /// LSR: appended to the answer (e.g. the closing quote of --answer-prefix).
    #[arg(long, default_value = "")]
    pub answer_suffix: String,
    #[arg(long, default_value_t = 160)]
    pub max_context_tokens: usize,
    /// LSR: keep generator scores in this file across runs.
    #[arg(long)]
    pub lm_cache: Option<PathBuf>,
}

pub fn run(cli: &Cli, cmd: &TrainCommand) -> Result<ExitCode> {
    match cmd {
        TrainCommand::Retriever(args) => retriever(cli, args),
        TrainCommand::Generator(args) => generator(cli, args),
    }
}

/// Ctrl-C sets this; a second Ctrl-C exits at once.
static STOP: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_interrupt(_: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

fn install_interrupt_handler() {
    #[cfg(unix)]
    // SAFETY: the handler only touches an atomic and calls _exit.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
}

fn load_examples(args: &RetrieverArgs) -> Result<Vec<Example>> {
    let mut examples = match (&args.qrels, &args.qa) {
        (Some(qrels), _) => data::from_beir(
            args.queries.as_deref().context("--qrels needs --queries")?,
            qrels,
            args.answers.as_deref(),
        )?,
        (None, Some(qa)) => data::from_qa(qa, args.split.as_deref())?,
        (None, None) => anyhow::bail!("give training data: --queries with --qrels, or --qa"),
    };
    data::shuffle(&mut examples, args.seed);
    if let Some(limit) = args.limit {
        examples.truncate(limit);
    }
    Ok(examples)
}

fn retriever(cli: &Cli, args: &RetrieverArgs) -> Result<ExitCode> {
    let examples = load_examples(args)?;
    let dev = match &args.dev_qrels {
        Some(qrels) => {
            let queries = args
                .queries
                .as_deref()
                .context("--dev-qrels needs --queries")?;
            let mut dev = data::from_beir(queries, qrels, None)?;
            dev.truncate(args.dev_limit);
            dev
        }
        None => Vec::new(),
    };
    let snapshot = match cli.open_store()? {
        zrag_index::store::Store::Embedded(collection) => collection.snapshot()?,
        store => anyhow::bail!(
            "zrag train works on an embedded collection (it re-indexes into generations of its \
             own); {} is a PostgreSQL store: train on an embedded copy, then index with the \
             trained --doc-encoder",
            store.describe()
        ),
    };
    let stored = snapshot
        .embedding()
        .cloned()
        .context("the collection has no embeddings; index the corpus first")?;
    let corpus = TrainingCorpus::new(snapshot);

    let query_dir = encoder_dir(cli, &cli.query_encoder)?;
    let query = TrainableEncoder::load(&query_dir)
        .with_context(|| format!("loading E_Q from {}", query_dir.display()))?;
    let doc = if args.train_doc_encoder {
        let doc_dir = encoder_dir(cli, &cli.doc_encoder)?;
        let doc = TrainableEncoder::load(&doc_dir)
            .with_context(|| format!("loading E_D from {}", doc_dir.display()))?;
        let identity = doc.encoder().identity();
        anyhow::ensure!(
            identity.sha256 == stored.sha256,
            "E_D {} is not the encoder that built the collection ({}): its stored vectors would \
             not be E_D's; pass the collection's encoder as --doc-encoder",
            doc_dir.display(),
            stored.describe()
        );
        Some(doc)
    } else {
        None
    };

    let method = match args.method {
        MethodArg::Dpr => Method::Dpr(DprSettings {
            negatives: match args.negatives {
                NegativesArg::Bm25 => NegativeSource::Bm25,
                NegativesArg::Dense => NegativeSource::Dense,
                NegativesArg::None => NegativeSource::None,
            },
            hard_negatives: args.hard_negatives,
            mine_depth: args.mine_depth.max(args.hard_negatives + 1),
        }),
        MethodArg::Lsr => {
            anyhow::ensure!(
                examples.iter().any(|e| !e.answers.is_empty()),
                "LSR needs answers: give --answers with --qrels, or --qa"
            );
            let path = match &args.generator {
                Some(path) => path.clone(),
                None => default_generator_path()?,
            };
            let generator = LocalGenerator::load(&path)
                .with_context(|| format!("loading the generator from {}", path.display()))?;
            Method::Lsr(Box::new(LsrSettings {
                generator: Arc::new(generator),
                k: args.k,
                tau: args.tau,
                score: match args.lm_score {
                    LmScoreArg::Prob => LmScore::Prob,
                    LmScoreArg::Logprob => LmScore::Logprob,
                    LmScoreArg::MeanLogprob => LmScore::MeanLogprob,
                },
                prompt: PromptTemplate {
                    instruction: args.instruction.clone(),
                    max_context_tokens: args.max_context_tokens,
                    answer_prefix: args.answer_prefix.clone(),
                },
                question_template: args.question_template.clone(),
                answer_suffix: args.answer_suffix.clone(),
                lm_cache: args.lm_cache.clone(),
            }))
        }
    };
    let settings = TrainSettings {
        batch_size: args.batch_size,
        steps: args.steps,
        optimizer: optimizer_settings(
            args.lr,
            args.warmup,
            args.steps,
            args.decay,
            args.weight_decay,
            args.max_grad_norm,
        ),
        temperature: args.temperature,
        seed: args.seed,
        eval_every: args.eval_every,
        save_every: args.save_every,
        reindex_every: args.reindex_every,
        out_dir: args.out.clone(),
    };
    eprintln!(
        "training {} on {} examples ({} dev), {} chunks, {} steps of {}",
        method.name(),
        examples.len(),
        dev.len(),
        corpus.len(),
        args.steps,
        args.batch_size
    );
    install_interrupt_handler();
    let mut observer = ProgressObserver::new(args.steps);
    let summary = RetrieverTraining {
        corpus,
        query,
        doc,
        examples,
        dev,
        method,
        settings,
        stop: &STOP,
    }
    .run(&mut observer)?;
    observer.bar.finish_and_clear();
    if cli.json {
        print_json(&summary)?;
    } else {
        println!(
            "{}",
            run_line(
                summary.steps,
                summary.seconds,
                summary.stopped_early,
                summary.final_loss
            )
        );
        for dev in &summary.dev {
            println!(
                "  dev @ step {:>5}: nDCG@10 {:.4}  recall@10 {:.4}  recall@100 {:.4}",
                dev.step, dev.ndcg_at_10, dev.recall_at_10, dev.recall_at_100
            );
        }
        println!("query encoder: {}", summary.query_encoder.display());
        if let Some(doc) = &summary.doc_encoder {
            println!(
                "document encoder: {} (re-index the collection with it)",
                doc.display()
            );
        }
        println!("curves: {}", args.out.join("learning-curve.svg").display());
    }
    Ok(if summary.stopped_early {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

fn generator(cli: &Cli, args: &GeneratorArgs) -> Result<ExitCode> {
    let mut examples = data::from_qa(&args.qa, args.split.as_deref())?;
    data::shuffle(&mut examples, args.seed);
    if let Some(limit) = args.limit {
        examples.truncate(limit);
    }
    let dev = match &args.dev_split {
        Some(split) => {
            let mut dev = data::from_qa(&args.qa, Some(split))?;
            dev.truncate(args.dev_limit);
            dev
        }
        None => Vec::new(),
    };
    let path = match &args.generator {
        Some(path) => path.clone(),
        None => default_generator_path()?,
    };
    let generator = LocalGenerator::load_with(&path, WeightPrecision::F32)
        .with_context(|| format!("loading the generator from {}", path.display()))?;
    let retriever = super::retrieval::open(cli, &args.retrieval)?;
    let settings = GeneratorTrainSettings {
        batch_size: args.batch_size,
        steps: args.steps,
        k: args.k,
        optimizer: optimizer_settings(
            args.lr,
            args.warmup,
            args.steps,
            args.decay,
            args.weight_decay,
            args.max_grad_norm,
        ),
        rank: args.rank,
        alpha: args.alpha,
        targets: args.lora_targets.clone(),
        seed: args.seed,
        eval_every: args.eval_every,
        save_every: args.save_every,
        question_template: args.question_template.clone(),
        answer_suffix: args.answer_suffix.clone(),
        out_dir: args.out.clone(),
    };
    eprintln!(
        "training LoRA (rank {}, {}) on {} questions × {} chunks ({} dev), {} steps of {}",
        args.rank,
        args.lora_targets.join(","),
        examples.len(),
        args.k,
        dev.len(),
        args.steps,
        args.batch_size
    );
    install_interrupt_handler();
    let mut observer = ProgressObserver::new(args.steps);
    let summary = GeneratorTraining {
        generator: &generator,
        retriever: &retriever,
        prompt: PromptTemplate {
            instruction: args.instruction.clone(),
            max_context_tokens: args.max_context_tokens,
            answer_prefix: args.answer_prefix.clone(),
        },
        examples,
        dev,
        settings,
        stop: &STOP,
    }
    .run(&mut observer)?;
    observer.bar.finish_and_clear();
    if cli.json {
        print_json(&summary)?;
    } else {
        println!(
            "{}",
            run_line(
                summary.steps,
                summary.seconds,
                summary.stopped_early,
                summary.final_loss
            )
        );
        for dev in &summary.dev {
            println!("  dev @ step {:>5}: loss {:.4}", dev.step, dev.loss);
        }
        println!(
            "adapter: {} (use: zrag ask --adapter {})",
            summary.adapter.display(),
            summary.adapter.display()
        );
    }
    Ok(if summary.stopped_early {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

fn optimizer_settings(
    lr: f64,
    warmup: Option<usize>,
    steps: usize,
    decay: DecayArg,
    weight_decay: f64,
    max_grad_norm: f64,
) -> OptimizerSettings {
    OptimizerSettings {
        learning_rate: lr,
        warmup_steps: warmup.unwrap_or(steps / 10),
        total_steps: steps,
        decay: match decay {
            DecayArg::Linear => Decay::Linear,
            DecayArg::Cosine => Decay::Cosine,
            DecayArg::Constant => Decay::Constant,
        },
        weight_decay,
        max_grad_norm,
        ..Default::default()
    }
}

/// The first line of a finished run's report.
fn run_line(steps: usize, seconds: f64, stopped_early: bool, final_loss: Option<f64>) -> String {
    format!(
        "{steps} steps in {seconds:.0}s{}; final loss {}",
        if stopped_early { " (stopped)" } else { "" },
        final_loss.map_or("-".into(), |l| format!("{l:.4}"))
    )
}

/// A progress bar with the running loss; messages and dev results printed above it.
struct ProgressObserver {
    bar: ProgressBar,
    average: Option<f64>,
}

impl ProgressObserver {
    fn new(steps: usize) -> Self {
        ProgressObserver {
            bar: bar(steps as u64, "training"),
            average: None,
        }
    }
}

impl TrainObserver for ProgressObserver {
    fn step(&mut self, log: &StepLog) {
        let average = match self.average {
            None => log.loss,
            Some(a) => 0.95 * a + 0.05 * log.loss,
        };
        self.average = Some(average);
        self.bar.set_position(log.step as u64);
        self.bar.set_message(format!("loss {average:.3}"));
        if !self.bar.is_hidden() {
            return;
        }
        // No terminal (logs, CI): one line every 10 steps instead of a bar.
        if log.step.is_multiple_of(10) {
            eprintln!(
                "step {:>6}  loss {:.4} (avg {average:.4})  lr {:.2e}  |g| {:.3}  gen {}  {:.2}s",
                log.step, log.loss, log.learning_rate, log.grad_norm, log.generation, log.seconds
            );
        }
    }

    fn dev(&mut self, log: &DevLog) {
        self.bar.println(format!(
            "dev @ step {}: nDCG@10 {:.4}  recall@10 {:.4}  recall@100 {:.4} ({} queries)",
            log.step, log.ndcg_at_10, log.recall_at_10, log.recall_at_100, log.queries
        ));
        if self.bar.is_hidden() {
            eprintln!(
                "dev @ step {}: nDCG@10 {:.4}  recall@10 {:.4}  recall@100 {:.4}",
                log.step, log.ndcg_at_10, log.recall_at_10, log.recall_at_100
            );
        }
    }

    fn message(&mut self, text: &str) {
        if self.bar.is_hidden() {
            eprintln!("{text}");
        } else {
            self.bar.println(text);
        }
    }
}
