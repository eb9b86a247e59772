//! `zrag train retriever` end to end with the real MiniLM encoder and SmolLM2 generator on
//! the sample corpus: LSR and DPR from question/answer pairs, checkpoints that `zrag search
//! --query-encoder` loads, the generator score cache, Ctrl-C, and the E_D identity check.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{json_ok, samples, zrag};

const QA: [(&str, &str); 4] = [
    ("What do worker bees turn nectar into?", "honey"),
    (
        "Which coffee species has about twice the caffeine of arabica?",
        "robusta",
    ),
    (
        "What gas do plants release during photosynthesis?",
        "oxygen",
    ),
    ("What is Earth's only natural satellite?", "Moon"),
];

fn indexed(dir: &Path) -> std::path::PathBuf {
    let collection = dir.join("c.zrag");
    json_ok(&zrag(&collection, &["index", samples().to_str().unwrap()]));
    let qa: Vec<String> = QA
        .iter()
        .enumerate()
        .map(|(i, (q, a))| {
            serde_json::json!({"_id": format!("q{i}"), "question": q, "answers": [a]}).to_string()
        })
        .collect();
    std::fs::write(dir.join("qa.jsonl"), qa.join("\n")).unwrap();
    collection
}

#[test]
fn lsr_and_dpr_train_and_their_checkpoints_serve_search() {
    let tmp = tempfile::tempdir().unwrap();
    let collection = indexed(tmp.path());
    let qa = tmp.path().join("qa.jsonl");
    let cache = tmp.path().join("lm-cache.jsonl");
    let out = tmp.path().join("lsr");
    let train = |out: &Path, steps: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "retriever",
            "--qa",
            qa.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch-size",
            "2",
            "--steps",
            steps,
            "--lr",
            "1e-4",
        ];
        args.extend_from_slice(extra);
        json_ok(&zrag(&collection, &args))
    };
    let summary = train(
        &out,
        "2",
        &[
            "--method",
            "lsr",
            "--k",
            "3",
            "--lm-cache",
            cache.to_str().unwrap(),
        ],
    );
    assert_eq!(summary["method"], "lsr");
    assert_eq!(summary["steps"], 2);
    assert!(summary["final_loss"].as_f64().unwrap().is_finite());
    // The cache holds a fingerprint line and one log-likelihood per (query, chunk) scored.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&cache)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines[0]["fingerprint"].is_string());
    // The fingerprint line plus 2 questions × 3 chunks.
    assert!(lines.len() > 2 * 3, "{} lines", lines.len());
    assert!(lines[1..].iter().all(|l| l["ll"].as_f64().unwrap() < 0.0));
    // A second run (same seed, so the same first batch, and the same starting E_Q) scores
    // nothing again: every pair it needs is cached.
    let before = lines.len();
    train(
        &tmp.path().join("lsr2"),
        "1",
        &[
            "--method",
            "lsr",
            "--k",
            "3",
            "--lm-cache",
            cache.to_str().unwrap(),
        ],
    );
    let after = std::fs::read_to_string(&cache).unwrap().lines().count();
    assert_eq!(
        after, before,
        "the same first batch must be served from the cache"
    );

    let checkpoint = out.join("checkpoint/query-encoder");
    let hits = json_ok(&zrag(
        &collection,
        &[
            "--query-encoder",
            checkpoint.to_str().unwrap(),
            "search",
            "What do bees make from nectar?",
        ],
    ));
    assert!(hits["hits"][0]["doc_id"]
        .as_str()
        .unwrap()
        .contains("honeybees"));

    let dpr = train(&tmp.path().join("dpr"), "3", &["--method", "dpr"]);
    assert_eq!(dpr["method"], "dpr");
    assert_eq!(dpr["steps"], 3);
    assert!(tmp.path().join("dpr/learning-curve.svg").is_file());
}

#[test]
fn ctrl_c_stops_cleanly_and_keeps_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let collection = indexed(tmp.path());
    let out = tmp.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_zrag"))
        .arg("--collection")
        .arg(&collection)
        .args(["train", "retriever", "--method", "dpr", "--qa"])
        .arg(tmp.path().join("qa.jsonl"))
        .arg("--out")
        .arg(&out)
        .args([
            "--batch-size",
            "2",
            "--steps",
            "100000",
            "--eval-every",
            "0",
            "--save-every",
            "0",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = stderr.lines();
    // Without a terminal the trainer logs every 10 steps.
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step") {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("saving the checkpoint")),
        "{rest:?}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["stopped_early"], true);
    assert!(summary["steps"].as_u64().unwrap() >= 10);
    let hits = json_ok(&zrag(
        &collection,
        &[
            "--query-encoder",
            out.join("checkpoint/query-encoder").to_str().unwrap(),
            "search",
            "coffee caffeine",
        ],
    ));
    assert!(!hits["hits"].as_array().unwrap().is_empty());
}

#[test]
fn training_e_d_requires_the_encoder_that_built_the_collection() {
    let tmp = tempfile::tempdir().unwrap();
    let collection = indexed(tmp.path());
    let other = tmp.path().join("tiny");
    zrag_models::testing::write_tiny_bert(&other, &Default::default()).unwrap();
    let output = zrag(
        &collection,
        &[
            "--doc-encoder",
            other.to_str().unwrap(),
            "train",
            "retriever",
            "--method",
            "dpr",
            "--train-doc-encoder",
            "--qa",
            tmp.path().join("qa.jsonl").to_str().unwrap(),
            "--out",
            tmp.path().join("run").to_str().unwrap(),
        ],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not the encoder that built the collection"),
        "{stderr}"
    );
}

#[test]
fn generator_lora_training_writes_an_adapter_that_ask_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let collection = indexed(tmp.path());
    let out = tmp.path().join("lora");
    let summary = json_ok(&zrag(
        &collection,
        &[
            "train",
            "generator",
            "--qa",
            tmp.path().join("qa.jsonl").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--k",
            "2",
            "--batch-size",
            "2",
            "--steps",
            "3",
            "--lr",
            "1e-3",
            "--max-context-tokens",
            "64",
        ],
    ));
    assert_eq!(summary["steps"], 3);
    let adapter = out.join("adapter.safetensors");
    assert!(adapter.is_file());
    assert!(out.join("learning-curve.svg").is_file());
    let answer = json_ok(&zrag(
        &collection,
        &[
            "ask",
            "--adapter",
            adapter.to_str().unwrap(),
            "--k",
            "2",
            "--max-tokens",
            "8",
            "What do worker bees turn nectar into?",
        ],
    ));
    assert!(answer["answer"].is_string(), "{answer}");
    // A damaged adapter is named in the error.
    std::fs::write(&adapter, b"not an adapter").unwrap();
    let output = zrag(
        &collection,
        &["ask", "--adapter", adapter.to_str().unwrap(), "bees"],
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("adapter.safetensors"));
}
