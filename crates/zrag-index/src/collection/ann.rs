//! The collection's HNSW graph: kept up to date by every commit, searched by snapshots.
//!
//! Node ids number the rows of the covered segments in manifest order. A commit that only
//! appends segments extends the previous graph; one that removes a covered segment, or leaves
//! more than [`REBUILD_DEAD_FRACTION`] of the graph's rows deleted, rebuilds it from the live
//! rows. Deleted rows stay in the graph as waypoints and are filtered out at search time by
//! the segments' liveness bitsets. The graph file is written before the manifest that names
//! it, so it is committed (or not) atomically with the rows it indexes.

use std::path::Path;

use super::fsutil;
use super::manifest::{AnnState, CoveredSegment, GraphFile, Manifest, NamedFile};
use super::segment::SegmentReader;
use super::snapshot::Snapshot;
use crate::error::{IndexError, Result};
use crate::hnsw::{Hnsw, HnswFile, HnswParams, Vectors};

pub(crate) const ANN_DIR: &str = "ann";

/// Above this share of deleted rows among the graph's nodes, a commit rebuilds the graph.
pub const REBUILD_DEAD_FRACTION: f64 = 0.3;

/// The rows of a snapshot's segments as HNSW nodes.
pub(crate) struct SegmentVectors<'a> {
    segments: &'a [SegmentReader],
    /// Segment index of each node.
    node_segment: &'a [u32],
    /// First node of each segment.
    first_node: &'a [u32],
    dim: usize,
}

impl Vectors for SegmentVectors<'_> {
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.node_segment.len()
    }
    #[inline]
    fn vector(&self, node: u32) -> &[f32] {
        let (segment, row) = self.locate(node);
        let start = row as usize * self.dim;
        &self.segments[segment].vectors()[start..start + self.dim]
    }
}

impl SegmentVectors<'_> {
    #[inline]
    pub(crate) fn locate(&self, node: u32) -> (usize, u32) {
        let segment = self.node_segment[node as usize] as usize;
        (segment, node - self.first_node[segment])
    }
}

/// Node numbering over the first `covered` segments.
#[derive(Debug, Default)]
pub(crate) struct NodeMap {
    node_segment: Vec<u32>,
    first_node: Vec<u32>,
}

impl NodeMap {
    pub(crate) fn new(segments: &[SegmentReader]) -> NodeMap {
        let mut map = NodeMap::default();
        for (index, segment) in segments.iter().enumerate() {
            map.first_node.push(map.node_segment.len() as u32);
            map.node_segment
                .extend(std::iter::repeat_n(index as u32, segment.rows as usize));
        }
        map
    }

    pub(crate) fn vectors<'a>(
        &'a self,
        segments: &'a [SegmentReader],
        dim: usize,
    ) -> SegmentVectors<'a> {
        SegmentVectors {
            segments,
            node_segment: &self.node_segment,
            first_node: &self.first_node,
            dim,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.node_segment.len()
    }
}

/// The opened graph of a snapshot.
#[derive(Debug)]
pub(crate) struct AnnIndex {
    pub(crate) file: HnswFile,
    pub(crate) nodes: NodeMap,
    /// Number of leading segments the graph covers.
    pub(crate) covered: usize,
}

impl AnnIndex {
    pub(crate) fn open(
        dir: &Path,
        graph: &GraphFile,
        segments: &[SegmentReader],
    ) -> Result<AnnIndex> {
        let path = dir.join(ANN_DIR).join(&graph.file.name);
        let covered = graph.segments.len();
        let nodes = NodeMap::new(&segments[..covered]);
        let file = HnswFile::open(&path, |bytes| graph.file.check.verify(&path, bytes))?;
        if file.len() != nodes.len() {
            return Err(IndexError::corrupt(
                &path,
                format!(
                    "graph has {} nodes, its segments {} rows",
                    file.len(),
                    nodes.len()
                ),
            ));
        }
        Ok(AnnIndex {
            file,
            nodes,
            covered,
        })
    }
}

fn params_of(state: &AnnState) -> HnswParams {
    HnswParams {
        m: state.m.clamp(2, 128),
        ef_construction: state.ef_construction.max(1),
        ..HnswParams::default()
    }
}

/// Whether `graph`'s segments are still the first segments of `manifest` (so its node ids
/// still name the same rows).
pub(crate) fn covers_prefix(graph: &GraphFile, manifest: &Manifest) -> bool {
    graph.segments.len() <= manifest.segments.len()
        && graph
            .segments
            .iter()
            .zip(&manifest.segments)
            .all(|(c, s)| c.id == s.id && c.rows == s.rows)
}

/// Brings the graph up to date for the state `next` is about to commit, writing a new graph
/// file if anything changed; returns the graph entry for `next`'s manifest. `previous` is the
/// graph of the last commit. `progress` receives (nodes done, nodes to insert).
pub(crate) fn update_graph(
    dir: &Path,
    next: &Manifest,
    previous: Option<&GraphFile>,
    progress: Option<&(dyn Fn(usize, usize) + Sync)>,
) -> Result<Option<GraphFile>> {
    let state = &next.ann;
    if !state.enabled || next.live_chunks < state.min_rows || next.segments.is_empty() {
        return Ok(None);
    }
    let mut without_graph = next.clone();
    without_graph.ann.graph = None;
    let snapshot = Snapshot::open_manifest(dir, without_graph)?;
    let segments = snapshot.segments();
    let dim = snapshot.embedding().map_or(0, |e| e.dim);
    let covered: Vec<CoveredSegment> = segments
        .iter()
        .map(|s| CoveredSegment {
            id: s.id.clone(),
            rows: s.rows,
        })
        .collect();
    let params = params_of(state);

    // Extend the previous graph if it covers a prefix of the segments with the same
    // parameters and is not mostly dead; otherwise build afresh.
    let mut graph = None;
    if let Some(prev) = previous {
        if covers_prefix(prev, next) {
            let path = dir.join(ANN_DIR).join(&prev.file.name);
            let file = HnswFile::open(&path, |bytes| prev.file.check.verify(&path, bytes))?;
            let dead: u64 = segments[..prev.segments.len()]
                .iter()
                .map(|s| u64::from(s.rows - s.live_rows))
                .sum();
            let nodes = file.len().max(1) as f64;
            if file.params() == params && (dead as f64) / nodes <= REBUILD_DEAD_FRACTION {
                if prev.segments.len() == covered.len() {
                    // Only deletions: the old graph still serves, filtered by liveness.
                    return Ok(Some(prev.clone()));
                }
                graph = Some(file.to_graph()?);
            }
        }
    }
    let mut graph = graph.unwrap_or_else(|| Hnsw::new(params));
    let nodes = NodeMap::new(segments);
    let vectors = nodes.vectors(segments, dim);
    let start = graph.len();
    let to_insert = vectors.len() - start;
    let skip = |node: u32| {
        let (segment, row) = vectors.locate(node);
        !segments[segment].is_live(row)
    };
    let report = progress.map(|p| move |done: usize| p(done, to_insert));
    graph.extend(
        &vectors,
        0,
        &skip,
        report.as_ref().map(|r| r as &(dyn Fn(usize) + Sync)),
    );

    let ann_dir = dir.join(ANN_DIR);
    std::fs::create_dir_all(&ann_dir).map_err(|e| IndexError::io(&ann_dir, e))?;
    let name = format!("hnsw-g{}.graph", next.generation);
    let check = fsutil::write_new_file(&ann_dir.join(&name), &graph.to_bytes())?;
    fsutil::sync_dir(&ann_dir)?;
    Ok(Some(GraphFile {
        file: NamedFile { name, check },
        segments: covered,
    }))
}
