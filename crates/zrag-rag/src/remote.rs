//! A generator behind an OpenAI-compatible HTTP API (llama.cpp's server, vLLM, Ollama), for
//! retrieve-then-read answers.
//!
//! A remote server returns text, not the per-document token log-probabilities that
//! RAG-Sequence and RAG-Token marginalise over, so it can stand behind retrieve-then-read only
//! (SPEC §3). Citations still come from the posterior p(z|x,y) when a local generator is at
//! hand to score the remote answer under each chunk (see `answer::answer_remote`).
//!
//! The client speaks `POST {base}/chat/completions` with `"stream": true` and reads the
//! server-sent events (`data: {...}` lines, `choices[0].delta.content`, `data: [DONE]`), so
//! text reaches the caller as it is generated. Plain HTTP only (no TLS stack is built).

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde_json::{json, Value};
use zrag_models::generator::ChatMessage;

use crate::RagError;

/// An OpenAI-compatible chat-completions endpoint.
pub struct RemoteGenerator {
    base_url: String,
    model: String,
    api_key: Option<String>,
    agent: ureq::Agent,
}

impl RemoteGenerator {
    /// `base_url` is the API root, e.g. `http://127.0.0.1:8080/v1`.
    pub fn new(
        base_url: &str,
        model: &str,
        api_key: Option<String>,
        timeout: Duration,
    ) -> Result<Self, RagError> {
        if !base_url.starts_with("http://") {
            return Err(RagError::Remote {
                url: base_url.to_string(),
                message: "only http:// URLs are supported (no TLS stack is built in)".into(),
            });
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .build()
            .into();
        Ok(RemoteGenerator {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key,
            agent,
        })
    }

    pub fn name(&self) -> String {
        format!("{} at {}", self.model, self.base_url)
    }

    /// Sends one chat turn (greedy: temperature 0) and returns the reply, passing each piece
    /// of text to `on_text` as it arrives.
    pub fn chat(
        &self,
        messages: &[ChatMessage],
        max_tokens: usize,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<String, RagError> {
        let url = format!("{}/chat/completions", self.base_url);
        let error = |message: String| RagError::Remote {
            url: url.clone(),
            message,
        };
        let body = json!({
            "model": self.model,
            "messages": messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": true,
        });
        let mut request = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        let mut response = request
            .send(body.to_string())
            .map_err(|e| error(e.to_string()))?;
        let reader = BufReader::new(response.body_mut().as_reader());
        let mut text = String::new();
        for line in reader.lines() {
            let line = line.map_err(|e| error(format!("reading the response: {e}")))?;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            // A server that ignores "stream" answers with one JSON object.
            let payload = line.strip_prefix("data:").map(str::trim).unwrap_or(line);
            if payload == "[DONE]" {
                break;
            }
            let value: Value = serde_json::from_str(payload)
                .map_err(|e| error(format!("not JSON ({e}): {}", truncate(payload))))?;
            if let Some(message) = value.get("error") {
                return Err(error(format!("server error: {message}")));
            }
            let choice = &value["choices"][0];
            let piece = choice["delta"]["content"]
                .as_str()
                .or_else(|| choice["message"]["content"].as_str())
                .unwrap_or("");
            if !piece.is_empty() {
                on_text(piece);
                text.push_str(piece);
            }
        }
        Ok(text)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Serves one HTTP request with `reply`, handing the request text back through the join
    /// handle.
    fn one_shot_server(reply: String) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = stream.read(&mut buf).unwrap();
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let length: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if request.len() >= head_end + 4 + length {
                        break;
                    }
                }
            }
            stream.write_all(reply.as_bytes()).unwrap();
            String::from_utf8(request).unwrap()
        });
        (url, handle)
    }

    fn http(status: &str, content_type: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn streams_server_sent_events_and_sends_an_openai_request() {
        let events = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n\
                      data: {\"choices\":[{\"delta\":{\"content\":\"Par\"}}]}\n\n\
                      data: {\"choices\":[{\"delta\":{\"content\":\"is [1]\"}}]}\n\n\
                      data: [DONE]\n\n";
        let (url, server) = one_shot_server(http("200 OK", "text/event-stream", events));
        let remote = RemoteGenerator::new(
            &url,
            "test-model",
            Some("secret".into()),
            Duration::from_secs(10),
        )
        .unwrap();
        let mut pieces = Vec::new();
        let text = remote
            .chat(
                &[ChatMessage::new("user", "Capital of France?")],
                16,
                &mut |t| pieces.push(t.to_string()),
            )
            .unwrap();
        assert_eq!(text, "Paris [1]");
        assert_eq!(pieces, ["Par", "is [1]"]);
        let request = server.join().unwrap();
        assert!(
            request.starts_with("POST /v1/chat/completions"),
            "{request}"
        );
        assert!(request.contains("Bearer secret"));
        let body: Value =
            serde_json::from_str(&request[request.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        assert_eq!(body["model"], "test-model");
        assert_eq!(body["messages"][0]["content"], "Capital of France?");
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], 16);
    }

    #[test]
    fn accepts_a_non_streaming_reply_and_reports_server_errors() {
        let body = "{\"choices\":[{\"message\":{\"role\":\"assistant\",\"content\":\"42\"}}]}";
        let (url, server) = one_shot_server(http("200 OK", "application/json", body));
        let remote = RemoteGenerator::new(&url, "m", None, Duration::from_secs(10)).unwrap();
        assert_eq!(
            remote
                .chat(&[ChatMessage::new("user", "?")], 4, &mut |_| {})
                .unwrap(),
            "42"
        );
        server.join().unwrap();

        let (url, server) =
            one_shot_server(http("500 Internal Server Error", "application/json", "{}"));
        let remote = RemoteGenerator::new(&url, "m", None, Duration::from_secs(10)).unwrap();
        let err = remote
            .chat(&[ChatMessage::new("user", "?")], 4, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chat/completions") && err.contains("500"),
            "{err}"
        );
        server.join().unwrap();

        assert!(
            RemoteGenerator::new("https://example.org/v1", "m", None, Duration::from_secs(1))
                .is_err()
        );
    }
}
