//! `zrag eval qa`: exact match and token F1 of generated answers against gold answers, for
//! one or several ways of answering (closed-book, retrieve-then-read, RAG-Sequence,
//! RAG-Token) on the same questions, side by side.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use zrag_eval::answers::{exact_match, token_f1};
use zrag_eval::beir;
use zrag_eval::report::{write_qa_report, QaResult};
use zrag_rag::answer::{answer_with_query, AnswerEvent};

use super::ask::{open_retriever, GenerationArgs, MarginalizeArg};
use super::print_json;
use super::retrieval::RetrievalFlags;
use crate::progress::bar;
use crate::Cli;

#[derive(Args, Debug)]
pub struct QaArgs {
    /// Questions with gold answers, jsonl: {"_id", "question", "answers": [..], "split"?}.
    #[arg(long)]
    pub questions: PathBuf,
    /// Ways of answering to evaluate, comma-separated, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sequence")]
    pub marginalize: Vec<MarginalizeArg>,
    /// Only questions of this split (train, dev, test), when the file has splits.
    #[arg(long)]
    pub split: Option<String>,
    /// Evaluate at most this many questions (the first ones of the file / split).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Evaluate a fixed pseudo-random sample of this many questions (the same sample on every
    /// run: questions ordered by a hash of their id), instead of the first ones.
    #[arg(long, conflicts_with = "limit")]
    pub sample: Option<usize>,
    /// The question as the generator sees it; `{question}` is replaced by the file's question
    /// (retrieval always uses the question itself). E.g. "Which word means: {question}?"
    #[arg(long, default_value = "{question}")]
    pub question_template: String,
    /// Score only the prediction's text before the first occurrence of this string (e.g. `"`
    /// after --answer-prefix 'The word is "'); the full text is kept in predictions.jsonl.
    #[arg(long)]
    pub cut_at: Option<String>,
    /// Write metrics.json, predictions.jsonl, report.md and plots into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub generation: GenerationArgs,
    #[command(flatten)]
    pub retrieval: RetrievalFlags,
}

pub fn run(cli: &Cli, args: &QaArgs) -> Result<ExitCode> {
    let mut items = beir::load_qa(&args.questions)?;
    if let Some(split) = &args.split {
        items.retain(|q| q.split.as_deref() == Some(split.as_str()));
    }
    if let Some(limit) = args.limit {
        items.truncate(limit);
    }
    if let Some(sample) = args.sample {
        items.sort_by_key(|q| id_hash(&q.id));
        items.truncate(sample);
    }
    anyhow::ensure!(
        !items.is_empty(),
        "no questions to evaluate in {}{}",
        args.questions.display(),
        args.split
            .as_ref()
            .map(|s| format!(" (split {s})"))
            .unwrap_or_default()
    );
    anyhow::ensure!(
        !args.marginalize.is_empty(),
        "--marginalize needs at least one mode"
    );
    let generator = args.generation.load_generator()?;
    let needs_retrieval = args
        .marginalize
        .iter()
        .any(|m| *m != MarginalizeArg::ClosedBook);
    let retriever = if needs_retrieval {
        open_retriever(cli, MarginalizeArg::Sequence, &args.retrieval)?
    } else {
        None
    };

    // Question-major, so that every mode meets the same machine conditions over time.
    let modes: Vec<_> = args
        .marginalize
        .iter()
        .map(|&m| args.generation.options(m))
        .collect::<Result<_>>()?;
    let mut totals = vec![(0.0f64, 0.0f64, 0.0f64); modes.len()];
    let mut predictions = Vec::new();
    let progress = bar((items.len() * modes.len()) as u64, "answers");
    for item in &items {
        let prompt_question = args.question_template.replace("{question}", &item.question);
        for (options, total) in modes.iter().zip(totals.iter_mut()) {
            // Cold timings: no mode profits from prompts another mode already ran.
            generator.model().clear_prompt_cache();
            let started = Instant::now();
            let mut ignore = |_: AnswerEvent<'_>| {};
            // Retrieval uses the question itself; only the generator sees the template.
            let result = answer_with_query(
                retriever.as_ref(),
                &generator,
                &item.question,
                &prompt_question,
                options,
                &mut ignore,
            )?;
            let seconds = started.elapsed().as_secs_f64();
            let scored = match &args.cut_at {
                Some(cut) => result.answer.split(cut.as_str()).next().unwrap_or_default(),
                None => result.answer.as_str(),
            };
            let em = exact_match(scored, &item.answers);
            let f1 = token_f1(scored, &item.answers);
            total.0 += em;
            total.1 += f1;
            total.2 += seconds;
            let top = result
                .sources
                .iter()
                .max_by(|a, b| a.posterior.total_cmp(&b.posterior))
                .map(|s| s.doc_id.clone());
            predictions.push(json!({
                "_id": item.id, "system": options.mode.name(), "question": item.question,
                "answers": item.answers, "prediction": scored, "generated": result.answer, "em": em, "f1": f1,
                "log_prob": result.log_prob, "seconds": seconds, "top_cited_doc": top,
                "retrieved": result.sources.iter().map(|s| &s.doc_id).collect::<Vec<_>>(),
            }));
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    let n = items.len() as f64;
    let results: Vec<QaResult> = modes
        .iter()
        .zip(&totals)
        .map(|(options, (em, f1, seconds))| QaResult {
            system: options.mode.name().to_string(),
            questions: items.len(),
            em: em / n,
            f1: f1 / n,
            seconds_per_question: seconds / n,
        })
        .collect();

    let extra = json!({
        "questions_file": args.questions.display().to_string(),
        "split": args.split,
        "sample": args.sample,
        "generator": generator.name(),
        "k": args.generation.k,
        "beam": args.generation.beam,
        "rag_sequence_decoding": format!("{:?}", args.generation.decoding).to_lowercase(),
        "max_tokens": args.generation.max_tokens,
        "question_template": args.question_template,
        "instruction": args.generation.instruction,
        "answer_prefix": args.generation.answer_prefix,
        "cut_at": args.cut_at,
        "max_context_tokens": args.generation.max_context_tokens,
        "collection": cli.store_name(),
    });
    if let Some(dir) = &args.report {
        write_qa_report(dir, "Question answering", &results, &predictions, &extra)?;
    }
    if cli.json {
        let mut output = json!({"results": results, "extra": extra});
        if let [only] = results.as_slice() {
            output["em"] = json!(only.em);
            output["f1"] = json!(only.f1);
        }
        print_json(&output)?;
    } else {
        println!(
            "{:>12}  {:>9}  {:>7}  {:>7}  {:>10}",
            "system", "questions", "EM", "F1", "s/question"
        );
        for r in &results {
            println!(
                "{:>12}  {:>9}  {:>7.4}  {:>7.4}  {:>10.2}",
                r.system, r.questions, r.em, r.f1, r.seconds_per_question
            );
        }
        if let Some(dir) = &args.report {
            println!("report: {}", dir.join("report.md").display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A stable hash of a question id (FNV-1a, then SplitMix64 to spread it), for `--sample`.
fn id_hash(id: &str) -> u64 {
    let fnv = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    zrag_eval::revdict::splitmix64(fnv)
}
