//! The DPR training loop end to end on a tiny collection (tiny random BERT, synthetic
//! corpus): E_Q alone learns to find each query's document; with E_D training, generations
//! are re-encoded in the background and the final index is the final E_D's; Ctrl-C keeps a
//! loadable checkpoint.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use zrag_index::collection::Collection;
use zrag_models::testing::{write_tiny_bert, TinyBertSpec};
use zrag_models::BertEncoder;
use zrag_rag::{ingest, IngestOptions};
use zrag_train::corpus::TrainingCorpus;
use zrag_train::data::Example;
use zrag_train::encoder::TrainableEncoder;
use zrag_train::optim::{Decay, OptimizerSettings};
use zrag_train::retriever::{
    DevLog, DprSettings, Method, NegativeSource, RetrieverTraining, StepLog, TrainObserver,
    TrainSettings,
};

const WORDS: [&str; 8] = ["cat", "dog", "sat", "mat", "the", "on", "and", "in"];
const DOCS: usize = 40;

fn doc_text(i: usize) -> String {
    format!(
        "{} {} {} {}",
        WORDS[i % 8],
        i * 37 % 101,
        WORDS[(i / 8) % 8],
        i
    )
}

fn query_text(i: usize) -> String {
    format!("{} of {}", i, WORDS[(i / 8) % 8])
}

struct Setup {
    _dir: tempfile::TempDir,
    model: std::path::PathBuf,
    collection: std::path::PathBuf,
    out: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_tiny_bert(&model, &TinyBertSpec::default()).unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    let lines: Vec<String> = (0..DOCS)
        .map(|i| serde_json::json!({"_id": format!("d{i}"), "text": doc_text(i)}).to_string())
        .collect();
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let collection = dir.path().join("c.zrag");
    let encoder = BertEncoder::load(&model).unwrap();
    ingest(
        &zrag_index::store::Store::Embedded(Collection::open_or_create(&collection).unwrap()),
        &encoder,
        &[corpus],
        &IngestOptions::default(),
        &mut (),
    )
    .unwrap();
    let out = dir.path().join("run");
    Setup {
        _dir: dir,
        model,
        collection,
        out,
    }
}

fn examples() -> Vec<Example> {
    (0..DOCS)
        .map(|i| Example {
            id: format!("q{i}"),
            query: query_text(i),
            positive_docs: vec![format!("d{i}")],
            answers: Vec::new(),
        })
        .collect()
}

#[derive(Default)]
struct Recorder {
    steps: Vec<StepLog>,
    dev: Vec<DevLog>,
    messages: Vec<String>,
}

impl TrainObserver for Recorder {
    fn step(&mut self, log: &StepLog) {
        self.steps.push(log.clone());
    }
    fn dev(&mut self, log: &DevLog) {
        self.dev.push(log.clone());
    }
    fn message(&mut self, text: &str) {
        self.messages.push(text.to_string());
    }
}

fn settings(out: &Path, steps: usize) -> TrainSettings {
    TrainSettings {
        batch_size: 8,
        steps,
        optimizer: OptimizerSettings {
            learning_rate: 3e-3,
            warmup_steps: 5,
            total_steps: steps,
            decay: Decay::Linear,
            ..Default::default()
        },
        temperature: 0.05,
        seed: 1,
        eval_every: 20,
        save_every: 0,
        reindex_every: 5,
        out_dir: out.to_path_buf(),
    }
}

fn dpr() -> Method {
    Method::Dpr(DprSettings {
        negatives: NegativeSource::Bm25,
        hard_negatives: 1,
        mine_depth: 10,
    })
}

fn snapshot(path: &Path) -> TrainingCorpus {
    TrainingCorpus::new(Collection::open(path).unwrap().snapshot().unwrap())
}

#[test]
fn dpr_on_the_query_encoder_learns_and_its_checkpoint_loads() {
    let s = setup();
    let stop = AtomicBool::new(false);
    let mut recorder = Recorder::default();
    let summary = RetrieverTraining {
        corpus: snapshot(&s.collection),
        query: TrainableEncoder::load(&s.model).unwrap(),
        doc: None,
        examples: examples(),
        dev: examples(),
        method: dpr(),
        settings: settings(&s.out, 80),
        stop: &stop,
    }
    .run(&mut recorder)
    .unwrap();
    assert_eq!(summary.steps, 80);
    let first = &recorder.dev[0];
    let last = recorder.dev.last().unwrap();
    assert!(
        last.ndcg_at_10 > first.ndcg_at_10 + 0.2,
        "dev nDCG@10 {} -> {}",
        first.ndcg_at_10,
        last.ndcg_at_10
    );
    let early: f64 = recorder.steps[..10].iter().map(|s| s.loss).sum::<f64>() / 10.0;
    let late: f64 = recorder.steps[70..].iter().map(|s| s.loss).sum::<f64>() / 10.0;
    assert!(late < early * 0.7, "loss {early} -> {late}");
    assert!(recorder
        .steps
        .iter()
        .all(|s| s.generation == 0 && s.used == 8));
    assert!(recorder
        .messages
        .iter()
        .any(|m| m.contains("only E_Q trains")));
    // The best checkpoint is a model directory that reproduces the trained E_Q.
    let loaded = BertEncoder::load(&summary.query_encoder).unwrap();
    assert_eq!(loaded.dim(), 32);
    for file in [
        "train-log.jsonl",
        "learning-curve.svg",
        "dev-curve.svg",
        "summary.json",
    ] {
        assert!(s.out.join(file).is_file(), "{file}");
    }
    assert!(summary.doc_encoder.is_none());
}

#[test]
fn training_the_document_encoder_reindexes_in_the_background() {
    let s = setup();
    let stop = AtomicBool::new(false);
    let mut recorder = Recorder::default();
    let summary = RetrieverTraining {
        corpus: snapshot(&s.collection),
        query: TrainableEncoder::load(&s.model).unwrap(),
        doc: Some(TrainableEncoder::load(&s.model).unwrap()),
        examples: examples(),
        dev: examples(),
        method: dpr(),
        settings: settings(&s.out, 30),
        stop: &stop,
    }
    .run(&mut recorder)
    .unwrap();
    assert_eq!(summary.steps, 30);
    // Requests at steps 5, 10, ..., 30 plus the final one; at least the final one is
    // published, and the last generation is the final E_D's.
    assert!(summary.generations >= 1);
    let log = std::fs::read_to_string(s.out.join("train-log.jsonl")).unwrap();
    let published: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "reindex" && v["reindex"]["completed"] == true)
        .collect();
    assert!(!published.is_empty());
    assert_eq!(published.last().unwrap()["reindex"]["step"], 30);
    let requested = log.matches("\"reindex-requested\"").count();
    assert_eq!(requested, 6);
    // Both encoders were saved and load as models; the final index equals E_D(corpus).
    let doc_dir = summary.doc_encoder.clone().unwrap();
    let doc = BertEncoder::load(&s.out.join("checkpoint/doc-encoder")).unwrap();
    BertEncoder::load(&doc_dir).unwrap();
    let store = zrag_train::generations::GenerationStore::open(&s.out.join("index")).unwrap();
    let generation = store.current();
    assert_eq!(generation.step, 30);
    let corpus = snapshot(&s.collection);
    let text = corpus.embedding_text(3).unwrap();
    let expected = doc.embed(&[text.as_str()]).unwrap().remove(0);
    for (a, b) in generation.vector(3).iter().zip(&expected) {
        assert!((a - b).abs() < 1e-5);
    }
}

#[test]
fn a_stop_request_saves_a_loadable_checkpoint() {
    let s = setup();
    let stop = AtomicBool::new(true);
    let summary = RetrieverTraining {
        corpus: snapshot(&s.collection),
        query: TrainableEncoder::load(&s.model).unwrap(),
        doc: None,
        examples: examples(),
        dev: Vec::new(),
        method: dpr(),
        settings: settings(&s.out, 50),
        stop: &stop,
    }
    .run(&mut Recorder::default())
    .unwrap();
    assert!(summary.stopped_early);
    assert_eq!(summary.steps, 0);
    BertEncoder::load(&s.out.join("checkpoint/query-encoder")).unwrap();
}
