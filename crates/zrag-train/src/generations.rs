//! Asynchronous re-indexing (SPEC §1): while E_D trains, a background worker re-encodes the
//! corpus with a frozen copy of E_D into a new index *generation*; the trainer keeps
//! retrieving from the last complete generation and picks up a new one with a pointer swap.
//! It never waits for the worker.
//!
//! On disk (`DIR/`): `gen-NNNNNN.f32` (rows × dim little-endian f32, row i = slot i of the
//! training corpus), `gen-NNNNNN.json` (rows, dim, the step whose E_D encoded it, CRC-32 of the
//! vectors) and `CURRENT` (the number of the live generation). A generation's files are
//! written and fsynced under temporary names and renamed; `CURRENT` is replaced the same way,
//! after them. So a re-index that is interrupted (cancelled, crashed, killed) leaves the
//! previous generation current and whole; leftovers are ignored and cleaned on the next open.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use zrag_index::exact;
use zrag_models::BertEncoder;

use crate::error::{Result, TrainError};

/// One complete encoding of the training corpus.
pub struct Generation {
    pub number: u64,
    /// The training step whose E_D produced the vectors (0 = the initial encoder).
    pub step: usize,
    pub dim: usize,
    vectors: Vec<f32>,
}

impl Generation {
    pub fn new(number: u64, step: usize, dim: usize, vectors: Vec<f32>) -> Self {
        Generation {
            number,
            step,
            dim,
            vectors,
        }
    }

    pub fn rows(&self) -> usize {
        self.vectors.len() / self.dim.max(1)
    }

    pub fn vector(&self, slot: usize) -> &[f32] {
        &self.vectors[slot * self.dim..(slot + 1) * self.dim]
    }

    /// Exact top-`k` slots by inner product for each query (row-major `m × dim`).
    pub fn search(&self, queries: &[f32], k: usize) -> Vec<Vec<exact::Hit>> {
        exact::search(&self.vectors, self.dim, queries, k, None)
    }
}

#[derive(Serialize, Deserialize)]
struct GenerationMeta {
    number: u64,
    step: usize,
    rows: usize,
    dim: usize,
    crc32: u32,
}

/// The live generation, shared between the trainer and the re-indexing worker.
pub struct GenerationStore {
    dir: PathBuf,
    current: RwLock<Arc<Generation>>,
}

impl GenerationStore {
    /// A new store at `dir` whose first generation is `initial`.
    pub fn create(dir: &Path, initial: Generation) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        write_generation(dir, &initial)?;
        Ok(GenerationStore {
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(initial)),
        })
    }

    /// Opens the generation `CURRENT` names, verifying its checksum, and removes files of
    /// other (older or unfinished) generations.
    pub fn open(dir: &Path) -> Result<Self> {
        let pointer = dir.join("CURRENT");
        let text = std::fs::read_to_string(&pointer).map_err(|e| TrainError::io(&pointer, e))?;
        let number: u64 = text.trim().parse().map_err(|_| TrainError::Generation {
            path: pointer.clone(),
            message: format!("`{}` is not a generation number", text.trim()),
        })?;
        let generation = read_generation(dir, number)?;
        let keep = [file_name(number, "f32"), file_name(number, "json")];
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("gen-") && !keep.contains(&name) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(GenerationStore {
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(generation)),
        })
    }

    /// The last complete generation. Cheap (an `Arc` clone); never waits for a re-index.
    pub fn current(&self) -> Arc<Generation> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes `generation` durable and current, then drops the previous one's files.
    pub fn publish(&self, generation: Generation) -> Result<()> {
        write_generation(&self.dir, &generation)?;
        let previous = {
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *current, Arc::new(generation))
        };
        for ext in ["f32", "json"] {
            let _ = std::fs::remove_file(self.dir.join(file_name(previous.number, ext)));
        }
        Ok(())
    }
}

fn file_name(number: u64, ext: &str) -> String {
    format!("gen-{number:06}.{ext}")
}

fn write_generation(dir: &Path, generation: &Generation) -> Result<()> {
    let bytes: Vec<u8> = generation
        .vectors
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let meta = GenerationMeta {
        number: generation.number,
        step: generation.step,
        rows: generation.rows(),
        dim: generation.dim,
        crc32: crc32fast::hash(&bytes),
    };
    let meta = serde_json::to_vec_pretty(&meta).unwrap_or_default();
    write_durably(&dir.join(file_name(generation.number, "f32")), &bytes)?;
    write_durably(&dir.join(file_name(generation.number, "json")), &meta)?;
    // The commit point.
    write_durably(
        &dir.join("CURRENT"),
        generation.number.to_string().as_bytes(),
    )
}

fn read_generation(dir: &Path, number: u64) -> Result<Generation> {
    let meta_path = dir.join(file_name(number, "json"));
    let vectors_path = dir.join(file_name(number, "f32"));
    let damaged = |path: &Path, message: String| TrainError::Generation {
        path: path.to_path_buf(),
        message,
    };
    let meta: GenerationMeta = serde_json::from_slice(
        &std::fs::read(&meta_path).map_err(|e| TrainError::io(&meta_path, e))?,
    )
    .map_err(|e| damaged(&meta_path, e.to_string()))?;
    let bytes = std::fs::read(&vectors_path).map_err(|e| TrainError::io(&vectors_path, e))?;
    if bytes.len() != meta.rows * meta.dim * 4 {
        return Err(damaged(
            &vectors_path,
            format!(
                "{} bytes, expected {} × {} f32",
                bytes.len(),
                meta.rows,
                meta.dim
            ),
        ));
    }
    if crc32fast::hash(&bytes) != meta.crc32 {
        return Err(damaged(&vectors_path, "checksum mismatch".into()));
    }
    let vectors = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Generation::new(meta.number, meta.step, meta.dim, vectors))
}

/// write temp + fsync + rename + fsync dir.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let temp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temp).map_err(|e| TrainError::io(&temp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| TrainError::io(&temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| TrainError::io(path, e))?;
    if let Some(parent) = path.parent() {
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// What the worker reports, for the training log.
#[derive(Clone, Debug, Serialize)]
pub struct ReindexEvent {
    pub generation: u64,
    /// The step whose E_D was encoded.
    pub step: usize,
    pub seconds: f64,
    /// `false`: the re-index was cancelled or failed and the previous generation stays.
    pub completed: bool,
    pub message: Option<String>,
}

impl ReindexEvent {
    /// One line for the training log on the terminal.
    pub fn describe(&self) -> String {
        format!(
            "re-index: generation {} (E_D of step {}) {} in {:.1}s{}",
            self.generation,
            self.step,
            if self.completed {
                "published"
            } else {
                "abandoned"
            },
            self.seconds,
            self.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )
    }
}

struct Request {
    step: usize,
    encoder: BertEncoder,
}

#[derive(Default)]
struct Mailbox {
    /// The newest request; an older one not yet started is replaced (only the latest E_D
    /// matters).
    pending: Option<Request>,
    shutdown: bool,
}

/// The background worker that turns E_D snapshots into generations.
pub struct Reindexer {
    mailbox: Arc<(Mutex<Mailbox>, Condvar)>,
    cancel: Arc<AtomicBool>,
    busy: Arc<AtomicBool>,
    events: Arc<Mutex<Vec<ReindexEvent>>>,
    handle: Option<JoinHandle<()>>,
}

impl Reindexer {
    /// Starts the worker over `texts` (slot order) publishing into `store`. `after_batch` is
    /// called with the number of texts encoded so far, in the worker thread (tests use it to
    /// interrupt a re-index half-way).
    pub fn start(
        store: Arc<GenerationStore>,
        texts: Arc<Vec<String>>,
        after_batch: Option<Box<dyn Fn(usize) + Send>>,
    ) -> Self {
        let mailbox = Arc::new((Mutex::new(Mailbox::default()), Condvar::new()));
        let cancel = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicBool::new(false));
        let events = Arc::new(Mutex::new(Vec::new()));
        let worker = Worker {
            mailbox: mailbox.clone(),
            cancel: cancel.clone(),
            busy: busy.clone(),
            events: events.clone(),
            store,
            texts,
            after_batch,
        };
        let handle = std::thread::Builder::new()
            .name("zrag-reindex".into())
            .spawn(move || worker.run())
            .ok();
        Reindexer {
            mailbox,
            cancel,
            busy,
            events,
            handle,
        }
    }

    /// Asks for a re-encoding with `encoder` (a frozen copy of E_D at `step`). Returns at
    /// once; a request still waiting is replaced.
    pub fn request(&self, step: usize, encoder: BertEncoder) {
        let (lock, wake) = &*self.mailbox;
        let mut mailbox = lock.lock().unwrap_or_else(|e| e.into_inner());
        mailbox.pending = Some(Request { step, encoder });
        wake.notify_one();
    }

    /// True while a re-encoding runs or waits.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
            || self
                .mailbox
                .0
                .lock()
                .map(|m| m.pending.is_some())
                .unwrap_or(false)
    }

    /// Events since the last call.
    pub fn drain_events(&self) -> Vec<ReindexEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Stops the re-encoding in progress (its generation is discarded).
    pub fn cancel_current(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Waits for the pending and running re-encodings to finish, then stops the worker.
    pub fn finish(mut self) -> Vec<ReindexEvent> {
        self.stop();
        self.drain_events()
    }

    /// Cancels whatever runs and stops the worker.
    pub fn abort(mut self) -> Vec<ReindexEvent> {
        if let Ok(mut m) = self.mailbox.0.lock() {
            m.pending = None;
        }
        self.cancel.store(true, Ordering::SeqCst);
        self.stop();
        self.drain_events()
    }

    fn stop(&mut self) {
        {
            let (lock, wake) = &*self.mailbox;
            let mut mailbox = lock.lock().unwrap_or_else(|e| e.into_inner());
            mailbox.shutdown = true;
            wake.notify_all();
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Reindexer {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.stop();
    }
}

struct Worker {
    mailbox: Arc<(Mutex<Mailbox>, Condvar)>,
    cancel: Arc<AtomicBool>,
    busy: Arc<AtomicBool>,
    events: Arc<Mutex<Vec<ReindexEvent>>>,
    store: Arc<GenerationStore>,
    texts: Arc<Vec<String>>,
    after_batch: Option<Box<dyn Fn(usize) + Send>>,
}

/// Texts per encoder call in the worker: small enough that a cancel is seen quickly.
const WORKER_BATCH: usize = 256;

impl Worker {
    fn run(self) {
        loop {
            let request = {
                let (lock, wake) = &*self.mailbox;
                let mut mailbox = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(request) = mailbox.pending.take() {
                        self.busy.store(true, Ordering::SeqCst);
                        break Some(request);
                    }
                    if mailbox.shutdown {
                        break None;
                    }
                    mailbox = wake.wait(mailbox).unwrap_or_else(|e| e.into_inner());
                }
            };
            let Some(request) = request else { return };
            self.cancel.store(false, Ordering::SeqCst);
            let started = Instant::now();
            let number = self.store.current().number + 1;
            let result = self.encode(&request);
            let (completed, message) = match result {
                Ok(Some(vectors)) => {
                    let generation =
                        Generation::new(number, request.step, request.encoder.dim(), vectors);
                    match self.store.publish(generation) {
                        Ok(()) => (true, None),
                        Err(err) => (false, Some(err.to_string())),
                    }
                }
                Ok(None) => (false, Some("cancelled".into())),
                Err(err) => (false, Some(err.to_string())),
            };
            self.events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ReindexEvent {
                    generation: number,
                    step: request.step,
                    seconds: started.elapsed().as_secs_f64(),
                    completed,
                    message,
                });
            self.busy.store(false, Ordering::SeqCst);
        }
    }

    /// All texts' vectors, or `None` if cancelled.
    fn encode(&self, request: &Request) -> Result<Option<Vec<f32>>> {
        let dim = request.encoder.dim();
        let mut vectors = Vec::with_capacity(self.texts.len() * dim);
        let mut done = 0;
        for batch in self.texts.chunks(WORKER_BATCH) {
            if self.cancel.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
            for vector in request.encoder.embed(&refs)? {
                vectors.extend(vector);
            }
            done += batch.len();
            if let Some(hook) = &self.after_batch {
                hook(done);
            }
        }
        if self.cancel.load(Ordering::SeqCst) {
            return Ok(None);
        }
        Ok(Some(vectors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;
    use zrag_models::testing::{write_tiny_bert, TinyBertSpec};

    fn tiny_encoder(seed: u64) -> (tempfile::TempDir, BertEncoder) {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinyBertSpec {
            seed,
            ..Default::default()
        };
        write_tiny_bert(dir.path(), &spec).unwrap();
        let encoder = BertEncoder::load(dir.path()).unwrap();
        (dir, encoder)
    }

    fn texts(n: usize) -> Arc<Vec<String>> {
        Arc::new(
            (0..n)
                .map(|i| format!("the cat {i} sat on mat {}", i * 7))
                .collect(),
        )
    }

    fn generation(number: u64, rows: usize, value: f32) -> Generation {
        Generation::new(number, number as usize * 10, 4, vec![value; rows * 4])
    }

    #[test]
    fn published_generations_survive_reopening_and_leftovers_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = GenerationStore::create(dir.path(), generation(0, 3, 0.5)).unwrap();
        store.publish(generation(1, 3, 1.5)).unwrap();
        assert_eq!(store.current().number, 1);
        // An unfinished generation 2, as a crash mid-write would leave it.
        std::fs::write(dir.path().join("gen-000002.f32"), [1u8, 2, 3]).unwrap();
        std::fs::write(dir.path().join("gen-000002.tmp"), [0u8; 9]).unwrap();
        let reopened = GenerationStore::open(dir.path()).unwrap();
        let current = reopened.current();
        assert_eq!((current.number, current.step, current.rows()), (1, 10, 3));
        assert_eq!(current.vector(2), &[1.5; 4]);
        assert!(!dir.path().join("gen-000002.f32").exists());
        assert!(!dir.path().join("gen-000000.f32").exists());

        // A damaged live generation is named, not read.
        let path = dir.path().join("gen-000001.f32");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[5] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let err = GenerationStore::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("gen-000001.f32") && err.contains("checksum"),
            "{err}"
        );
    }

    /// The trainer's view of the index never waits for the worker: while a re-encoding is
    /// held mid-way, `current()` keeps answering with the previous generation; when the worker
    /// finishes, the next `current()` returns the new one.
    #[test]
    fn the_trainer_reads_the_old_generation_while_a_reindex_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (_model, encoder) = tiny_encoder(3);
        let corpus = texts(300);
        let store = Arc::new(
            GenerationStore::create(dir.path(), generation(0, 300, 0.0).with_dim(encoder.dim()))
                .unwrap(),
        );
        let (reached, reached_rx) = mpsc::channel::<usize>();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let hook = move |done: usize| {
            reached.send(done).unwrap();
            // Hold the worker after its first batch until the test lets it go.
            if done == WORKER_BATCH {
                release_rx.lock().unwrap().recv().unwrap();
            }
        };
        let reindexer = Reindexer::start(store.clone(), corpus.clone(), Some(Box::new(hook)));
        reindexer.request(5, encoder);
        assert_eq!(reached_rx.recv().unwrap(), WORKER_BATCH);
        // "Training steps" while the worker is held: each reads generation 0 at once.
        for _ in 0..100 {
            let started = Instant::now();
            assert_eq!(store.current().number, 0);
            assert!(started.elapsed() < Duration::from_millis(50));
        }
        assert!(reindexer.is_busy());
        release.send(()).unwrap();
        let events = reindexer.finish();
        assert_eq!(events.len(), 1);
        assert!(events[0].completed, "{events:?}");
        let current = store.current();
        assert_eq!((current.number, current.step, current.rows()), (1, 5, 300));
        assert!(current.vector(0).iter().any(|&v| v != 0.0));
        assert_eq!(
            GenerationStore::open(dir.path()).unwrap().current().number,
            1
        );
    }

    /// A re-index interrupted half-way publishes nothing: the previous generation stays
    /// current, in memory and on disk.
    #[test]
    fn an_interrupted_reindex_leaves_the_previous_generation() {
        let dir = tempfile::tempdir().unwrap();
        let (_model, encoder) = tiny_encoder(4);
        let dim = encoder.dim();
        let store = Arc::new(
            GenerationStore::create(dir.path(), generation(0, 300, 0.25).with_dim(dim)).unwrap(),
        );
        let (reached, reached_rx) = mpsc::channel::<usize>();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let hook = move |done: usize| {
            reached.send(done).unwrap();
            if done == WORKER_BATCH {
                let _ = release_rx.lock().unwrap().recv();
            }
        };
        let reindexer = Reindexer::start(store.clone(), texts(300), Some(Box::new(hook)));
        reindexer.request(7, encoder);
        assert_eq!(reached_rx.recv().unwrap(), WORKER_BATCH);
        reindexer.cancel_current();
        release.send(()).unwrap();
        let events = reindexer.finish();
        assert_eq!(events.len(), 1);
        assert!(!events[0].completed);
        assert_eq!(events[0].message.as_deref(), Some("cancelled"));
        assert_eq!(store.current().number, 0);
        let reopened = GenerationStore::open(dir.path()).unwrap().current();
        assert_eq!(reopened.number, 0);
        assert_eq!(reopened.vector(299), vec![0.25; dim].as_slice());
    }

    impl Generation {
        fn with_dim(self, dim: usize) -> Self {
            let rows = self.rows();
            let value = self.vectors.first().copied().unwrap_or(0.0);
            Generation::new(self.number, self.step, dim, vec![value; rows * dim])
        }
    }
}
