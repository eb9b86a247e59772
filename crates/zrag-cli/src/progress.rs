//! Progress bars on a terminal, silence elsewhere (indicatif hides itself when stderr is not a
//! terminal, so logs and pipes stay clean).

use indicatif::{ProgressBar, ProgressStyle};
use zrag_rag::IngestProgress;

pub fn bar(len: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
        )
        .expect("valid template"),
    );
    bar.set_message(message.to_string());
    bar
}

/// Shows embedding progress during `zrag index`.
#[derive(Default)]
pub struct IngestBar {
    bar: Option<ProgressBar>,
}

impl IngestProgress for IngestBar {
    fn planned(&mut self, _documents: usize, to_embed_chunks: usize) {
        if to_embed_chunks > 0 {
            self.bar = Some(bar(to_embed_chunks as u64, "embedding"));
        }
    }

    fn embedded(&mut self, n: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(n as u64);
        }
    }

    fn graph_progress(&mut self) -> Option<zrag_index::collection::GraphProgress> {
        Some(graph_bar())
    }
}

/// A progress callback for building the HNSW graph; the bar appears on the first report.
pub fn graph_bar() -> zrag_index::collection::GraphProgress {
    let shown: std::sync::Mutex<Option<ProgressBar>> = std::sync::Mutex::new(None);
    Box::new(move |done, total| {
        let mut shown = shown.lock().unwrap_or_else(|p| p.into_inner());
        let bar = shown.get_or_insert_with(|| bar(total as u64, "HNSW graph"));
        bar.set_position(done as u64);
        if done >= total {
            bar.finish_and_clear();
        }
    })
}

impl Drop for IngestBar {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
