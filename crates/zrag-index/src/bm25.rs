//! BM25 over chunks: a tantivy index, one tantivy document per chunk, keyed by
//! `segment:row`, kept in step with the collection through [`Bm25Index::apply`], searched
//! through [`Bm25Reader`] (which never takes tantivy's writer lock).
//!
//! The index is derived data. Each tantivy commit carries the collection generation it
//! reflects as its payload, so a crash between the collection commit and the tantivy commit
//! shows up as [`Bm25Index::generation`] lagging, and the owner rebuilds. tantivy only
//! publishes a commit by atomically replacing `meta.json`, so a half-written commit leaves the
//! previous one readable; its writer lock `.tantivy-writer.lock` is an `flock`, released by
//! the kernel when a killed process dies, so a leftover lock file never blocks the next writer.
//!
//! Scoring is tantivy's BM25: k1 = 1.2, b = 0.75 (fixed in tantivy), idf = ln(1 + (N - n +
//! 0.5) / (n + 0.5)), document lengths quantised to one byte (exact below 40 tokens, within
//! about 6% above). BEIR's Anserini baseline uses k1 = 0.9, b = 0.4 and Porter stemming; ours
//! uses Lucene's English stop words and the Snowball English ("Porter2") stemmer. As in
//! Lucene, deleted chunks still count in N, n and the average length until tantivy merges
//! their segment away.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use tantivy::collector::TopDocs;
use tantivy::directory::MmapDirectory;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, STORED, STRING,
};
use tantivy::tokenizer::{
    Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer, StopWordFilter, TextAnalyzer,
};
use tantivy::{
    Index, IndexReader, IndexWriter, ReloadPolicy, Searcher, TantivyDocument, TantivyError, Term,
};

use crate::error::{IndexError, Result};

/// Total indexing memory of the writer. tantivy flushes a segment whenever a thread's share
/// fills, so this bounds memory, not index size; 64 MB keeps `zrag index` modest next to the
/// encoder while giving segments of tens of thousands of chunks.
const WRITER_MEMORY_BYTES: usize = 64 << 20;
/// Indexing threads. Tokenising is cheap next to embedding the same chunks, and each thread
/// writes its own segment per commit, so more threads mostly mean more merging.
const MAX_WRITER_THREADS: usize = 2;
/// How many times a reader retries to catch the segments and the payload of one commit while
/// a writer in another process keeps committing.
const CONSISTENT_VIEW_ATTEMPTS: usize = 16;

const FIELD_KEY: &str = "key";
const FIELD_SEGMENT: &str = "segment";
const FIELD_TEXT: &str = "text";

/// A chunk's address in the collection: its segment and its row there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey {
    /// Segment id, e.g. `seg-00000003`.
    pub segment: String,
    pub row: u32,
}

impl fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segment, self.row)
    }
}

impl ChunkKey {
    fn parse(stored: &str) -> Option<ChunkKey> {
        // Split at the last colon: the row never contains one, a segment id might.
        let (segment, row) = stored.rsplit_once(':')?;
        Some(ChunkKey {
            segment: segment.to_string(),
            row: row.parse().ok()?,
        })
    }
}

/// One chunk to index: its key, and the text BM25 sees (title, if any, then the chunk text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bm25Doc {
    pub key: ChunkKey,
    pub title: Option<String>,
    pub text: String,
}

/// How text becomes terms. Stored in the index (as the tokenizer name of its text field), so a
/// reader always analyses queries as the documents were analysed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Analyzer {
    /// Split on non-alphanumerics, drop tokens over 40 bytes, lowercase, drop Lucene's 33
    /// English stop words, Snowball English stemming: Lucene's `EnglishAnalyzer` up to the
    /// stemmer, the usual BM25 baseline.
    #[default]
    English,
    /// [`Analyzer::English`] without stemming.
    EnglishNoStem,
}

impl Analyzer {
    const ALL: [Analyzer; 2] = [Analyzer::English, Analyzer::EnglishNoStem];

    /// The name registered with tantivy. The version suffix changes whenever the tokens an
    /// analyzer produces change, so an index built by an older zrag is rebuilt, not mixed.
    fn tokenizer_name(self) -> &'static str {
        match self {
            Analyzer::English => "zrag_en_stem_v1",
            Analyzer::EnglishNoStem => "zrag_en_v1",
        }
    }

    fn from_tokenizer_name(name: &str) -> Option<Analyzer> {
        Analyzer::ALL
            .into_iter()
            .find(|a| a.tokenizer_name() == name)
    }

    fn build(self) -> TextAnalyzer {
        let base = TextAnalyzer::builder(SimpleTokenizer::default())
            .filter(RemoveLongFilter::limit(40))
            .filter(LowerCaser)
            .filter(
                StopWordFilter::new(Language::English)
                    .expect("tantivy's stopwords feature provides English"),
            );
        match self {
            Analyzer::English => base.filter(Stemmer::new(Language::English)).build(),
            Analyzer::EnglishNoStem => base.build(),
        }
    }

    /// The terms `text` is indexed (or a query is searched) under, in order, repeats kept.
    pub fn tokens(self, text: &str) -> Vec<String> {
        tokens(&mut self.build(), text)
    }
}

fn tokens(analyzer: &mut TextAnalyzer, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    analyzer
        .token_stream(text)
        .process(&mut |token| out.push(token.text.clone()));
    out
}

fn schema(analyzer: Analyzer) -> Schema {
    let mut builder = Schema::builder();
    // `key` is what deletes single chunks and what a hit is read back from; `segment` deletes
    // a whole segment with one term. Neither is tokenized.
    builder.add_text_field(FIELD_KEY, STRING | STORED);
    builder.add_text_field(FIELD_SEGMENT, STRING);
    // Frequencies but no positions: BM25 needs tf, and there are no phrase queries. The text
    // is not stored, the collection's chunks.jsonl already holds it.
    let indexing = TextFieldIndexing::default()
        .set_tokenizer(analyzer.tokenizer_name())
        .set_index_option(IndexRecordOption::WithFreqs);
    builder.add_text_field(
        FIELD_TEXT,
        TextOptions::default().set_indexing_options(indexing),
    );
    builder.build()
}

#[derive(Clone, Copy)]
struct Fields {
    key: Field,
    segment: Field,
    text: Field,
}

impl Fields {
    fn of(schema: &Schema) -> Fields {
        let field = |name| schema.get_field(name).expect("checked by `check_schema`");
        Fields {
            key: field(FIELD_KEY),
            segment: field(FIELD_SEGMENT),
            text: field(FIELD_TEXT),
        }
    }
}

impl Fields {
    /// `doc` as tantivy indexes it; `body` is a reusable buffer.
    fn document(&self, doc: &Bm25Doc, body: &mut String) -> TantivyDocument {
        body.clear();
        if let Some(title) = doc.title.as_deref().filter(|t| !t.is_empty()) {
            body.push_str(title);
            body.push('\n');
        }
        body.push_str(&doc.text);
        let mut out = TantivyDocument::default();
        out.add_text(self.key, doc.key.to_string());
        out.add_text(self.segment, &doc.key.segment);
        out.add_text(self.text, body.as_str());
        out
    }
}

/// The analyzer an existing index was built with, if its schema is exactly one that this zrag
/// writes.
fn check_schema(dir: &Path, index: &Index) -> std::result::Result<Analyzer, String> {
    let found = index.schema();
    let Ok(text) = found.get_field(FIELD_TEXT) else {
        return Err(format!("{}: no `{FIELD_TEXT}` field", dir.display()));
    };
    let tokenizer = match found.get_field_entry(text).field_type() {
        tantivy::schema::FieldType::Str(options) => options
            .get_indexing_options()
            .map(|i| i.tokenizer().to_string()),
        _ => None,
    }
    .unwrap_or_default();
    match Analyzer::from_tokenizer_name(&tokenizer) {
        Some(analyzer) if schema(analyzer) == found => Ok(analyzer),
        _ => Err(format!(
            "schema (text analyzer `{tokenizer}`) is not one this zrag writes"
        )),
    }
}

fn bm25_error(dir: &Path, err: impl fmt::Display) -> IndexError {
    IndexError::Bm25 {
        path: dir.to_path_buf(),
        message: err.to_string(),
    }
}

fn tantivy_error(dir: &Path, err: TantivyError) -> IndexError {
    match err {
        TantivyError::LockFailure(..) => IndexError::Locked {
            path: dir.to_path_buf(),
        },
        other => bm25_error(dir, other),
    }
}

/// The commit payload: the collection generation, as JSON so that more can be added later.
fn payload(generation: u64) -> String {
    serde_json::json!({ "generation": generation }).to_string()
}

fn generation_of_payload(payload: Option<&str>) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(payload?).ok()?;
    value.get("generation")?.as_u64()
}

fn open_existing(dir: &Path) -> Result<Option<Index>> {
    let directory = MmapDirectory::open(dir).map_err(|e| bm25_error(dir, e))?;
    if !Index::exists(&directory).map_err(|e| bm25_error(dir, e))? {
        return Ok(None);
    }
    Index::open(directory)
        .map(Some)
        .map_err(|e| tantivy_error(dir, e))
}

fn register(index: &Index, analyzer: Analyzer) {
    index
        .tokenizers()
        .register(analyzer.tokenizer_name(), analyzer.build());
}

/// A point-in-time view of a BM25 index for searching: it sees one tantivy commit, and
/// [`Bm25Reader::generation`] is the collection generation of exactly that commit.
///
/// It takes no writer lock, so any number of readers, in any process, may search while one
/// writer indexes; files a newer commit drops stay readable through the reader's mappings.
/// Cloning is cheap and shares the view.
#[derive(Clone)]
pub struct Bm25Reader {
    dir: PathBuf,
    index: Index,
    reader: IndexReader,
    searcher: Searcher,
    generation: Option<u64>,
    analyzer: TextAnalyzer,
    fields: Fields,
}

impl Bm25Reader {
    /// Opens the latest commit of the index in `dir`.
    pub fn open(dir: &Path) -> Result<Bm25Reader> {
        let index = open_existing(dir)?
            .ok_or_else(|| bm25_error(dir, "no BM25 index here (no meta.json)"))?;
        let analyzer = check_schema(dir, &index).map_err(|reason| {
            bm25_error(
                dir,
                format!("{reason}; rebuild it with this zrag (`zrag index`)"),
            )
        })?;
        Bm25Reader::new(dir, index, analyzer)
    }

    fn new(dir: &Path, index: Index, analyzer: Analyzer) -> Result<Bm25Reader> {
        register(&index, analyzer);
        // Manual: no watcher thread, and a search sees exactly the commit of this view.
        let reader: IndexReader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(|e| tantivy_error(dir, e))?;
        let fields = Fields::of(&index.schema());
        let mut view = Bm25Reader {
            dir: dir.to_path_buf(),
            searcher: reader.searcher(),
            index,
            reader,
            generation: None,
            analyzer: analyzer.build(),
            fields,
        };
        view.refresh()?;
        Ok(view)
    }

    /// Moves this view to the latest commit.
    ///
    /// tantivy does not tell which commit a searcher was opened from, and the payload lives in
    /// `meta.json`, which a writer in another process may replace at any moment. So read the
    /// metadata, open a searcher, and accept the pair only when the searcher holds exactly the
    /// segments (and deletions) that metadata names; otherwise a commit slipped in between,
    /// and we try again.
    pub fn refresh(&mut self) -> Result<()> {
        let dir = &self.dir;
        let mut last_error = None;
        for _ in 0..CONSISTENT_VIEW_ATTEMPTS {
            let metas = self.index.load_metas().map_err(|e| tantivy_error(dir, e))?;
            // A file that a concurrent commit garbage-collected between the two reads fails
            // the reload; the next attempt sees the newer metadata.
            if let Err(e) = self.reader.reload() {
                last_error = Some(e);
                continue;
            }
            let searcher = self.reader.searcher();
            let in_meta: HashSet<_> = metas
                .segments
                .iter()
                .map(|s| (s.id(), s.num_deleted_docs()))
                .collect();
            let in_searcher: HashSet<_> = searcher
                .segment_readers()
                .iter()
                .map(|s| (s.segment_id(), s.num_deleted_docs()))
                .collect();
            if in_meta == in_searcher {
                self.generation = generation_of_payload(metas.payload.as_deref());
                self.searcher = searcher;
                return Ok(());
            }
        }
        Err(match last_error {
            Some(e) => tantivy_error(dir, e),
            None => bm25_error(dir, "the index kept changing while being opened; try again"),
        })
    }

    /// The collection generation this view reflects (`None`: never committed by zrag).
    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// Live (not deleted) chunks in this view.
    pub fn num_docs(&self) -> u64 {
        self.searcher.num_docs()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The top `k` chunks for `query` by BM25, best first.
    ///
    /// The query is plain text, never tantivy's query language: it goes through the index's
    /// analyzer and every term becomes an optional clause, so `title:x`, `a AND (b` or a lone
    /// `"` are just words. A term repeated in the query counts once per occurrence (Lucene's
    /// and Anserini's bag of words). A query without terms (empty, only stop words or
    /// punctuation) finds nothing.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<(ChunkKey, f32)>> {
        let terms = tokens(&mut self.analyzer.clone(), query);
        if k == 0 || terms.is_empty() {
            return Ok(Vec::new());
        }
        // Repeats stay separate TermQuery clauses rather than one boosted clause: a union of
        // plain term scorers is what tantivy runs with block-max WAND.
        let clauses: Vec<(Occur, Box<dyn Query>)> = terms
            .iter()
            .map(|t| {
                let term = Term::from_field_text(self.fields.text, t);
                let query: Box<dyn Query> =
                    Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs));
                (Occur::Should, query)
            })
            .collect();
        let query = BooleanQuery::new(clauses);
        let top = self
            .searcher
            .search(&query, &TopDocs::with_limit(k).order_by_score())
            .map_err(|e| tantivy_error(&self.dir, e))?;
        top.into_iter()
            .map(|(score, address)| {
                let doc: TantivyDocument = self
                    .searcher
                    .doc(address)
                    .map_err(|e| tantivy_error(&self.dir, e))?;
                let stored = doc.get_first(self.fields.key).and_then(|v| v.as_str());
                let key = stored.and_then(ChunkKey::parse).ok_or_else(|| {
                    bm25_error(
                        &self.dir,
                        format!("document {address:?} has no valid chunk key ({stored:?})"),
                    )
                })?;
                Ok((key, score))
            })
            .collect()
    }
}

/// The writable BM25 index of a collection: the only [`IndexWriter`] on its directory (tantivy's
/// lock; a second one, in any process, gets [`IndexError::Locked`]), plus a view that follows
/// its commits.
pub struct Bm25Index {
    /// `None` only while dropping (see the `Drop` impl).
    writer: Option<IndexWriter>,
    view: Bm25Reader,
    analyzer: Analyzer,
}

impl Bm25Index {
    /// Opens the index in `dir` for writing, creating it (and `dir`) if needed, with the
    /// default [`Analyzer`].
    pub fn open_or_create(dir: &Path) -> Result<Bm25Index> {
        Bm25Index::open_or_create_with(dir, Analyzer::default())
    }

    /// As [`Bm25Index::open_or_create`], with the given analyzer. An index in `dir` that was
    /// built with another analyzer or schema (another zrag version) is emptied: it is derived
    /// data, and [`Bm25Index::generation`] then reads `None`, which makes the owner rebuild.
    pub fn open_or_create_with(dir: &Path, analyzer: Analyzer) -> Result<Bm25Index> {
        std::fs::create_dir_all(dir).map_err(|e| IndexError::io(dir, e))?;
        let index = match open_existing(dir)? {
            Some(index) if check_schema(dir, &index) == Ok(analyzer) => index,
            Some(index) => {
                Bm25Index::clear(dir, &index)?;
                Index::create_in_dir(dir, schema(analyzer)).map_err(|e| tantivy_error(dir, e))?
            }
            None => {
                Index::create_in_dir(dir, schema(analyzer)).map_err(|e| tantivy_error(dir, e))?
            }
        };
        register(&index, analyzer);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WRITER_THREADS);
        let writer = index
            .writer_with_num_threads(threads, WRITER_MEMORY_BYTES)
            .map_err(|e| tantivy_error(dir, e))?;
        let view = Bm25Reader::new(dir, index, analyzer)?;
        Ok(Bm25Index {
            writer: Some(writer),
            view,
            analyzer,
        })
    }

    /// Removes an incompatible index, `meta.json` first so that a crash half-way leaves
    /// "no index" rather than a broken one. Only the collection writer calls this, and it holds
    /// the collection's writer lock, so no other process writes here meanwhile.
    fn clear(dir: &Path, _index: &Index) -> Result<()> {
        let meta = dir.join("meta.json");
        std::fs::remove_file(&meta).map_err(|e| IndexError::io(&meta, e))?;
        for entry in std::fs::read_dir(dir).map_err(|e| IndexError::io(dir, e))? {
            let path = entry.map_err(|e| IndexError::io(dir, e))?.path();
            // The lock files stay: we hold one, and readers may be waiting on the other.
            let is_lock = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".tantivy-") && n.ends_with(".lock"));
            if path.is_file() && !is_lock {
                std::fs::remove_file(&path).map_err(|e| IndexError::io(&path, e))?;
            }
        }
        Ok(())
    }

    /// The collection generation the last commit reflects (`None`: new or emptied index).
    pub fn generation(&self) -> Option<u64> {
        self.view.generation()
    }

    pub fn analyzer(&self) -> Analyzer {
        self.analyzer
    }

    /// Live chunks as of the last commit.
    pub fn num_docs(&self) -> u64 {
        self.view.num_docs()
    }

    /// One collection commit, as one tantivy commit: delete `removed_keys` and every chunk of
    /// `removed_segments`, then add `added`, then commit with `generation` as payload. Either
    /// all of it becomes visible (to this index's searches at once, to other readers on their
    /// next refresh) or, after an error or a crash, none of it.
    pub fn apply(
        &mut self,
        generation: u64,
        removed_keys: &[ChunkKey],
        removed_segments: &[String],
        added: impl IntoIterator<Item = Bm25Doc>,
    ) -> Result<()> {
        let fields = self.view.fields;
        for key in removed_keys {
            self.writer()
                .delete_term(Term::from_field_text(fields.key, &key.to_string()));
        }
        for segment in removed_segments {
            self.writer()
                .delete_term(Term::from_field_text(fields.segment, segment));
        }
        self.add_and_commit(generation, added)
    }

    /// Replaces the whole index by `docs`, in one commit with `generation` as payload (the
    /// repair after a crash between a collection commit and its BM25 commit).
    pub fn rebuild(
        &mut self,
        generation: u64,
        docs: impl IntoIterator<Item = Bm25Doc>,
    ) -> Result<()> {
        // Drops the segments from the writer's working state only; the commit below publishes
        // the empty-then-refilled index in one step.
        self.writer()
            .delete_all_documents()
            .map_err(|e| tantivy_error(&self.view.dir, e))?;
        self.add_and_commit(generation, docs)
    }

    fn add_and_commit(
        &mut self,
        generation: u64,
        docs: impl IntoIterator<Item = Bm25Doc>,
    ) -> Result<()> {
        let result = self.try_add_and_commit(generation, docs);
        if result.is_err() {
            // Leave no half of this change queued for the next commit.
            let _ = self.writer().rollback();
        }
        result?;
        self.view.refresh()
    }

    fn try_add_and_commit(
        &mut self,
        generation: u64,
        docs: impl IntoIterator<Item = Bm25Doc>,
    ) -> Result<()> {
        let dir = self.view.dir.clone();
        let fields = self.view.fields;
        let mut body = String::new();
        for doc in docs {
            self.writer()
                .add_document(fields.document(&doc, &mut body))
                .map_err(|e| tantivy_error(&dir, e))?;
        }
        let mut commit = self
            .writer()
            .prepare_commit()
            .map_err(|e| tantivy_error(&dir, e))?;
        commit.set_payload(&payload(generation));
        commit.commit().map_err(|e| tantivy_error(&dir, e))?;
        Ok(())
    }

    /// As [`Bm25Reader::search`], over the last commit.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<(ChunkKey, f32)>> {
        self.view.search(query, k)
    }

    /// A view of the last commit that stays as it is while this index goes on committing.
    pub fn reader(&self) -> Bm25Reader {
        self.view.clone()
    }

    /// Waits for tantivy's background merges, then releases the writer lock, reporting a
    /// failed merge (dropping the index waits too, but cannot report).
    pub fn close(mut self) -> Result<()> {
        let dir = self.view.dir.clone();
        match self.writer.take() {
            Some(writer) => writer
                .wait_merging_threads()
                .map_err(|e| tantivy_error(&dir, e)),
            None => Ok(()),
        }
    }

    fn writer(&mut self) -> &mut IndexWriter {
        self.writer
            .as_mut()
            .expect("the writer is present until drop")
    }
}

/// Dropping waits for tantivy's background merges: a merge abandoned by a dropped writer
/// goes on writing and garbage-collecting files in `bm25/` while the next writer (the next
/// request of a server) opens the index, which then finds files missing or half-written.
impl Drop for Bm25Index {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            let _ = writer.wait_merging_threads();
        }
    }
}

#[cfg(test)]
mod tests;
