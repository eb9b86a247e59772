//! An in-process zrag server on a loopback port, with the real encoder and generator (fetched
//! by scripts/fetch-models.sh as CI does), and a small blocking HTTP client for it.

#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use serde_json::Value;
use zrag_index::collection::Collection;
use zrag_index::store::Store;
use zrag_models::generator::default_generator_path;
use zrag_models::{BertEncoder, LocalGenerator};
use zrag_rag::answer::AnswerOptions;
use zrag_rag::generate::DecodeOptions;
use zrag_rag::RetrievalSettings;
use zrag_server::{AppState, Engine, Limits};
use zrag_text::ChunkerConfig;

fn encoder() -> Arc<BertEncoder> {
    static ENCODER: OnceLock<Arc<BertEncoder>> = OnceLock::new();
    ENCODER
        .get_or_init(|| {
            let dir = zrag_models::default_encoder_dir().expect("run scripts/fetch-models.sh");
            Arc::new(BertEncoder::load(&dir).expect("load the encoder"))
        })
        .clone()
}

fn generator() -> Arc<LocalGenerator> {
    static GENERATOR: OnceLock<Arc<LocalGenerator>> = OnceLock::new();
    GENERATOR
        .get_or_init(|| {
            let path = default_generator_path().expect("run scripts/fetch-models.sh");
            Arc::new(LocalGenerator::load(&path).expect("load the generator"))
        })
        .clone()
}

pub struct TestServer {
    pub base: String,
    pub api_key: Option<String>,
    agent: ureq::Agent,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub struct Options {
    pub limits: Limits,
    pub api_key: Option<String>,
    pub generator: bool,
}

impl Options {
    /// Search, documents and embeddings only (faster to start; ask answers 503).
    pub fn without_generator() -> Options {
        Options {
            generator: false,
            ..Options::default()
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: Limits::default(),
            api_key: None,
            generator: true,
        }
    }
}

impl TestServer {
    /// Serves the collection in `dir` (created if missing) on 127.0.0.1, a free port.
    pub fn start(dir: &Path, options: Options) -> TestServer {
        Self::start_store(
            Store::Embedded(Collection::open_or_create(dir).unwrap()),
            options,
        )
    }

    /// Serves any store on 127.0.0.1, a free port.
    pub fn start_store(store: Store, options: Options) -> TestServer {
        let engine = Engine {
            store,
            query_encoder: encoder(),
            doc_encoder: encoder(),
            generator: options.generator.then(generator),
            retrieval: RetrievalSettings::default(),
            answer: AnswerOptions {
                k: 2,
                decode: DecodeOptions {
                    max_new_tokens: 8,
                    ..DecodeOptions::default()
                },
                ..AnswerOptions::default()
            },
            chunker: ChunkerConfig::default(),
        };
        let state = AppState::new(engine, options.limits, options.api_key.clone()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                zrag_server::serve(listener, state, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        TestServer {
            base,
            api_key: options.api_key,
            agent,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    fn authorised<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.api_key {
            Some(key) => request.header("Authorization", &format!("Bearer {key}")),
            None => request,
        }
    }

    /// POSTs a JSON body; returns the status and the JSON answer.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string())
    }

    pub fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let request = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        let mut response = self.authorised(request).send(body).expect("HTTP POST");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let request = self.agent.get(format!("{}{path}", self.base));
        let mut response = self.authorised(request).call().expect("HTTP GET");
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    }

    pub fn get_json(&self, path: &str) -> (u16, Value) {
        let (status, text) = self.get(path);
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        let request = self.agent.delete(format!("{}{path}", self.base));
        let mut response = self.authorised(request).call().expect("HTTP DELETE");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// POSTs and reads a server-sent-event stream; `on_event` sees each (event, data) as it
    /// arrives.
    pub fn sse(
        &self,
        path: &str,
        body: &Value,
        on_event: &mut dyn FnMut(&str, &str),
    ) -> Vec<(String, String)> {
        let request = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        let mut response = self
            .authorised(request)
            .send(body.to_string())
            .expect("HTTP POST");
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        let reader = BufReader::new(response.body_mut().as_reader());
        let (mut events, mut event, mut data) = (Vec::new(), String::new(), Vec::<String>::new());
        for line in reader.lines() {
            let line = line.unwrap();
            if line.is_empty() {
                if !data.is_empty() {
                    let joined = data.join("\n");
                    let name = if event.is_empty() {
                        "message".to_string()
                    } else {
                        event.clone()
                    };
                    on_event(&name, &joined);
                    events.push((name, joined));
                }
                event.clear();
                data.clear();
            } else if let Some(name) = line.strip_prefix("event:") {
                event = name.trim().to_string();
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push(value.strip_prefix(' ').unwrap_or(value).to_string());
            }
        }
        events
    }

    /// Documents `{id, text}` upserted in one request; returns the change report.
    pub fn upsert(&self, documents: &[(&str, &str)]) -> Value {
        let docs: Vec<Value> = documents
            .iter()
            .map(|(id, text)| serde_json::json!({"id": id, "text": text}))
            .collect();
        let (status, body) = self.post("/v1/documents", &serde_json::json!({ "documents": docs }));
        assert_eq!(status, 200, "{body}");
        body
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        // Not joined: graceful shutdown waits for open connections, and a test may have
        // walked away from a stream. The runtime ends with the test process.
        drop(self.thread.take());
    }
}

pub const BEES: &str = "Honey bees make honey from the nectar of flowers. A colony has one queen \
    and thousands of workers.";
pub const MOON: &str = "The Moon orbits the Earth once every 27.3 days. Its gravity drives the \
    ocean tides.";
pub const RUST: &str = "Rust is a systems programming language with ownership and borrowing \
    instead of a garbage collector.";
