//! A BERT encoder (E_Q or E_D) whose weights are training variables, and its checkpoints.
//!
//! A checkpoint is a complete Hugging Face-format model directory (the base model's config,
//! tokenizer and pooling files plus the trained `model.safetensors`), so every command loads
//! it like any other model: `zrag search --query-encoder DIR`, `zrag index --doc-encoder DIR`.
//! It is written to a temporary directory and renamed into place, so an interrupted save
//! leaves the previous checkpoint whole.

use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use zrag_models::BertEncoder;

use crate::error::{Result, TrainError};

/// Files of a model directory that a checkpoint copies from its base (all but the weights).
const MODEL_FILES: [&str; 9] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "sentence_bert_config.json",
    "modules.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
];

/// Written next to the weights: where the checkpoint came from and how it was trained.
pub const TRAINING_INFO_FILE: &str = "zrag-training.json";

pub struct TrainableEncoder {
    encoder: BertEncoder,
    varmap: VarMap,
    base_dir: PathBuf,
}

impl TrainableEncoder {
    /// Loads a model directory with every weight as a variable.
    pub fn load(dir: &Path) -> Result<Self> {
        let (encoder, varmap) = BertEncoder::load_trainable(dir)?;
        Ok(TrainableEncoder {
            encoder,
            varmap,
            base_dir: dir.to_path_buf(),
        })
    }

    pub fn encoder(&self) -> &BertEncoder {
        &self.encoder
    }

    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    pub fn vars(&self) -> Vec<Var> {
        self.varmap.all_vars()
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Unit embeddings `(n, d)` of `texts`, differentiable with respect to the variables.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        let ids = self.encoder.tokenize(texts)?;
        let sequences: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        Ok(self.encoder.embed_token_batch(&sequences)?)
    }

    /// Switches between zrag's fused ops and candle's primitive ops (same weights, same
    /// maths; the latter is the reference for gradient checks and speed comparisons).
    pub fn set_ops(&mut self, ops: zrag_models::bert::OpSet) {
        self.encoder.set_ops(ops);
    }

    /// Re-derives the forward pass after the optimiser changed the variables.
    pub fn refresh(&mut self) -> Result<()> {
        self.encoder.refresh_weights(&self.varmap)?;
        Ok(())
    }

    /// A frozen copy of the current weights (a deep copy: later updates do not reach it), as a
    /// plain encoder, for re-encoding the corpus in the background.
    pub fn frozen_copy(&self) -> Result<BertEncoder> {
        let copy = VarMap::new();
        {
            let source = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            let mut target = copy.data().lock().unwrap_or_else(|e| e.into_inner());
            for (name, var) in source.iter() {
                target.insert(name.clone(), Var::from_tensor(&var.as_tensor().copy()?)?);
            }
        }
        Ok(self.encoder.with_weights(&copy)?)
    }

    /// Writes the current weights as a model directory at `dir`, replacing what is there only
    /// once the new directory is complete. `info` goes to [`TRAINING_INFO_FILE`].
    pub fn save(&self, dir: &Path, info: &serde_json::Value) -> Result<()> {
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "checkpoint".into());
        let staging = parent.join(format!(".{name}.partial"));
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|e| TrainError::io(&staging, e))?;
        }
        std::fs::create_dir_all(staging.join("1_Pooling"))
            .map_err(|e| TrainError::io(&staging, e))?;
        for file in MODEL_FILES {
            let from = self.base_dir.join(file);
            if from.is_file() {
                std::fs::copy(&from, staging.join(file)).map_err(|e| TrainError::io(&from, e))?;
            }
        }
        let weights = staging.join("model.safetensors");
        self.varmap.save(&weights)?;
        let info_path = staging.join(TRAINING_INFO_FILE);
        let text = serde_json::to_string_pretty(info).unwrap_or_default();
        std::fs::write(&info_path, text).map_err(|e| TrainError::io(&info_path, e))?;
        for file in std::fs::read_dir(&staging).map_err(|e| TrainError::io(&staging, e))? {
            let path = file.map_err(|e| TrainError::io(&staging, e))?.path();
            if path.is_file() {
                sync_file(&path)?;
            }
        }
        // Swap: the old checkpoint is moved aside, the new one renamed in, the old one removed.
        // A crash in between leaves `.{name}.old` complete; `recover_checkpoint` restores it.
        let old = parent.join(format!(".{name}.old"));
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(|e| TrainError::io(dir, e))?;
        }
        std::fs::rename(&staging, dir).map_err(|e| TrainError::io(dir, e))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        sync_dir(parent);
        Ok(())
    }
}

/// Restores a checkpoint directory that a crash during [`TrainableEncoder::save`] left moved
/// aside. Returns true if it did.
pub fn recover_checkpoint(dir: &Path) -> Result<bool> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let Some(name) = dir.file_name() else {
        return Ok(false);
    };
    let old = parent.join(format!(".{}.old", name.to_string_lossy()));
    if !dir.exists() && old.is_dir() {
        std::fs::rename(&old, dir).map_err(|e| TrainError::io(dir, e))?;
        return Ok(true);
    }
    Ok(false)
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io(path, e))
}

fn sync_dir(dir: &Path) {
    // Best effort: some file systems refuse fsync on directories.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::contrastive_loss;
    use zrag_models::testing::{write_tiny_bert, TinyBertSpec};

    fn tiny_model() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_bert(dir.path(), &TinyBertSpec::default()).unwrap();
        dir
    }

    const QUERIES: [&str; 3] = ["the cat sat", "a dog is on the mat", "cats and dogs"];
    const PASSAGES: [&str; 3] = ["the cat", "dog on a mat", "in the mat of 42"];

    fn loss(encoder: &TrainableEncoder) -> Tensor {
        let q = encoder.embed(&QUERIES).unwrap();
        let p = encoder.embed(&PASSAGES).unwrap();
        contrastive_loss(&q, &p, &[0, 1, 2], 0.1).unwrap()
    }

    /// Central differences over the whole encoder: the analytic gradient of a contrastive loss
    /// through pooling, every layer and the embeddings matches the numeric one.
    #[test]
    fn encoder_gradients_match_finite_differences() {
        let dir = tiny_model();
        let mut encoder = TrainableEncoder::load(dir.path()).unwrap();
        let grads = loss(&encoder).backward().unwrap();
        let names = [
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.1.intermediate.dense.weight",
            "encoder.layer.1.output.LayerNorm.weight",
            "embeddings.word_embeddings.weight",
            "embeddings.LayerNorm.bias",
        ];
        let vars = encoder.varmap.data().lock().unwrap().clone();
        let mut checked = 0;
        for name in names {
            let var = &vars[name];
            let grad: Vec<f32> = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            // The three largest entries: finite differences in f32 are reliable there.
            let mut order: Vec<usize> = (0..grad.len()).collect();
            order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
            for &i in &order[..3] {
                let original = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let h = 1e-2f32;
                let mut at = |delta: f32| -> f64 {
                    let mut values = original.clone();
                    values[i] += delta;
                    var.set(&Tensor::from_vec(values, var.shape(), var.device()).unwrap())
                        .unwrap();
                    encoder.refresh().unwrap();
                    f64::from(loss(&encoder).to_scalar::<f32>().unwrap())
                };
                let numeric = (at(h) - at(-h)) / (2.0 * f64::from(h));
                at(0.0);
                let analytic = f64::from(grad[i]);
                assert!(
                    (numeric - analytic).abs() <= 0.03 * analytic.abs().max(1e-2),
                    "{name}[{i}]: numeric {numeric} vs analytic {analytic}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 15);
    }

    #[test]
    fn training_steps_lower_the_loss_and_the_checkpoint_loads_as_a_model() {
        let dir = tiny_model();
        let mut encoder = TrainableEncoder::load(dir.path()).unwrap();
        let settings = crate::optim::OptimizerSettings {
            learning_rate: 1e-2,
            warmup_steps: 0,
            total_steps: 20,
            decay: crate::optim::Decay::Constant,
            ..Default::default()
        };
        let mut optimizer = crate::optim::Optimizer::new(encoder.vars(), settings).unwrap();
        let first = loss(&encoder).to_scalar::<f32>().unwrap();
        let frozen = encoder.frozen_copy().unwrap();
        for _ in 0..20 {
            optimizer.backward_step(&loss(&encoder)).unwrap();
            encoder.refresh().unwrap();
        }
        let last = loss(&encoder).to_scalar::<f32>().unwrap();
        assert!(last < first * 0.5, "loss {first} -> {last}");
        // The frozen copy kept the weights it was taken with.
        let before = frozen.embed(&PASSAGES).unwrap();
        let fresh = BertEncoder::load(dir.path())
            .unwrap()
            .embed(&PASSAGES)
            .unwrap();
        assert_eq!(before, fresh);

        let out = tempfile::tempdir().unwrap();
        let checkpoint = out.path().join("query-encoder");
        encoder
            .save(&checkpoint, &serde_json::json!({"step": 20}))
            .unwrap();
        // Saving again replaces it whole.
        encoder
            .save(&checkpoint, &serde_json::json!({"step": 20}))
            .unwrap();
        let loaded = BertEncoder::load(&checkpoint).unwrap();
        let expected = encoder.embed(&QUERIES).unwrap().to_vec2::<f32>().unwrap();
        let got = loaded.embed(&QUERIES).unwrap();
        for (a, b) in expected.iter().flatten().zip(got.iter().flatten()) {
            assert!((a - b).abs() < 1e-5);
        }
        assert!(checkpoint.join(TRAINING_INFO_FILE).is_file());
        assert!(!out.path().join(".query-encoder.partial").exists());

        // A crash between moving the old checkpoint aside and renaming the new one in.
        std::fs::rename(&checkpoint, out.path().join(".query-encoder.old")).unwrap();
        assert!(recover_checkpoint(&checkpoint).unwrap());
        assert!(BertEncoder::load(&checkpoint).is_ok());
    }
}
