//! What every request shares: the models, the collection, the snapshot being served, the
//! concurrency slots and the metrics.
//!
//! Reads never see a half-applied write: a request takes one snapshot and works on it to the
//! end. Embedded store: the current [`StoreSnapshot`] (an `Arc`), swapped after each commit.
//! PostgreSQL: a new snapshot per request (a read transaction on a pooled connection, on the
//! read replica when there is one), so several servers over one database answer from whatever
//! is committed. Writes are serialised by one mutex per process (the embedded store also holds
//! an OS lock against other processes; PostgreSQL serialises commits itself).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zrag_index::store::{Store, StoreSnapshot};
use zrag_models::{BertEncoder, LocalGenerator};
use zrag_rag::answer::AnswerOptions;
use zrag_rag::{RetrievalSettings, Retriever};
use zrag_text::ChunkerConfig;

use crate::metrics::{CollectionGauges, Metrics};
use crate::{Limits, ServerError};

/// The models and defaults a server answers with (built by the CLI from its flags).
pub struct Engine {
    pub store: Store,
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
    /// Embedded store: the snapshot being served.
    current: RwLock<Option<Arc<StoreSnapshot>>>,
    /// What `/healthz` and `/metrics` report, as of the last refresh (never blocks).
    latest: RwLock<StoreStats>,
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
            latest: RwLock::new(StoreStats::default()),
            writes: tokio::sync::Mutex::new(()),
            started: Instant::now(),
        };
        state.refresh()?;
        Ok(Arc::new(state))
    }

    /// The snapshot a request reads (`None`: nothing committed yet). Blocking for
    /// PostgreSQL (it opens a read transaction): call it from blocking work.
    pub fn snapshot(&self) -> Result<Option<Arc<StoreSnapshot>>, ServerError> {
        match &self.engine.store {
            Store::Embedded(_) => Ok(self.current()),
            Store::Postgres(store) => {
                let snapshot = StoreSnapshot::Postgres(store.snapshot()?);
                self.record(&snapshot);
                Ok(Some(Arc::new(snapshot)))
            }
        }
    }

    fn current(&self) -> Option<Arc<StoreSnapshot>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn record(&self, snapshot: &StoreSnapshot) {
        let mut latest = self.latest.write().unwrap_or_else(|e| e.into_inner());
        if snapshot.generation() >= latest.generation {
            *latest = StoreStats {
                generation: snapshot.generation(),
                documents: snapshot.num_documents(),
                chunks: snapshot.num_live_chunks(),
            };
        }
    }

    /// Picks up the latest committed generation. Embedded: opens it if it is newer than the
    /// one being served (cheap when nothing changed: one manifest read). PostgreSQL: refreshes
    /// the numbers `/healthz` reports (requests open their own snapshots).
    pub fn refresh(&self) -> Result<u64, ServerError> {
        if let Store::Postgres(_) = &self.engine.store {
            return Ok(self.snapshot()?.map_or(0, |s| s.generation()));
        }
        let latest = self.engine.store.generation()?;
        if let Some(current) = self.current() {
            if current.generation() >= latest {
                return Ok(current.generation());
            }
        }
        let snapshot = Arc::new(self.engine.store.snapshot()?);
        let generation = snapshot.generation();
        self.record(&snapshot);
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        // Another refresh may have installed a newer one meanwhile: never go back.
        if current.as_ref().is_none_or(|c| c.generation() < generation) {
            *current = Some(snapshot);
        }
        Ok(generation)
    }

    /// A retriever over a snapshot taken now, with these settings (blocking).
    pub fn retriever(&self, settings: RetrievalSettings) -> Result<Retriever, ServerError> {
        let snapshot = self.snapshot()?.ok_or_else(empty_collection)?;
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
        let latest = *self.latest.read().unwrap_or_else(|e| e.into_inner());
        CollectionGauges {
            generation: latest.generation,
            documents: latest.documents as usize,
            chunks: latest.chunks,
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

/// The collection's size as of the last snapshot this server opened.
#[derive(Clone, Copy, Debug, Default)]
struct StoreStats {
    generation: u64,
    documents: u64,
    chunks: u64,
}

fn empty_collection() -> ServerError {
    ServerError::Conflict(
        "the collection has no documents yet: add some with POST /v1/documents or `zrag index`"
            .into(),
    )
}
