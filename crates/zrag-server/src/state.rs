//! What every request shares: the models, the collection, the snapshot being served, the
//! concurrency slots and the metrics.
//!
//! Reads never see a half-applied write: a request takes the current [`Snapshot`] (an `Arc`)
//! once and works on it to the end, while writes commit a new generation and then swap the
//! pointer. Writes are serialised by one mutex (the collection also holds an OS lock against
//! other processes).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zrag_index::collection::{Collection, Snapshot};
use zrag_models::{BertEncoder, LocalGenerator};
use zrag_rag::answer::AnswerOptions;
use zrag_rag::{RetrievalSettings, Retriever};
use zrag_text::ChunkerConfig;

use crate::metrics::{CollectionGauges, Metrics};
use crate::{Limits, ServerError};

/// The models and defaults a server answers with (built by the CLI from its flags).
pub struct Engine {
    pub collection: Collection,
    pub query_encoder: Arc<BertEncoder>,
    pub doc_encoder: Arc<BertEncoder>,
    /// `None`: search, documents and embeddings only; ask and chat answer 503.
    pub generator: Option<Arc<LocalGenerator>>,
    /// Defaults of search and ask; a request may change mode, k and filters.
    pub retrieval: RetrievalSettings,
    /// Defaults of ask and chat completions (prompt template, decoding).
    pub answer: AnswerOptions,
    pub chunker: ChunkerConfig,
}

pub struct AppState {
    pub engine: Engine,
    pub limits: Limits,
    pub api_key: Option<String>,
    pub metrics: Metrics,
    current: RwLock<Option<Arc<Snapshot>>>,
    /// Held across a whole write (embed + commit + swap).
    pub writes: tokio::sync::Mutex<()>,
    search_slots: Arc<Semaphore>,
    generation_slots: Arc<Semaphore>,
    pub started: Instant,
}

impl AppState {
    pub fn new(
        engine: Engine,
        limits: Limits,
        api_key: Option<String>,
    ) -> Result<Arc<Self>, ServerError> {
        let state = AppState {
            search_slots: Arc::new(Semaphore::new(limits.max_concurrent_searches.max(1))),
            generation_slots: Arc::new(Semaphore::new(limits.max_concurrent_generations.max(1))),
            engine,
            limits,
            api_key,
            metrics: Metrics::default(),
            current: RwLock::new(None),
            writes: tokio::sync::Mutex::new(()),
            started: Instant::now(),
        };
        state.refresh()?;
        Ok(Arc::new(state))
    }

    /// The snapshot requests read now (`None`: nothing committed yet).
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serves the latest committed generation, opening it if it is newer than the one being
    /// served. Cheap when nothing changed (one manifest read).
    pub fn refresh(&self) -> Result<u64, ServerError> {
        let latest = self.engine.collection.manifest()?.generation;
        if let Some(current) = self.snapshot() {
            if current.generation() >= latest {
                return Ok(current.generation());
            }
        }
        let snapshot = Arc::new(self.engine.collection.snapshot()?);
        let generation = snapshot.generation();
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        // Another refresh may have installed a newer one meanwhile: never go back.
        if current.as_ref().is_none_or(|c| c.generation() < generation) {
            *current = Some(snapshot);
        }
        Ok(generation)
    }

    /// A retriever over the current snapshot with these settings.
    pub fn retriever(&self, settings: RetrievalSettings) -> Result<Retriever, ServerError> {
        let snapshot = self.snapshot().ok_or_else(empty_collection)?;
        if snapshot.embedding().is_none() {
            return Err(empty_collection());
        }
        Ok(Retriever::shared(self.engine.query_encoder.clone(), snapshot)?.with_settings(settings))
    }

    pub fn generator(&self) -> Result<Arc<LocalGenerator>, ServerError> {
        self.engine.generator.clone().ok_or_else(|| {
            ServerError::Unavailable(
                "this server was started without a generator (install one with \
                 scripts/fetch-models.sh or pass --generator)"
                    .into(),
            )
        })
    }

    pub fn search_slot(&self) -> Result<OwnedSemaphorePermit, ServerError> {
        self.slot(
            &self.search_slots,
            "search",
            self.limits.max_concurrent_searches,
        )
    }

    pub fn generation_slot(&self) -> Result<OwnedSemaphorePermit, ServerError> {
        self.slot(
            &self.generation_slots,
            "generation",
            self.limits.max_concurrent_generations,
        )
    }

    fn slot(
        &self,
        slots: &Arc<Semaphore>,
        what: &'static str,
        limit: usize,
    ) -> Result<OwnedSemaphorePermit, ServerError> {
        slots.clone().try_acquire_owned().map_err(|_| {
            self.metrics
                .rejected_busy
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ServerError::Busy {
                what,
                limit: limit.max(1),
            }
        })
    }

    pub fn gauges(&self) -> CollectionGauges {
        let snapshot = self.snapshot();
        CollectionGauges {
            generation: snapshot.as_ref().map_or(0, |s| s.generation()),
            documents: snapshot.as_ref().map_or(0, |s| s.num_documents()),
            chunks: snapshot.as_ref().map_or(0, |s| s.num_live_chunks()),
            searches_in_flight: self.limits.max_concurrent_searches.max(1)
                - self.search_slots.available_permits(),
            generations_in_flight: self.limits.max_concurrent_generations.max(1)
                - self.generation_slots.available_permits(),
        }
    }

    /// Picks up commits made by other processes (`zrag index` between server writes).
    pub async fn watch_collection(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let state = self.clone();
            // Opening a snapshot reads and verifies files: keep it off the async workers.
            let refreshed = tokio::task::spawn_blocking(move || state.refresh()).await;
            if let Ok(Err(e)) = refreshed {
                eprintln!("zrag serve: could not open the latest collection state: {e}");
            }
        }
    }
}

fn empty_collection() -> ServerError {
    ServerError::Conflict(
        "the collection has no documents yet: add some with POST /v1/documents or `zrag index`"
            .into(),
    )
}
