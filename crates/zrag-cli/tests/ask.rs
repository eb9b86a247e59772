//! End-to-end tests of `zrag ask` and `zrag eval qa` with the real encoder and generator
//! (SmolLM2-135M-Instruct GGUF, fetched by scripts/fetch-models.sh as CI does) on the shipped
//! sample corpus. Small k and few tokens keep them quick; what is checked is the contract
//! (SPEC §5 JSON, probabilities, streaming order), not the model's knowledge.

mod common;

use std::path::{Path, PathBuf};

use common::{ok, samples, zrag};
use serde_json::Value;

fn indexed_samples(dir: &Path) -> PathBuf {
    let collection = dir.join("c");
    ok(&zrag(&collection, &["index", samples().to_str().unwrap()]));
    collection
}

fn assert_distribution(values: &[f64], what: &str) {
    let total: f64 = values.iter().sum();
    assert!((total - 1.0).abs() < 1e-6, "{what} sums to {total}");
    assert!(
        values.iter().all(|p| (0.0..=1.0).contains(p)),
        "{what}: {values:?}"
    );
}

#[test]
fn ask_answers_with_sources_in_every_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let collection = indexed_samples(tmp.path());
    let question = "What do honey bees make from nectar?";
    for mode in ["sequence", "token", "none", "closed-book"] {
        let out = ok(&zrag(
            &collection,
            &[
                "ask",
                question,
                "--k",
                "2",
                "--max-tokens",
                "6",
                "--marginalize",
                mode,
            ],
        ));
        let answer: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(answer["marginalize"], mode);
        assert!(!answer["answer"].as_str().unwrap().is_empty(), "{answer}");
        let log_prob = answer["log_prob"].as_f64().unwrap();
        assert!(log_prob.is_finite() && log_prob < 0.0, "{answer}");
        let sources = answer["sources"].as_array().unwrap();
        if mode == "closed-book" {
            assert!(sources.is_empty());
            continue;
        }
        assert_eq!(sources.len(), 2);
        for key in [
            "doc_id",
            "chunk_id",
            "retrieval_prob",
            "posterior",
            "text",
            "source",
        ] {
            assert!(sources[0].get(key).is_some(), "missing {key}: {answer}");
        }
        let field = |key: &str| {
            sources
                .iter()
                .map(|s| s[key].as_f64().unwrap())
                .collect::<Vec<_>>()
        };
        assert_distribution(&field("retrieval_prob"), "retrieval_prob");
        assert_distribution(&field("posterior"), "posterior");
        assert!(
            sources[0]["doc_id"].as_str().unwrap().contains("honeybees"),
            "{answer}"
        );
    }
}

#[test]
fn ask_stream_sends_sources_then_tokens_then_the_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let collection = indexed_samples(tmp.path());
    let out = ok(&zrag(
        &collection,
        &[
            "ask",
            "What is the Moon?",
            "--k",
            "2",
            "--max-tokens",
            "8",
            "--marginalize",
            "token",
            "--stream",
        ],
    ));
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.first().unwrap()["event"], "sources");
    assert_eq!(events.last().unwrap()["event"], "answer");
    let tokens: String = events[1..events.len() - 1]
        .iter()
        .map(|e| {
            assert_eq!(e["event"], "token");
            e["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(events.len() >= 3, "no token events: {out}");
    let last = events.last().unwrap();
    // The streamed pieces are the answer (which is trimmed of surrounding whitespace).
    assert_eq!(tokens.trim(), last["answer"].as_str().unwrap());
    // Sources first carry the retrieval probabilities; the final answer the posterior.
    let first_sources = events[0]["sources"].as_array().unwrap();
    for (early, late) in first_sources
        .iter()
        .zip(last["sources"].as_array().unwrap())
    {
        assert_eq!(early["retrieval_prob"], late["retrieval_prob"]);
        assert_eq!(early["posterior"], early["retrieval_prob"]);
    }
}

#[test]
fn eval_qa_compares_modes_and_writes_a_report() {
    let tmp = tempfile::tempdir().unwrap();
    let collection = indexed_samples(tmp.path());
    let questions = tmp.path().join("qa.jsonl");
    std::fs::write(
        &questions,
        "{\"_id\":\"q1\",\"question\":\"What is Earth's only natural satellite?\",\"answers\":[\"the Moon\",\"Moon\"],\"split\":\"test\"}\n\
         {\"_id\":\"q2\",\"question\":\"What do plants make from light?\",\"answers\":[\"chemical energy\"],\"split\":\"test\"}\n\
         {\"_id\":\"q3\",\"question\":\"unused\",\"answers\":[\"x\"],\"split\":\"train\"}\n",
    )
    .unwrap();
    let report = tmp.path().join("report");
    let out = ok(&zrag(
        &collection,
        &[
            "eval",
            "qa",
            "--questions",
            questions.to_str().unwrap(),
            "--split",
            "test",
            "--marginalize",
            "closed-book,sequence",
            "--k",
            "2",
            "--max-tokens",
            "6",
            "--report",
            report.to_str().unwrap(),
        ],
    ));
    let metrics: Value = serde_json::from_str(&out).unwrap();
    let results = metrics["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (result, system) in results.iter().zip(["closed-book", "sequence"]) {
        assert_eq!(result["system"], system);
        assert_eq!(result["questions"], 2);
        for key in ["em", "f1"] {
            let v = result[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
    }
    for file in [
        "metrics.json",
        "predictions.jsonl",
        "report.md",
        "em_f1.svg",
    ] {
        assert!(report.join(file).is_file(), "missing {file}");
    }
    let predictions = std::fs::read_to_string(report.join("predictions.jsonl")).unwrap();
    assert_eq!(predictions.lines().count(), 4, "2 questions x 2 systems");
}

#[test]
fn ask_without_a_collection_or_with_a_bad_generator_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = zrag(&tmp.path().join("nothing"), &["ask", "anything?"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing"), "{stderr}");

    let collection = indexed_samples(tmp.path());
    let bad = tmp.path().join("bad.gguf");
    std::fs::write(&bad, b"not a gguf file").unwrap();
    let out = zrag(
        &collection,
        &["ask", "anything?", "--generator", bad.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.gguf") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// A one-request HTTP server that answers like an OpenAI-compatible chat endpoint streaming
/// `reply`, and returns the request it received.
fn fake_openai_server(reply: &'static str) -> (String, std::thread::JoinHandle<String>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = stream.read(&mut buf).unwrap();
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if request.len() >= end + 4 + length {
                    break;
                }
            }
        }
        let body = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":{}}}}}]}}\n\ndata: [DONE]\n\n",
            serde_json::to_string(reply).unwrap()
        );
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).unwrap();
        String::from_utf8(request).unwrap()
    });
    (url, handle)
}

#[test]
fn ask_with_a_remote_generator_cites_by_the_local_posterior() {
    let tmp = tempfile::tempdir().unwrap();
    let collection = indexed_samples(tmp.path());
    let (url, server) = fake_openai_server("Honey bees make honey from nectar [1].");
    let out = ok(&zrag(
        &collection,
        &[
            "ask",
            "What do honey bees make from nectar?",
            "--k",
            "3",
            "--marginalize",
            "none",
            "--remote-generator",
            &url,
        ],
    ));
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["answer"], "Honey bees make honey from nectar [1].");
    assert_eq!(answer["marginalize"], "none");
    assert!(
        answer["log_prob"].as_f64().unwrap() < 0.0,
        "scored by the local model: {answer}"
    );
    let sources = answer["sources"].as_array().unwrap();
    let posterior: Vec<f64> = sources
        .iter()
        .map(|s| s["posterior"].as_f64().unwrap())
        .collect();
    assert_distribution(&posterior, "posterior");
    // The answer is about bees: the posterior puts the bee chunk first.
    let best = (0..posterior.len())
        .max_by(|&a, &b| posterior[a].total_cmp(&posterior[b]))
        .unwrap();
    assert!(
        sources[best]["doc_id"]
            .as_str()
            .unwrap()
            .contains("honeybees"),
        "{answer}"
    );
    let request = server.join().unwrap();
    assert!(
        request.contains("[1] ")
            && request.contains("Question: What do honey bees make from nectar?"),
        "{request}"
    );

    let refused = zrag(
        &collection,
        &[
            "ask",
            "q",
            "--marginalize",
            "sequence",
            "--remote-generator",
            &url,
        ],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--marginalize none"));
}
