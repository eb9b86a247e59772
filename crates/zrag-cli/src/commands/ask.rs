//! `zrag ask`: answer a question from the collection with RAG-Sequence, RAG-Token or
//! retrieve-then-read, citing sources by their posterior p(z|x,y).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde_json::json;
use zrag_models::generator::{default_generator_path, LocalGenerator, WeightPrecision};
use zrag_rag::answer::{answer, answer_remote, Answer, AnswerEvent, AnswerMode, AnswerOptions};
use zrag_rag::generate::{DecodeOptions, Sampling, Search, SequenceDecoding};
use zrag_rag::prompt::{PromptTemplate, DEFAULT_INSTRUCTION};
use zrag_rag::remote::RemoteGenerator;
use zrag_rag::Retriever;

use super::print_json;
use super::retrieval::{self, RetrievalFlags};
use super::search::snippet;
use crate::Cli;

/// `--marginalize`: how the retrieved chunks are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MarginalizeArg {
    /// RAG-Sequence: p(y|x) = Σ_z p(z|x) p(y|x,z).
    Sequence,
    /// RAG-Token: p(y|x) = Π_i Σ_z p(z|x) p(y_i|x,z,y_<i).
    Token,
    /// Retrieve-then-read: all chunks in one prompt, [n] citations.
    None,
    /// No retrieval.
    ClosedBook,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DecodingArg {
    /// Score every candidate under every document (Lewis et al.'s thorough decoding).
    Thorough,
    /// Candidates not produced by a document get probability 0 under it.
    Fast,
}

/// Generation options shared by `ask` and `eval qa`.
#[derive(Args, Debug, Clone)]
pub struct GenerationArgs {
    /// Generator: a .gguf file or a Hugging Face model directory (default: SmolLM2-135M-Instruct
    /// Q4_1 from scripts/fetch-models.sh).
    #[arg(long, env = "ZRAG_GENERATOR")]
    pub generator: Option<PathBuf>,
    /// A LoRA adapter from `zrag train generator`, merged into the generator (loaded with f32
    /// weights).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Load the generator with f32 weights (de-quantised), as --adapter does: the baseline
    /// that isolates what an adapter changes from what de-quantising changes.
    #[arg(long)]
    pub dequantize: bool,
    /// Chunks to retrieve (p(z|x) is a softmax over these).
    #[arg(long, short, default_value_t = 5)]
    pub k: usize,
    /// RAG-Sequence decoding: thorough or fast.
    #[arg(long, value_enum, default_value = "thorough")]
    pub decoding: DecodingArg,
    /// Beam width (1 = greedy).
    #[arg(long, default_value_t = 1)]
    pub beam: usize,
    /// Sample with this temperature instead of searching (greedy/beam).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Maximum new tokens (stop token included).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Instruction after the question in the prompt.
    #[arg(long, default_value = DEFAULT_INSTRUCTION)]
    pub instruction: String,
    /// Tokens of a chunk's text kept in a prompt.
    #[arg(long, default_value_t = 384)]
    pub max_context_tokens: usize,
    /// An OpenAI-compatible server to generate with instead (e.g. http://127.0.0.1:8080/v1);
    /// retrieve-then-read only. The local generator, if installed, still scores the answer
    /// for the citations.
    #[arg(long, env = "ZRAG_REMOTE_GENERATOR")]
    pub remote_generator: Option<String>,
    /// Model name sent to the remote server.
    #[arg(long, default_value = "default")]
    pub remote_model: String,
    /// Bearer token for the remote server.
    #[arg(long, env = "ZRAG_REMOTE_API_KEY", hide_env_values = true)]
    pub remote_api_key: Option<String>,
    /// Text that opens the model's reply (e.g. 'The word is "'); the answer is what follows.
    #[arg(long, default_value = "")]
    pub answer_prefix: String,
}

impl GenerationArgs {
    pub fn load_generator(&self) -> Result<LocalGenerator> {
        let path = match &self.generator {
            Some(path) => path.clone(),
            None => default_generator_path()?,
        };
        match &self.adapter {
            None if self.dequantize => LocalGenerator::load_with(&path, WeightPrecision::F32)
                .with_context(|| format!("loading the generator from {}", path.display())),
            None => LocalGenerator::load(&path)
                .with_context(|| format!("loading the generator from {}", path.display())),
            Some(adapter) => LocalGenerator::load_with_adapter(&path, adapter).with_context(|| {
                format!(
                    "loading the generator from {} with the adapter {}",
                    path.display(),
                    adapter.display()
                )
            }),
        }
    }

    pub fn options(&self, marginalize: MarginalizeArg) -> Result<AnswerOptions> {
        let sequence = match self.decoding {
            DecodingArg::Thorough => SequenceDecoding::Thorough,
            DecodingArg::Fast => SequenceDecoding::Fast,
        };
        let mode = match marginalize {
            MarginalizeArg::Sequence => AnswerMode::Sequence(sequence),
            MarginalizeArg::Token => AnswerMode::Token,
            MarginalizeArg::None => AnswerMode::RetrieveThenRead,
            MarginalizeArg::ClosedBook => AnswerMode::ClosedBook,
        };
        anyhow::ensure!(self.beam >= 1, "--beam must be at least 1");
        anyhow::ensure!(
            self.k >= 1 || mode == AnswerMode::ClosedBook,
            "--k must be at least 1"
        );
        let search = match self.temperature {
            Some(temperature) => Search::Sample(Sampling {
                temperature,
                top_p: self.top_p,
                seed: self.seed,
            }),
            None if self.beam > 1 => Search::Beam { width: self.beam },
            None => Search::Greedy,
        };
        Ok(AnswerOptions {
            k: self.k,
            mode,
            decode: DecodeOptions {
                max_new_tokens: self.max_tokens,
                search,
                extra_stop_tokens: Vec::new(),
                cancel: Default::default(),
            },
            template: PromptTemplate {
                instruction: self.instruction.clone(),
                max_context_tokens: self.max_context_tokens,
                answer_prefix: self.answer_prefix.clone(),
            },
        })
    }
}

#[derive(Args, Debug)]
pub struct AskArgs {
    /// The question.
    pub question: String,
    #[arg(long, value_enum, default_value = "sequence")]
    pub marginalize: MarginalizeArg,
    /// Print sources first, then the answer as it is generated, then the posterior.
    #[arg(long)]
    pub stream: bool,
    #[command(flatten)]
    pub generation: GenerationArgs,
    #[command(flatten)]
    pub retrieval: RetrievalFlags,
}

/// A retriever over the collection, or `None` for closed-book answers.
pub fn open_retriever(
    cli: &Cli,
    marginalize: MarginalizeArg,
    flags: &RetrievalFlags,
) -> Result<Option<Retriever>> {
    if marginalize == MarginalizeArg::ClosedBook {
        return Ok(None);
    }
    Ok(Some(retrieval::open(cli, flags)?))
}

pub fn run(cli: &Cli, args: &AskArgs) -> Result<ExitCode> {
    let options = args.generation.options(args.marginalize)?;
    let retriever = open_retriever(cli, args.marginalize, &args.retrieval)?;
    let remote = match &args.generation.remote_generator {
        Some(url) => {
            anyhow::ensure!(
                args.marginalize == MarginalizeArg::None,
                "a remote generator returns text, not the token log-probabilities that \
                 RAG-Sequence / RAG-Token marginalise over: use --marginalize none with it"
            );
            Some(RemoteGenerator::new(
                url,
                &args.generation.remote_model,
                args.generation.remote_api_key.clone(),
                Duration::from_secs(300),
            )?)
        }
        None => None,
    };
    // With a remote generator the local one is optional: it only scores the answer.
    let generator = match (&remote, args.generation.load_generator()) {
        (_, Ok(generator)) => Some(generator),
        (None, Err(e)) => return Err(e),
        (Some(_), Err(e)) => {
            eprintln!("zrag: no local generator to score the remote answer ({e:#}); citations fall back to retrieval probabilities");
            None
        }
    };
    let mut out = std::io::stdout().lock();
    let mut write_error = None;
    let mut on_event = |event: AnswerEvent<'_>| {
        if !args.stream || write_error.is_some() {
            return;
        }
        let written = match (event, cli.json) {
            (AnswerEvent::Sources(sources), true) => {
                writeln!(out, "{}", json!({"event": "sources", "sources": sources}))
            }
            (AnswerEvent::Text(text), true) => {
                writeln!(out, "{}", json!({"event": "token", "text": text}))
            }
            (AnswerEvent::Sources(sources), false) => {
                let mut text = String::from("Sources:\n");
                for (i, s) in sources.iter().enumerate() {
                    text.push_str(&format!(
                        "  [{}] {}  p(z|x) {:.3}\n",
                        i + 1,
                        s.title.as_deref().unwrap_or(&s.doc_id),
                        s.retrieval_prob
                    ));
                }
                write!(out, "{text}\nAnswer: ")
            }
            (AnswerEvent::Text(text), false) => write!(out, "{text}"),
        };
        if let Err(e) = written.and_then(|()| out.flush()) {
            write_error = Some(e);
        }
    };
    let result = match (&remote, &retriever, &generator) {
        (Some(remote), Some(retriever), scorer) => answer_remote(
            retriever,
            remote,
            scorer.as_ref(),
            &args.question,
            &options,
            &mut on_event,
        )?,
        (_, _, Some(generator)) => answer(
            retriever.as_ref(),
            generator,
            &args.question,
            &options,
            &mut on_event,
        )?,
        _ => anyhow::bail!("no generator to answer with"),
    };
    if let Some(e) = write_error {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(ExitCode::SUCCESS);
        }
        return Err(e.into());
    }
    drop(out);
    match (args.stream, cli.json) {
        (true, true) => {
            let mut line = serde_json::to_value(&result)?;
            line["event"] = json!("answer");
            println!("{line}");
        }
        (false, true) => print_json(&result)?,
        (true, false) => {
            println!();
            print_citations(&result);
        }
        (false, false) => {
            println!("{}", result.answer);
            print_citations(&result);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_citations(result: &Answer) {
    if result.sources.is_empty() {
        return;
    }
    println!("\nCitations (posterior p(z|x,y), retrieval p(z|x)):");
    let mut order: Vec<usize> = (0..result.sources.len()).collect();
    order.sort_by(|&a, &b| {
        result.sources[b]
            .posterior
            .total_cmp(&result.sources[a].posterior)
    });
    for i in order {
        let s = &result.sources[i];
        println!(
            "  [{}] {:.3} (retrieval {:.3})  {}  [{}]",
            i + 1,
            s.posterior,
            s.retrieval_prob,
            s.title.as_deref().unwrap_or(&s.doc_id),
            s.chunk_id
        );
        println!("      {}", snippet(&s.text, 160));
    }
    println!(
        "\nmarginalize {}, log p(y|x) {:.3}, {} tokens",
        result.marginalize, result.log_prob, result.tokens
    );
}
