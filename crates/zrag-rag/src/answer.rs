//! Question → retrieval → generation → an answer with posterior citations.
//!
//! [`answer`] runs the whole RAG loop for one question in one of four modes:
//! - [`AnswerMode::Sequence`] / [`AnswerMode::Token`]: one prompt z∘x per retrieved chunk,
//!   marginalised as RAG-Sequence or RAG-Token ([`crate::generate`]), all k in one batch;
//! - [`AnswerMode::RetrieveThenRead`]: the k chunks numbered in one prompt, decoded as plain
//!   text (the model may print [n] markers);
//! - [`AnswerMode::ClosedBook`]: no retrieval.
//!
//! Citations always come from the document posterior p(z|x,y), never from markers the model
//! prints. For retrieve-then-read the posterior is the RAG-Sequence posterior of the answer
//! that was read: one extra batched scoring pass of y under each chunk's own prompt.

use serde::Serialize;
use zrag_models::generator::{ChatMessage, LocalGenerator, TextStream};
use zrag_models::CausalLm;

use crate::generate::{
    self, logspace, DecodeOptions, Decoded, Finish, Marginalize, SequenceDecoding,
};
use crate::prompt::{Passage, PromptTemplate};
use crate::remote::RemoteGenerator;
use crate::retriever::{RetrievedChunk, Retriever};
use crate::RagError;

/// How the answer is produced from the retrieved chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerMode {
    /// RAG-Sequence (Lewis et al.): one document explains the whole answer.
    Sequence(SequenceDecoding),
    /// RAG-Token: each token may come from a different document.
    Token,
    /// Retrieve-then-read: all chunks in one prompt (`--marginalize none`).
    RetrieveThenRead,
    /// No retrieval at all.
    ClosedBook,
}

impl AnswerMode {
    /// The name used on the command line and in JSON (`sequence`, `token`, `none`,
    /// `closed-book`).
    pub fn name(self) -> &'static str {
        match self {
            AnswerMode::Sequence(_) => "sequence",
            AnswerMode::Token => "token",
            AnswerMode::RetrieveThenRead => "none",
            AnswerMode::ClosedBook => "closed-book",
        }
    }
}

/// Everything [`answer`] needs besides the question.
#[derive(Clone, Debug)]
pub struct AnswerOptions {
    /// Chunks to retrieve (ignored in closed-book mode).
    pub k: usize,
    pub mode: AnswerMode,
    pub decode: DecodeOptions,
    pub template: PromptTemplate,
}

impl Default for AnswerOptions {
    fn default() -> Self {
        AnswerOptions {
            k: 5,
            mode: AnswerMode::Sequence(SequenceDecoding::Thorough),
            decode: DecodeOptions {
                max_new_tokens: 64,
                ..DecodeOptions::default()
            },
            template: PromptTemplate::default(),
        }
    }
}

/// One cited chunk.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Source {
    pub doc_id: String,
    pub chunk_id: String,
    /// p_η(z|x) over the k retrieved chunks.
    pub retrieval_prob: f64,
    /// p(z|x,y): how much this chunk explains the answer (see the module docs). Before the
    /// answer exists (the first streaming event) it equals `retrieval_prob`.
    pub posterior: f64,
    /// Inner product E_Q(x) · E_D(z).
    pub score: f32,
    pub title: Option<String>,
    pub text: String,
    pub source: String,
}

/// The answer to one question.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Answer {
    pub answer: String,
    /// `sequence`, `token`, `none` or `closed-book`.
    pub marginalize: &'static str,
    /// log p(y|x) of the answer (with its stop token when it ended at one) under the mode's
    /// model: RAG-Sequence / RAG-Token marginal, or the single prompt's likelihood.
    pub log_prob: f64,
    /// Retrieved chunks in retrieval order, each with its posterior.
    pub sources: Vec<Source>,
    /// Generated tokens (stop token excluded; for a remote generator, the answer's length in
    /// the local scoring model's tokens, or 0 without one).
    pub tokens: usize,
    /// Why generation ended; `None` for a remote generator (the server does not say).
    pub finish: Option<Finish>,
    /// Prompt tokens the generator read: the sum over the k prompts z∘x for RAG-Sequence and
    /// RAG-Token, the one prompt otherwise (0 for a remote generator).
    pub prompt_tokens: usize,
}

/// What [`answer`] reports while it works (for `--stream`).
pub enum AnswerEvent<'a> {
    /// The retrieved chunks with their retrieval probabilities, before generation starts.
    Sources(&'a [Source]),
    /// Newly generated text.
    Text(&'a str),
}

/// Answers `question`. `retriever` may be `None` only in closed-book mode.
pub fn answer(
    retriever: Option<&Retriever>,
    generator: &LocalGenerator,
    question: &str,
    options: &AnswerOptions,
    on_event: &mut dyn FnMut(AnswerEvent<'_>),
) -> Result<Answer, RagError> {
    answer_with_query(retriever, generator, question, question, options, on_event)
}

/// [`answer`] with retrieval on one text and generation on another: benchmark questions are
/// often a bare description that retrieves well but needs a question around it for the
/// generator.
pub fn answer_with_query(
    retriever: Option<&Retriever>,
    generator: &LocalGenerator,
    retrieval_query: &str,
    question: &str,
    options: &AnswerOptions,
    on_event: &mut dyn FnMut(AnswerEvent<'_>),
) -> Result<Answer, RagError> {
    let retrieved =
        match (options.mode, retriever) {
            (AnswerMode::ClosedBook, _) => Retrieved::default(),
            (_, Some(retriever)) => Retrieved::fetch(retriever, retrieval_query, options.k)?,
            (_, None) => return Err(RagError::InvalidGenerationInput(
                "retrieval-augmented answers need a collection (use closed-book mode without one)"
                    .into(),
            )),
        };
    let Retrieved {
        chunks,
        prior,
        mut sources,
    } = retrieved;
    if !sources.is_empty() {
        on_event(AnswerEvent::Sources(&sources));
    }

    let tokenizer = generator.tokenizer();
    let lm: &dyn CausalLm = generator.model();
    let template = &options.template;
    let passages = passages(&chunks);
    let document_prompts = || -> Result<Vec<Vec<u32>>, RagError> {
        passages
            .iter()
            .map(|p| template.document(tokenizer, *p, question))
            .collect()
    };

    let mut stream = TextStream::default();
    let mut stream_error = None;
    let mut on_token = |id: u32| match stream.push(tokenizer, id) {
        Ok(text) if !text.is_empty() => on_event(AnswerEvent::Text(&text)),
        Ok(_) => {}
        Err(e) => stream_error = Some(e),
    };
    let prompt_tokens;
    let decoded: Decoded = match options.mode {
        AnswerMode::Sequence(_) | AnswerMode::Token => {
            let prompts = document_prompts()?;
            prompt_tokens = prompts.iter().map(Vec::len).sum();
            let marginalize = match options.mode {
                AnswerMode::Sequence(mode) => Marginalize::Sequence(mode),
                _ => Marginalize::Token,
            };
            generate::decode(
                lm,
                &prompts,
                &prior,
                marginalize,
                &options.decode,
                Some(&mut on_token),
            )?
        }
        AnswerMode::RetrieveThenRead => {
            let prompt = template.read(tokenizer, &passages, question)?;
            prompt_tokens = prompt.len();
            let mut decoded =
                generate::generate(lm, &prompt, &options.decode, Some(&mut on_token))?;
            let mut target = decoded.tokens.clone();
            if let Finish::Stop(stop) = decoded.finish {
                target.push(stop);
            }
            decoded.posterior = if target.is_empty() {
                logspace::exp_all(&prior)
            } else {
                generate::score_sequence(lm, &document_prompts()?, &prior, &target)?.posterior
            };
            decoded
        }
        AnswerMode::ClosedBook => {
            let prompt = template.closed_book(tokenizer, question)?;
            prompt_tokens = prompt.len();
            generate::generate(lm, &prompt, &options.decode, Some(&mut on_token))?
        }
    };
    if let Some(e) = stream_error {
        return Err(e.into());
    }
    for (source, posterior) in sources.iter_mut().zip(&decoded.posterior) {
        source.posterior = *posterior;
    }
    Ok(Answer {
        answer: tokenizer.decode(&decoded.tokens)?.trim().to_string(),
        marginalize: options.mode.name(),
        log_prob: decoded.log_prob,
        sources,
        tokens: decoded.tokens.len(),
        finish: Some(decoded.finish),
        prompt_tokens,
    })
}

/// Retrieve-then-read with a remote generator. `scorer`, a local generator, turns the remote
/// answer into citations: p(z|x,y) from scoring it under each chunk's own prompt, and
/// `log_prob` as its RAG-Sequence log-likelihood under the local model. Without one, each
/// source's posterior stays its retrieval probability and `log_prob` is NaN (null in JSON).
pub fn answer_remote(
    retriever: &Retriever,
    remote: &RemoteGenerator,
    scorer: Option<&LocalGenerator>,
    question: &str,
    options: &AnswerOptions,
    on_event: &mut dyn FnMut(AnswerEvent<'_>),
) -> Result<Answer, RagError> {
    let Retrieved {
        chunks,
        prior,
        mut sources,
    } = Retrieved::fetch(retriever, question, options.k)?;
    on_event(AnswerEvent::Sources(&sources));
    let passages = passages(&chunks);
    let template = &options.template;
    let message = template.read_message(scorer.map(|s| s.tokenizer()), &passages, question)?;
    let text = remote.chat(
        &[ChatMessage::new("user", message)],
        options.decode.max_new_tokens,
        &mut |piece| on_event(AnswerEvent::Text(piece)),
    )?;
    let text = text.trim().to_string();
    let (mut log_prob, mut tokens) = (f64::NAN, 0);
    if let Some(scorer) = scorer.filter(|_| !text.is_empty()) {
        let tokenizer = scorer.tokenizer();
        let mut target = tokenizer.encode(&text)?;
        tokens = target.len();
        target.extend(scorer.model().stop_tokens().first());
        let prompts = passages
            .iter()
            .map(|p| template.document(tokenizer, *p, question))
            .collect::<Result<Vec<_>, _>>()?;
        let scored = generate::score_sequence(scorer.model(), &prompts, &prior, &target)?;
        log_prob = scored.log_prob;
        for (source, posterior) in sources.iter_mut().zip(&scored.posterior) {
            source.posterior = *posterior;
        }
    }
    Ok(Answer {
        answer: text,
        marginalize: AnswerMode::RetrieveThenRead.name(),
        log_prob,
        sources,
        tokens,
        finish: None,
        prompt_tokens: 0,
    })
}

/// The top-k chunks of a question, their log prior log p_η(z|x), and the sources as first
/// reported (posterior = retrieval probability until the answer exists).
#[derive(Default)]
struct Retrieved {
    chunks: Vec<RetrievedChunk>,
    prior: Vec<f64>,
    sources: Vec<Source>,
}

impl Retrieved {
    fn fetch(retriever: &Retriever, query: &str, k: usize) -> Result<Self, RagError> {
        let chunks = retriever.retrieve(query, k.max(1))?;
        if chunks.is_empty() {
            return Err(RagError::EmptyCollection);
        }
        // The retriever's p_η, whichever scores it came from (dense, hybrid, re-ranked).
        let prior: Vec<f64> = chunks.iter().map(|c| c.log_prob).collect();
        let sources = chunks
            .iter()
            .zip(&prior)
            .map(|(chunk, &log_p)| source(chunk, log_p.exp()))
            .collect();
        Ok(Retrieved {
            chunks,
            prior,
            sources,
        })
    }
}

fn passages(chunks: &[RetrievedChunk]) -> Vec<Passage<'_>> {
    chunks
        .iter()
        .map(|c| Passage {
            title: c.title.as_deref(),
            text: &c.text,
        })
        .collect()
}

fn source(chunk: &RetrievedChunk, retrieval_prob: f64) -> Source {
    Source {
        doc_id: chunk.doc_id.clone(),
        chunk_id: chunk.chunk_id.clone(),
        retrieval_prob,
        posterior: retrieval_prob,
        score: chunk.score,
        title: chunk.title.clone(),
        text: chunk.text.clone(),
        source: chunk.source.clone(),
    }
}
