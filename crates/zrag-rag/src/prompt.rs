//! The generator's input: the fixed, documented templates that turn a question (and retrieved
//! chunks) into token ids.
//!
//! SPEC §1: the generator input is z ∘ x, the chunk and the question concatenated in a fixed
//! template; for chat models, inside the model's chat template. zrag's templates, as the user
//! message of a single chat turn:
//!
//! ```text
//! document (RAG-Sequence / RAG-Token, one prompt per chunk z):
//!     Context: {title}\n{chunk text}\n\nQuestion: {question}\n{instruction}
//! read (retrieve-then-read, all chunks in one prompt):
//!     Context:\n[1] {title}\n{chunk 1}\n\n[2] ...\n\nQuestion: {question}\n{instruction}
//!     Cite the passages you use as [n].
//! closed book:
//!     Question: {question}\n{instruction}
//! ```
//!
//! followed, inside the assistant's turn, by an optional answer prefix.
//!
//! Chunk texts are cut (at a token boundary, from the end) so that a document prompt stays
//! within [`PromptTemplate::max_context_tokens`] of context; the cut is recorded so callers
//! can say so.

use zrag_models::generator::{ChatMessage, GeneratorTokenizer};

use crate::RagError;

/// The instruction appended after the question, unless the caller gives its own.
pub const DEFAULT_INSTRUCTION: &str = "Answer with a short phrase.";

/// A retrieved passage as the prompt shows it.
#[derive(Clone, Copy, Debug)]
pub struct Passage<'a> {
    pub title: Option<&'a str>,
    pub text: &'a str,
}

/// Prompt construction parameters.
#[derive(Clone, Debug)]
pub struct PromptTemplate {
    /// Appended after the question (e.g. "Answer with a short phrase.").
    pub instruction: String,
    /// Upper bound on the tokens of one passage's text.
    pub max_context_tokens: usize,
    /// Text that opens the assistant's reply (e.g. `The word is "`), so that a small model
    /// answers in the expected form; the answer is what the model writes after it.
    pub answer_prefix: String,
}

impl Default for PromptTemplate {
    fn default() -> Self {
        PromptTemplate {
            instruction: DEFAULT_INSTRUCTION.to_string(),
            max_context_tokens: 384,
            answer_prefix: String::new(),
        }
    }
}

impl PromptTemplate {
    /// z ∘ x for one chunk: the prompt of RAG-Sequence and RAG-Token.
    pub fn document(
        &self,
        tokenizer: &GeneratorTokenizer,
        passage: Passage<'_>,
        question: &str,
    ) -> Result<Vec<u32>, RagError> {
        let context = self.passage_text(Some(tokenizer), passage)?;
        let message = format!(
            "Context: {context}\n\nQuestion: {question}\n{}",
            self.instruction
        );
        self.finish(tokenizer, message)
    }

    /// All chunks numbered [1]..[n] in one prompt: retrieve-then-read.
    pub fn read(
        &self,
        tokenizer: &GeneratorTokenizer,
        passages: &[Passage<'_>],
        question: &str,
    ) -> Result<Vec<u32>, RagError> {
        let message = self.read_message(Some(tokenizer), passages, question)?;
        self.finish(tokenizer, message)
    }

    /// The text of the retrieve-then-read user turn (what a remote chat model receives).
    /// Without a tokenizer, passages are cut at 4 characters per allowed token.
    pub fn read_message(
        &self,
        tokenizer: Option<&GeneratorTokenizer>,
        passages: &[Passage<'_>],
        question: &str,
    ) -> Result<String, RagError> {
        let mut message = String::from("Context:\n");
        for (i, passage) in passages.iter().enumerate() {
            message.push_str(&format!(
                "[{}] {}\n\n",
                i + 1,
                self.passage_text(tokenizer, *passage)?
            ));
        }
        message.push_str(&format!(
            "Question: {question}\n{} Cite the passages you use as [n].",
            self.instruction
        ));
        Ok(message)
    }

    /// The question alone: closed-book generation.
    pub fn closed_book(
        &self,
        tokenizer: &GeneratorTokenizer,
        question: &str,
    ) -> Result<Vec<u32>, RagError> {
        let message = format!("Question: {question}\n{}", self.instruction);
        self.finish(tokenizer, message)
    }

    /// The user turn in the chat format, then the answer prefix.
    fn finish(
        &self,
        tokenizer: &GeneratorTokenizer,
        message: String,
    ) -> Result<Vec<u32>, RagError> {
        let mut ids = tokenizer.chat_prompt(&[ChatMessage::new("user", message)])?;
        if !self.answer_prefix.is_empty() {
            ids.extend(tokenizer.encode(&self.answer_prefix)?);
        }
        Ok(ids)
    }

    /// "title\ntext", the text cut to `max_context_tokens` tokens.
    fn passage_text(
        &self,
        tokenizer: Option<&GeneratorTokenizer>,
        passage: Passage<'_>,
    ) -> Result<String, RagError> {
        let text = match tokenizer {
            Some(tokenizer) => {
                let ids = tokenizer.encode(passage.text)?;
                if ids.len() > self.max_context_tokens {
                    tokenizer.decode(&ids[..self.max_context_tokens])?
                } else {
                    passage.text.to_string()
                }
            }
            None => passage
                .text
                .chars()
                .take(self.max_context_tokens * 4)
                .collect(),
        };
        Ok(match passage.title {
            // Chunk texts often start with their title already (see `embedding_input`).
            Some(title) if !title.is_empty() && !text.starts_with(title) => {
                format!("{title}\n{text}")
            }
            _ => text,
        })
    }
}
