//! The re-rankers of `zrag_rag::rerank`.
//!
//! - On a tiny random llama with a byte-level tokenizer (one token per byte, so truncation is
//!   checkable to the byte): the batched generator scores equal each passage scored alone and
//!   an independent step-by-step decode and a cache-free forward pass; truncation and empty
//!   input.
//! - On the real SmolLM2-135M-Instruct (fetched by scripts/fetch-models.sh, as CI does): the
//!   passage that answers a query is ranked first among eight that do not, some on the
//!   query's own topic (the Moon landing for the Moon's distance, snakes for Python), for
//!   four queries, with the answering passage given last by the first stage.
//! - `rerank_20_passages_timing` (ignored; run with `--ignored --nocapture`) measures the cost
//!   of re-ranking 20 passages of about 100 tokens.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use zrag_models::generator::{
    default_generator_path, ChatMessage, GeneratorTokenizer, GgmlDType, Llama, LocalGenerator,
};
use zrag_models::CausalLm;
use zrag_rag::rerank::{
    dot_scores, rerank_chunks, BiEncoderReranker, GeneratorRerankOptions, GeneratorReranker,
    DEFAULT_RERANK_INSTRUCTION,
};
use zrag_rag::{Rerank, RerankInput, RetrievedChunk};

/// GPT-2's byte → printable-character map of byte-level BPE.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (u32::from('!')..=u32::from('~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).unwrap()
        })
        .collect()
}

/// A Hugging Face tokenizer directory: byte-level BPE without merges (token id = byte value),
/// plus `<|im_start|>` (256) and `<|im_end|>` (257) and a ChatML chat template.
fn tiny_tokenizer(dir: &std::path::Path) -> GeneratorTokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), json!(id)))
        .collect();
    let added = ["<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect::<Vec<_>>();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    });
    let config = json!({
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n",
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    GeneratorTokenizer::from_hf_dir(dir, &[]).unwrap()
}

struct Tiny {
    model: Arc<Llama>,
    tokenizer: Arc<GeneratorTokenizer>,
    _dir: tempfile::TempDir,
}

fn tiny(dtype: GgmlDType, seed: u64) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tiny_tokenizer(dir.path());
    let mut config = zrag_models::testing::tiny_llama_config(258);
    config.max_positions = 1024;
    Tiny {
        model: Arc::new(Llama::random(config, seed, dtype).unwrap()),
        tokenizer: Arc::new(tokenizer),
        _dir: dir,
    }
}

impl Tiny {
    fn reranker(&self, options: GeneratorRerankOptions) -> GeneratorReranker {
        GeneratorReranker::from_parts(self.model.clone(), self.tokenizer.clone())
            .with_options(options)
    }
}

fn inputs<'a>(passages: &[(Option<&'a str>, &'a str)]) -> Vec<RerankInput<'a>> {
    passages
        .iter()
        .map(|&(title, text)| RerankInput {
            title,
            text,
            vector: &[],
        })
        .collect()
}

/// log p(target | prompt) from the model's raw logits over the whole sequence, with no cache
/// and no batching: the reference the re-ranker's batched, cached scoring must match.
fn cache_free_log_likelihood(model: &Llama, prompt: &[u32], target: &[u32]) -> f64 {
    let sequence: Vec<u32> = prompt.iter().chain(target).copied().collect();
    let logits = model.logits_all(&sequence).unwrap();
    target
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let row = &logits[prompt.len() - 1 + i];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_z = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            row[t as usize] as f64 - log_z
        })
        .sum()
}

/// log p(target | prompt) by `start` and one `advance` per token.
fn decoded_log_likelihood(model: &Llama, prompt: &[u32], target: &[u32]) -> f64 {
    let mut state = model.start(&[prompt]).unwrap();
    let mut total = 0.0;
    for &t in target {
        total += f64::from(state.log_probs(0)[t as usize]);
        state.advance(&[t]).unwrap();
    }
    total
}

fn assert_close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
        "{what}: {a} vs {b} (diff {:e})",
        (a - b).abs()
    );
}

const TINY_PASSAGES: [(Option<&str>, &str); 5] = [
    (None, "The cat sat on the mat and watched the rain."),
    (
        Some("Dogs"),
        "A dog is a loyal animal; it guards the house at night.",
    ),
    (
        None,
        "Tea is brewed from the dried leaves of Camellia sinensis.",
    ),
    (Some("Bees"), "Bees make honey from nectar."),
    (None, "Paris is the capital of France, on the Seine."),
];

#[test]
fn batched_scores_equal_single_passages_and_a_step_by_step_decode() {
    let query = "Where did the cat sit?";
    for (dtype, seed) in [(GgmlDType::F32, 3u64), (GgmlDType::Q4_1, 4)] {
        let tiny = tiny(dtype, seed);
        let model = &tiny.model;
        let candidates = inputs(&TINY_PASSAGES);
        // batch_size 2: five passages in three `score` calls, checking the batches are
        // stitched back in order.
        for batch_size in [2, 32] {
            let reranker = tiny.reranker(GeneratorRerankOptions {
                batch_size,
                ..GeneratorRerankOptions::default()
            });
            model.clear_prompt_cache();
            let batched = reranker.scores(query, &[], &candidates).unwrap();
            assert_eq!(batched.len(), candidates.len());
            assert!(batched.iter().all(|s| s.is_finite() && *s < 0.0));
            // The scores must differ enough that a permutation would be caught.
            let mut sorted = batched.clone();
            sorted.sort_by(f64::total_cmp);
            assert!(
                sorted.windows(2).all(|w| w[1] - w[0] > 1e-3),
                "{dtype:?}: scores too close to tell apart: {batched:?}"
            );

            let target = reranker.target(query).unwrap();
            assert_eq!(target.len(), query.len(), "one token per byte");
            for (i, candidate) in candidates.iter().enumerate() {
                // Every reference starts from an empty prompt cache, so nothing computed by
                // the batched call is reused.
                model.clear_prompt_cache();
                let alone = reranker.scores(query, &[], &candidates[i..=i]).unwrap()[0];
                assert_close(alone, batched[i], &format!("{dtype:?} passage {i} alone"));

                let prompt = reranker.prompt(candidate.title, candidate.text).unwrap();
                model.clear_prompt_cache();
                let decoded = decoded_log_likelihood(model, &prompt, &target);
                assert_close(
                    decoded,
                    batched[i],
                    &format!("{dtype:?} passage {i} decoded"),
                );
                let reference = cache_free_log_likelihood(model, &prompt, &target);
                assert_close(
                    reference,
                    batched[i],
                    &format!("{dtype:?} passage {i} cache-free"),
                );
            }

            // Order in, order out: reversed candidates give reversed scores.
            model.clear_prompt_cache();
            let reversed: Vec<RerankInput<'_>> = candidates.iter().rev().copied().collect();
            let mut back = reranker.scores(query, &[], &reversed).unwrap();
            back.reverse();
            for (i, (a, b)) in back.iter().zip(&batched).enumerate() {
                assert_close(*a, *b, &format!("{dtype:?} reversed, passage {i}"));
            }
        }
    }
}

#[test]
fn the_prompt_is_the_upr_turn_and_passages_are_cut_to_the_token_budget() {
    let tiny = tiny(GgmlDType::F32, 5);
    let tokenizer = &tiny.tokenizer;
    let budget = 12;
    let reranker = tiny.reranker(GeneratorRerankOptions {
        max_passage_tokens: budget,
        ..GeneratorRerankOptions::default()
    });
    let user_turn = |passage: &str| {
        tokenizer
            .chat_prompt(&[ChatMessage::new(
                "user",
                format!("Passage: {passage}\n\n{DEFAULT_RERANK_INSTRUCTION}"),
            )])
            .unwrap()
    };
    // The wording, pinned; a short passage is left alone; the title goes first unless the
    // text already starts with it.
    assert_eq!(
        reranker.prompt(None, "short text").unwrap(),
        user_turn("short text")
    );
    assert_eq!(
        reranker.prompt(Some("Bees"), "make honey").unwrap(),
        user_turn("Bees\nmake honey")
    );
    assert_eq!(
        reranker.prompt(Some("Bees"), "Bees make").unwrap(),
        user_turn("Bees make")
    );
    assert_eq!(
        tokenizer
            .decode_with_special(&user_turn("x"))
            .unwrap(),
        "<|im_start|>user\nPassage: x\n\nPlease write a question based on this passage.<|im_end|>\n<|im_start|>assistant\n"
    );

    // One token per byte: the budget keeps exactly the first 12 bytes of a long passage (the
    // title is not counted).
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    assert_eq!(
        reranker.prompt(None, &long).unwrap(),
        user_turn(&long[..budget])
    );
    assert_eq!(
        reranker.prompt(Some("Fox"), &long).unwrap(),
        user_turn(&format!("Fox\n{}", &long[..budget]))
    );
    // The default budget is 256 tokens.
    let default = tiny.reranker(GeneratorRerankOptions::default());
    assert_eq!(
        default.prompt(None, &long).unwrap(),
        user_turn(&long[..256])
    );
    // A cut through a two-byte character drops the half character instead of showing U+FFFD.
    let accented = "abcdefghijké and more";
    assert_eq!(accented.find('é'), Some(budget - 1));
    assert_eq!(
        reranker.prompt(None, accented).unwrap(),
        user_turn("abcdefghijk")
    );

    // And the score is the truncated passage's.
    let query = "What jumps?";
    let scores = reranker
        .scores(
            query,
            &[],
            &inputs(&[(None, &long), (None, &long[..budget])]),
        )
        .unwrap();
    assert_eq!(scores[0], scores[1]);
}

#[test]
fn empty_candidate_lists_give_empty_scores() {
    let tiny = tiny(GgmlDType::F32, 6);
    let reranker = tiny.reranker(GeneratorRerankOptions::default());
    assert!(reranker.scores("anything", &[], &[]).unwrap().is_empty());
    assert!(BiEncoderReranker
        .scores("anything", &[1.0, 0.0], &[])
        .unwrap()
        .is_empty());
    assert!(rerank_chunks(&reranker, "anything", &[], Vec::new(), None)
        .unwrap()
        .is_empty());
}

#[test]
fn bi_encoder_scores_are_the_dot_products_of_the_vectors() {
    // 384-dimensional pseudo-random vectors, as MiniLM's.
    let mut state = 0x1234_5678_u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let query: Vec<f32> = (0..384).map(|_| next()).collect();
    let rows: Vec<Vec<f32>> = (0..7).map(|_| (0..384).map(|_| next()).collect()).collect();
    let candidates: Vec<RerankInput<'_>> = rows
        .iter()
        .map(|r| RerankInput {
            title: None,
            text: "",
            vector: r,
        })
        .collect();
    let scores = BiEncoderReranker.scores("q", &query, &candidates).unwrap();
    for (row, score) in rows.iter().zip(&scores) {
        let f32_dot: f32 = row.iter().zip(&query).map(|(a, b)| a * b).sum();
        assert!(
            (score - f64::from(f32_dot)).abs() < 1e-5,
            "{score} vs {f32_dot}"
        );
    }
    let row_refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
    assert_eq!(dot_scores(&query, &row_refs).unwrap(), scores);
}

// ---- the real generator ----

fn smollm2() -> Arc<LocalGenerator> {
    Arc::new(
        LocalGenerator::load(&default_generator_path().expect("run scripts/fetch-models.sh first"))
            .unwrap(),
    )
}

const PASSAGES: [(&str, &str); 9] = [
    // Distractors on the queries' own topics, which do not answer them.
    (
        "moon-landing",
        "Apollo 11 landed on the Moon in July 1969, and Neil Armstrong became the first person to walk on its surface.",
    ),
    (
        "snakes",
        "Pythons are large non-venomous snakes of Africa, Asia and Australia that kill their prey by constriction.",
    ),
    (
        "wasps",
        "Wasps are insects related to bees and ants; most species are solitary and many are parasites of other insects.",
    ),
    (
        "moon",
        "The Moon orbits Earth at an average distance of about 384,400 kilometres (238,900 miles), roughly thirty times Earth's diameter. Light reflected from the Moon takes about 1.3 seconds to reach Earth.",
    ),
    (
        "bees",
        "Honey bees collect nectar from flowers and turn it into honey, which they store in wax combs inside the hive to feed the colony through the winter.",
    ),
    (
        "python",
        "Python is a high-level programming language created by Guido van Rossum and first released in 1991. Its design emphasises code readability.",
    ),
    (
        "everest",
        "Mount Everest, on the border between Nepal and China, is Earth's highest mountain above sea level, at 8,849 metres.",
    ),
    (
        "revolution",
        "The French Revolution began in 1789 with the storming of the Bastille and ended the absolute monarchy in France.",
    ),
    (
        "photosynthesis",
        "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose, releasing oxygen.",
    ),
];

fn chunk(id: &str, text: &str, rank: usize) -> RetrievedChunk {
    RetrievedChunk {
        rank,
        doc_id: id.to_string(),
        chunk_id: id.to_string(),
        score: 1.0 / rank as f32,
        prob: 0.0,
        log_prob: 0.0,
        title: None,
        text: text.to_string(),
        source: String::new(),
    }
}

#[test]
fn smollm2_ranks_the_answering_passage_first() {
    let generator = smollm2();
    let reranker = GeneratorReranker::new(generator.clone());
    let cases = [
        ("How far is the Moon from Earth?", "moon"),
        ("What do honey bees make from nectar?", "bees"),
        ("Who created the Python programming language?", "python"),
        ("What is the highest mountain in the world?", "everest"),
    ];
    for (query, expected) in cases {
        // The answering passage comes *last* from the first stage, so that only the
        // re-ranker can put it first.
        let mut order: Vec<&(&str, &str)> = PASSAGES.iter().filter(|p| p.0 != expected).collect();
        order.push(PASSAGES.iter().find(|p| p.0 == expected).unwrap());
        let hits: Vec<RetrievedChunk> = order
            .iter()
            .enumerate()
            .map(|(i, (id, text))| chunk(id, text, i + 1))
            .collect();
        let reranked = rerank_chunks(&reranker, query, &[], hits, None).unwrap();
        let report: Vec<String> = reranked
            .iter()
            .map(|c| format!("{} {:.2} (p {:.3})", c.chunk_id, c.score, c.prob))
            .collect();
        eprintln!("{query}: {}", report.join(", "));
        assert_eq!(reranked[0].chunk_id, expected, "{query}: {report:?}");
        assert_eq!(
            reranked.iter().map(|c| c.rank).collect::<Vec<_>>(),
            (1..=PASSAGES.len()).collect::<Vec<_>>()
        );
        let total: f64 = reranked.iter().map(|c| c.prob).sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "{query}: probabilities sum to {total}"
        );
        assert!(reranked.windows(2).all(|w| w[0].score >= w[1].score));
    }
}

#[test]
#[ignore = "timing; run with --ignored --nocapture"]
fn rerank_20_passages_timing() {
    let generator = smollm2();
    let tokenizer = generator.tokenizer();
    let reranker = GeneratorReranker::new(generator.clone());
    // 20 distinct passages of about 100 tokens: four consecutive sentences of the pool each,
    // starting at a different sentence.
    let sentences: Vec<&str> = PASSAGES.iter().map(|p| p.1).collect();
    let texts: Vec<String> = (0..20)
        .map(|i| {
            (0..4)
                .map(|j| sentences[(i + j * 5) % sentences.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .map(|t| {
            // Cut to 100 tokens, so that the passages are the size the measurement is about.
            let ids = tokenizer.encode(&t).unwrap();
            tokenizer.decode(&ids[..ids.len().min(100)]).unwrap()
        })
        .collect();
    let tokens: Vec<usize> = texts
        .iter()
        .map(|t| tokenizer.encode(t).unwrap().len())
        .collect();
    let candidates: Vec<RerankInput<'_>> = texts
        .iter()
        .map(|t| RerankInput {
            title: None,
            text: t,
            vector: &[],
        })
        .collect();
    let prompt_tokens: usize = texts
        .iter()
        .map(|t| reranker.prompt(None, t).unwrap().len())
        .sum();
    let query = "How far is the Moon from Earth?";
    let mut cold = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..3 {
        generator.model().clear_prompt_cache();
        let (start, cpu_start) = (Instant::now(), process_cpu_seconds());
        let scores = reranker.scores(query, &[], &candidates).unwrap();
        cold.push(start.elapsed().as_secs_f64());
        cpu.push(process_cpu_seconds() - cpu_start);
        assert_eq!(scores.len(), 20);
    }
    cpu.sort_by(f64::total_cmp);
    let start = Instant::now();
    reranker.scores(query, &[], &candidates).unwrap();
    let warm = start.elapsed().as_secs_f64();
    cold.sort_by(f64::total_cmp);
    eprintln!(
        "20 passages of {}-{} tokens ({} prompt tokens in all), threads {}: cold {:.3} s (median of 3, min {:.3}; process CPU {:.3} s), prompts cached {:.3} s",
        tokens.iter().min().unwrap(),
        tokens.iter().max().unwrap(),
        prompt_tokens,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into()),
        cold[1],
        cold[0],
        cpu[1],
        warm
    );
}

/// User + system CPU time of this process (Linux), so that a timing taken on a busy machine
/// still says what the work costs.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
