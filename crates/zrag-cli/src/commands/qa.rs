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
    /// The question as the generator sees it; `{question}` is replaced by the file's question
    /// (retrieval always uses the question itself). E.g. "Which word means: {question}?"
    #[arg(long, default_value = "{question}")]
    pub question_template: String,
    /// Write metrics.json, predictions.jsonl, report.md and plots into this directory.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

pub fn run(cli: &Cli, args: &QaArgs) -> Result<ExitCode> {
    let mut items = beir::load_qa(&args.questions)?;
    if let Some(split) = &args.split {
        items.retain(|q| q.split.as_deref() == Some(split.as_str()));
    }
    if let Some(limit) = args.limit {
        items.truncate(limit);
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
        open_retriever(cli, MarginalizeArg::Sequence)?
    } else {
        None
    };

    let mut results = Vec::new();
    let mut predictions = Vec::new();
    for &mode in &args.marginalize {
        let options = args.generation.options(mode)?;
        let progress = bar(items.len() as u64, "questions");
        let started = Instant::now();
        let (mut em_total, mut f1_total) = (0.0, 0.0);
        for item in &items {
            let prompt_question = args.question_template.replace("{question}", &item.question);
            // Retrieval uses the question itself; only the generator sees the template.
            let retrieval_question = &item.question;
            let mut ignore = |_: AnswerEvent<'_>| {};
            let result = answer_with_query(
                retriever.as_ref(),
                &generator,
                retrieval_question,
                &prompt_question,
                &options,
                &mut ignore,
            )?;
            let em = exact_match(&result.answer, &item.answers);
            let f1 = token_f1(&result.answer, &item.answers);
            em_total += em;
            f1_total += f1;
            let top = result
                .sources
                .iter()
                .max_by(|a, b| a.posterior.total_cmp(&b.posterior))
                .map(|s| s.doc_id.clone());
            predictions.push(json!({
                "_id": item.id, "system": options.mode.name(), "question": item.question,
                "answers": item.answers, "prediction": result.answer, "em": em, "f1": f1,
                "log_prob": result.log_prob, "top_cited_doc": top,
                "retrieved": result.sources.iter().map(|s| &s.doc_id).collect::<Vec<_>>(),
            }));
            progress.inc(1);
        }
        progress.finish_and_clear();
        let n = items.len() as f64;
        results.push(QaResult {
            system: options.mode.name().to_string(),
            questions: items.len(),
            em: em_total / n,
            f1: f1_total / n,
            seconds_per_question: started.elapsed().as_secs_f64() / n,
        });
    }

    let extra = json!({
        "questions_file": args.questions.display().to_string(),
        "split": args.split,
        "generator": generator.name(),
        "k": args.generation.k,
        "beam": args.generation.beam,
        "rag_sequence_decoding": format!("{:?}", args.generation.decoding).to_lowercase(),
        "max_tokens": args.generation.max_tokens,
        "question_template": args.question_template,
        "instruction": args.generation.instruction,
        "collection": cli.collection.display().to_string(),
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
