//! The OpenAI-compatible endpoints over HTTP (the official Python client is exercised by
//! scripts/test-openai-client.py in scripts/test.sh; this file checks the wire format).

mod common;

use common::{Options, TestServer, BEES, MOON, RUST};
use serde_json::{json, Value};

#[test]
fn embeddings_match_the_encoder_in_float_and_base64() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(tmp.path(), Options::without_generator());
    let (status, models) = server.get_json("/v1/models");
    assert_eq!(status, 200);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"zrag-query") && ids.contains(&"zrag-rag-sequence"),
        "{ids:?}"
    );

    let texts = ["What do bees make?", "The Moon orbits the Earth."];
    let (status, floats) = server.post(
        "/v1/embeddings",
        &json!({"model": "zrag-query", "input": texts}),
    );
    assert_eq!(status, 200, "{floats}");
    assert_eq!(floats["object"], "list");
    assert!(floats["usage"]["prompt_tokens"].as_u64().unwrap() > 4);
    let (status, packed) = server.post(
        "/v1/embeddings",
        &json!({"model": "zrag-query", "input": texts, "encoding_format": "base64"}),
    );
    assert_eq!(status, 200, "{packed}");
    let dir = zrag_models::default_encoder_dir().unwrap();
    let encoder = zrag_models::BertEncoder::load(&dir).unwrap();
    let direct = encoder.embed(&texts).unwrap();
    for (i, expected) in direct.iter().enumerate() {
        assert_eq!(floats["data"][i]["index"], i);
        let got: Vec<f32> = floats["data"][i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&got, expected, "float embedding {i}");
        let bytes = decode_base64(packed["data"][i]["embedding"].as_str().unwrap());
        let unpacked: Vec<f32> = bytes
            .chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(&unpacked, expected, "base64 embedding {i}");
    }
    // One string is accepted as well as a list.
    let (status, one) = server.post(
        "/v1/embeddings",
        &json!({"model": "zrag-document", "input": texts[0]}),
    );
    assert_eq!(status, 200);
    assert_eq!(one["data"].as_array().unwrap().len(), 1);

    let (status, body) = server.post(
        "/v1/embeddings",
        &json!({"model": "text-embedding-3-small", "input": "x"}),
    );
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["type"], "not_found_error");
    let (status, _) = server.post(
        "/v1/embeddings",
        &json!({"model": "zrag-query", "input": "x", "dimensions": 3}),
    );
    assert_eq!(status, 400);
    let (status, _) = server.post(
        "/v1/embeddings",
        &json!({"model": "zrag-query", "input": [[1, 2, 3]]}),
    );
    assert_eq!(status, 400);
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for group in text.as_bytes().chunks(4) {
        let data: Vec<u8> = group
            .iter()
            .copied()
            .filter(|&c| c != b'=')
            .map(value)
            .collect();
        let n = data
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, v)| n | (u32::from(*v) << (18 - 6 * i)));
        out.extend(&n.to_be_bytes()[1..data.len()]);
    }
    out
}

#[test]
fn chat_completions_answer_with_sources_plain_and_streamed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(tmp.path(), Options::default());
    server.upsert(&[("bees", BEES), ("moon", MOON), ("rust", RUST)]);
    let messages = json!([
        {"role": "system", "content": "Answer with a short phrase."},
        {"role": "user", "content": "What do honey bees make from nectar?"}
    ]);
    let (status, body) = server.post(
        "/v1/chat/completions",
        &json!({"model": "zrag-rag-sequence", "messages": messages, "max_tokens": 6, "k": 2}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty());
    assert!(["stop", "length"].contains(&body["choices"][0]["finish_reason"].as_str().unwrap()));
    let usage = &body["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 20, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    let sources = body["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 2);
    assert_eq!(sources[0]["doc_id"], "bees");
    let total: f64 = sources
        .iter()
        .map(|s| s["posterior"].as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-6);

    let mut chunks = Vec::new();
    let events = server.sse(
        "/v1/chat/completions",
        &json!({"model": "zrag-rag-token", "messages": messages, "max_tokens": 6, "k": 2,
                "stream": true, "stream_options": {"include_usage": true}}),
        &mut |_, data| chunks.push(data.to_string()),
    );
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let parsed: Vec<Value> = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    assert!(parsed
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(parsed[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(parsed[0]["sources"].as_array().unwrap().len(), 2);
    let usage_chunk = parsed.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    assert!(usage_chunk["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    let last = &parsed[parsed.len() - 2];
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    let posterior: f64 = last["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["posterior"].as_f64().unwrap())
        .sum();
    assert!((posterior - 1.0).abs() < 1e-6);
    let text: String = parsed
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.trim().is_empty());

    // zrag's own OpenAI client (retrieve-then-read with a remote generator) reads this server.
    let remote = zrag_rag::remote::RemoteGenerator::new(
        &format!("{}/v1", server.base),
        "zrag-closed-book",
        None,
        std::time::Duration::from_secs(60),
    )
    .unwrap();
    let mut pieces = String::new();
    let reply = remote
        .chat(
            &[zrag_models::generator::ChatMessage::new(
                "user",
                "Name a colour.",
            )],
            4,
            &mut |p| pieces.push_str(p),
        )
        .unwrap();
    assert!(!reply.is_empty());
    assert_eq!(reply, pieces);

    for (body, status) in [
        (json!({"model": "gpt-4o", "messages": messages}), 404),
        (
            json!({"model": "zrag-rag-sequence", "messages": [{"role": "system", "content": "x"}]}),
            400,
        ),
        (
            json!({"model": "zrag-rag-sequence", "messages": messages, "n": 2}),
            400,
        ),
        (
            json!({"model": "zrag-rag-sequence", "messages": messages, "max_tokens": 100000}),
            400,
        ),
    ] {
        let (got, answer) = server.post("/v1/chat/completions", &body);
        assert_eq!(got, status, "{body}: {answer}");
        assert!(answer["error"]["message"].is_string());
    }
}
