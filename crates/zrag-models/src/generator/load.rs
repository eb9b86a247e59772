//! Loading a generator from disk: a GGUF file (quantised, tokenizer in its metadata) or a
//! Hugging Face directory (config.json, safetensors weights, tokenizer.json) of the llama /
//! Qwen2 / Mistral family. Both become the same [`Llama`] plus a [`GeneratorTokenizer`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::gguf::GgufFile;
use super::llama::{Layer, Linear, Llama, LlamaConfig, Weight};
use super::lora::LoraAdapter;
use super::tokenizer::GeneratorTokenizer;
use crate::ModelError;

/// File name of the default generator under `zrag_home()/models`.
pub const DEFAULT_GENERATOR_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The default generator's path, or an error telling the user how to install it.
pub fn default_generator_path() -> Result<PathBuf, ModelError> {
    let path = crate::zrag_home()
        .join("models")
        .join(DEFAULT_GENERATOR_FILE);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ModelError::ModelNotInstalled { path })
    }
}

/// How GGUF weight matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightPrecision {
    /// As stored in the file (quantised blocks; matmuls quantise activations to 8 bits, as
    /// llama.cpp does). Fast and small.
    AsStored,
    /// De-quantised to f32 once at load: exact f32 arithmetic over the stored weights, about
    /// 8x the memory. For reference checks and as the base of adapter training.
    F32,
}

/// A generator ready to run: the decoder, its tokenizer, and where it came from.
pub struct LocalGenerator {
    model: Llama,
    tokenizer: GeneratorTokenizer,
    name: String,
    path: PathBuf,
}

impl LocalGenerator {
    /// Loads a `.gguf` file (weights kept quantised), or a Hugging Face model directory.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        Self::load_with(path, WeightPrecision::AsStored)
    }

    /// Loads a generator, de-quantising GGUF weights to f32 when asked.
    pub fn load_with(path: &Path, precision: WeightPrecision) -> Result<Self, ModelError> {
        let (mut model, tokenizer) = if path.is_dir() {
            load_hf_dir(path)?
        } else {
            load_gguf(path, precision)?
        };
        model.set_stop_tokens(tokenizer.stop_tokens().to_vec());
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(LocalGenerator {
            model,
            tokenizer,
            name,
            path: path.to_path_buf(),
        })
    }

    /// Loads a generator with f32 weights and merges the LoRA adapter at `adapter_path` (see
    /// [`LoraAdapter`]) into them. The name becomes `model+adapter` (file stems), so reports
    /// say which adapter produced an answer.
    pub fn load_with_adapter(path: &Path, adapter_path: &Path) -> Result<Self, ModelError> {
        let adapter = LoraAdapter::load(adapter_path)?;
        let mut generator = Self::load_with(path, WeightPrecision::F32)?;
        generator.model.apply_adapter(&adapter)?;
        let adapter_name = adapter_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| adapter_path.display().to_string());
        generator.name = format!("{}+{adapter_name}", generator.name);
        Ok(generator)
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn tokenizer(&self) -> &GeneratorTokenizer {
        &self.tokenizer
    }

    /// The file or directory name, e.g. `SmolLM2-135M-Instruct.Q4_1`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn load_gguf(
    path: &Path,
    precision: WeightPrecision,
) -> Result<(Llama, GeneratorTokenizer), ModelError> {
    let mut gguf = GgufFile::open(path)?;
    let arch = gguf.string("general.architecture")?.to_string();
    if arch != "llama" && arch != "qwen2" {
        return Err(gguf.config_error(
            "general.architecture",
            format!("`{arch}` is not supported (llama and qwen2 are)"),
        ));
    }
    let key = |name: &str| format!("{arch}.{name}");
    let tokenizer = GeneratorTokenizer::from_gguf(&gguf)?;
    let hidden_size = gguf.usize(&key("embedding_length"))?;
    let num_heads = gguf.usize(&key("attention.head_count"))?;
    let num_kv_heads = gguf
        .optional_usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    if num_heads == 0 || !hidden_size.is_multiple_of(num_heads) {
        return Err(gguf.config_error(
            &key("attention.head_count"),
            format!("{num_heads} heads do not divide the embedding width {hidden_size}"),
        ));
    }
    let head_dim = gguf
        .optional_usize(&key("attention.key_length"))?
        .unwrap_or(hidden_size / num_heads);
    let vocab_size = match gguf.optional_usize(&key("vocab_size"))? {
        Some(v) => v,
        None => gguf.string_array("tokenizer.ggml.tokens")?.len(),
    };
    let config = LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: gguf.usize(&key("feed_forward_length"))?,
        num_layers: gguf.usize(&key("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        rope_dim: gguf
            .optional_usize(&key("rope.dimension_count"))?
            .unwrap_or(head_dim),
        rope_theta: if gguf.has(&key("rope.freq_base")) {
            gguf.f32(&key("rope.freq_base"))?
        } else {
            10_000.0
        },
        rms_norm_eps: gguf.f32(&key("attention.layer_norm_rms_epsilon"))?,
        // llama.cpp's converter permutes llama's Q/K rows for adjacent-pair RoPE; Qwen2 files
        // keep the Hugging Face layout.
        rope_interleaved: arch == "llama",
        max_positions: gguf.usize(&key("context_length"))?,
    };
    config
        .validate()
        .map_err(|message| gguf.config_error(&format!("{arch}.*"), message))?;
    let c = &config;
    let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);

    let embedding = Arc::new(gguf.tensor("token_embd.weight", &[c.vocab_size, c.hidden_size])?);
    let embeddings = to_vec(&embedding.dequantize(&Device::Cpu)?)?;
    let lm_head = if gguf.has_tensor("output.weight") {
        linear_gguf(
            &mut gguf,
            "output.weight",
            c.vocab_size,
            c.hidden_size,
            false,
            precision,
        )?
    } else if precision == WeightPrecision::F32 {
        let table = Tensor::from_slice(&embeddings, (c.vocab_size, c.hidden_size), &Device::Cpu)?;
        Linear::new(Weight::f32(table), None, c.vocab_size, c.hidden_size)
    } else {
        Linear::new(
            Weight::from_arc(embedding)?,
            None,
            c.vocab_size,
            c.hidden_size,
        )
    };
    let vector = |gguf: &mut GgufFile, name: &str, len: usize| -> Result<Vec<f32>, ModelError> {
        to_vec(&gguf.tensor(name, &[len])?.dequantize(&Device::Cpu)?)
    };
    let final_norm = vector(&mut gguf, "output_norm.weight", c.hidden_size)?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let name = |t: &str| format!("blk.{i}.{t}");
        layers.push(Layer {
            attn_norm: vector(&mut gguf, &name("attn_norm.weight"), c.hidden_size)?,
            q: linear_gguf(
                &mut gguf,
                &name("attn_q"),
                q_dim,
                c.hidden_size,
                true,
                precision,
            )?,
            k: linear_gguf(
                &mut gguf,
                &name("attn_k"),
                kv_dim,
                c.hidden_size,
                true,
                precision,
            )?,
            v: linear_gguf(
                &mut gguf,
                &name("attn_v"),
                kv_dim,
                c.hidden_size,
                true,
                precision,
            )?,
            o: linear_gguf(
                &mut gguf,
                &name("attn_output"),
                c.hidden_size,
                q_dim,
                false,
                precision,
            )?,
            ffn_norm: vector(&mut gguf, &name("ffn_norm.weight"), c.hidden_size)?,
            gate: linear_gguf(
                &mut gguf,
                &name("ffn_gate"),
                c.intermediate_size,
                c.hidden_size,
                false,
                precision,
            )?,
            up: linear_gguf(
                &mut gguf,
                &name("ffn_up"),
                c.intermediate_size,
                c.hidden_size,
                false,
                precision,
            )?,
            down: linear_gguf(
                &mut gguf,
                &name("ffn_down"),
                c.hidden_size,
                c.intermediate_size,
                false,
                precision,
            )?,
        });
    }
    let model = Llama::from_parts(config, embeddings, layers, final_norm, lm_head, Vec::new());
    Ok((model, tokenizer))
}

/// `prefix.weight` (and `prefix.bias` when `may_have_bias` and present, as in Qwen2's Q/K/V).
fn linear_gguf(
    gguf: &mut GgufFile,
    prefix: &str,
    out_dim: usize,
    in_dim: usize,
    may_have_bias: bool,
    precision: WeightPrecision,
) -> Result<Linear, ModelError> {
    let weight_name = if prefix.ends_with(".weight") {
        prefix.to_string()
    } else {
        format!("{prefix}.weight")
    };
    let stored = gguf.tensor(&weight_name, &[out_dim, in_dim])?;
    let weight = match precision {
        WeightPrecision::AsStored => Weight::from_qtensor(stored)?,
        WeightPrecision::F32 => Weight::f32(stored.dequantize(&Device::Cpu)?),
    };
    let bias_name = format!("{prefix}.bias");
    let bias = if may_have_bias && gguf.has_tensor(&bias_name) {
        Some(to_vec(
            &gguf
                .tensor(&bias_name, &[out_dim])?
                .dequantize(&Device::Cpu)?,
        )?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias, out_dim, in_dim))
}

fn to_vec(tensor: &Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// The fields of a Hugging Face `config.json` that a llama-family decoder needs.
#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rope_theta")]
    rope_theta: f32,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f32,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_scaling: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}

fn default_rms_eps() -> f32 {
    1e-6
}

fn default_max_positions() -> usize {
    2048
}

const HF_ARCHITECTURES: [&str; 3] = ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"];

fn load_hf_dir(dir: &Path) -> Result<(Llama, GeneratorTokenizer), ModelError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile {
                path: config_path.clone(),
                hint: "a generator directory needs config.json, model.safetensors and \
                       tokenizer.json (or pass a .gguf file)"
                    .into(),
            }
        } else {
            ModelError::Io {
                path: config_path.clone(),
                source,
            }
        }
    })?;
    let hf: HfConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: config_path.clone(),
        source,
    })?;
    let config_error = |field: &str, message: String| ModelError::Config {
        path: config_path.clone(),
        field: field.into(),
        message,
    };
    if let Some(arch) = hf.architectures.first() {
        if !HF_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(config_error(
                "architectures",
                format!(
                    "`{arch}` is not supported (supported: {})",
                    HF_ARCHITECTURES.join(", ")
                ),
            ));
        }
    }
    if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(config_error(
            "rope_scaling",
            "RoPE scaling is not supported".into(),
        ));
    }
    if hf.num_attention_heads == 0 || !hf.hidden_size.is_multiple_of(hf.num_attention_heads) {
        return Err(config_error(
            "num_attention_heads",
            format!(
                "{} heads do not divide hidden_size {}",
                hf.num_attention_heads, hf.hidden_size
            ),
        ));
    }
    let head_dim = hf
        .head_dim
        .unwrap_or(hf.hidden_size / hf.num_attention_heads);
    let config = LlamaConfig {
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_layers: hf.num_hidden_layers,
        num_heads: hf.num_attention_heads,
        num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim,
        rope_dim: head_dim,
        rope_theta: hf.rope_theta,
        rms_norm_eps: hf.rms_norm_eps,
        rope_interleaved: false,
        max_positions: hf.max_position_embeddings,
    };
    config.validate().map_err(|m| config_error("config", m))?;

    let mut weights = SafetensorsWeights::open(dir)?;
    let c = &config;
    let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let embeddings =
        to_vec(&weights.take("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?)?;
    let lm_head = if !hf.tie_word_embeddings && weights.has("lm_head.weight") {
        weights.linear("lm_head", c.vocab_size, c.hidden_size)?
    } else {
        let table = Tensor::from_slice(&embeddings, (c.vocab_size, c.hidden_size), &Device::Cpu)?;
        Linear::new(Weight::f32(table), None, c.vocab_size, c.hidden_size)
    };
    let final_norm = to_vec(&weights.take("model.norm.weight", &[c.hidden_size])?)?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = |t: &str| format!("model.layers.{i}.{t}");
        layers.push(Layer {
            attn_norm: to_vec(&weights.take(&p("input_layernorm.weight"), &[c.hidden_size])?)?,
            q: weights.linear(&p("self_attn.q_proj"), q_dim, c.hidden_size)?,
            k: weights.linear(&p("self_attn.k_proj"), kv_dim, c.hidden_size)?,
            v: weights.linear(&p("self_attn.v_proj"), kv_dim, c.hidden_size)?,
            o: weights.linear(&p("self_attn.o_proj"), c.hidden_size, q_dim)?,
            ffn_norm: to_vec(
                &weights.take(&p("post_attention_layernorm.weight"), &[c.hidden_size])?,
            )?,
            gate: weights.linear(&p("mlp.gate_proj"), c.intermediate_size, c.hidden_size)?,
            up: weights.linear(&p("mlp.up_proj"), c.intermediate_size, c.hidden_size)?,
            down: weights.linear(&p("mlp.down_proj"), c.hidden_size, c.intermediate_size)?,
        });
    }
    let eos: Vec<u32> = match &hf.eos_token_id {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Some(serde_json::Value::Array(values)) => values
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    };
    let tokenizer = GeneratorTokenizer::from_hf_dir(dir, &eos)?;
    let model = Llama::from_parts(config, embeddings, layers, final_norm, lm_head, Vec::new());
    Ok((model, tokenizer))
}

/// The tensors of `model.safetensors` (or of the shards listed in
/// `model.safetensors.index.json`), taken out one by one as f32.
struct SafetensorsWeights {
    tensors: HashMap<String, (Tensor, PathBuf)>,
}

impl SafetensorsWeights {
    fn open(dir: &Path) -> Result<Self, ModelError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                path: index.clone(),
                source,
            })?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| ModelError::Json {
                    path: index.clone(),
                    source,
                })?;
            let mut shards: Vec<String> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Config {
                    path: index.clone(),
                    field: "weight_map".into(),
                    message: "missing or not an object".into(),
                })?
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            return Err(ModelError::MissingFile {
                path: single,
                hint: "no model.safetensors (or model.safetensors.index.json) in the directory"
                    .into(),
            });
        };
        let mut tensors = HashMap::new();
        for file in files {
            let loaded = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| {
                ModelError::Weights {
                    path: file.clone(),
                    tensor: "*".into(),
                    message: e.to_string(),
                }
            })?;
            for (name, tensor) in loaded {
                tensors.insert(name, (tensor, file.clone()));
            }
        }
        Ok(SafetensorsWeights { tensors })
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let (tensor, file) = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::Weights {
                path: PathBuf::from("model.safetensors"),
                tensor: name.into(),
                message: "missing tensor".into(),
            })?;
        if tensor.dims() != shape {
            return Err(ModelError::Weights {
                path: file,
                tensor: name.into(),
                message: format!("shape {:?}, expected {shape:?}", tensor.dims()),
            });
        }
        Ok(tensor.to_dtype(DType::F32)?)
    }

    fn linear(
        &mut self,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Linear, ModelError> {
        let weight = self.take(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias_name = format!("{prefix}.bias");
        let bias = if self.has(&bias_name) {
            Some(to_vec(&self.take(&bias_name, &[out_dim])?)?)
        } else {
            None
        };
        Ok(Linear::new(Weight::f32(weight), bias, out_dim, in_dim))
    }
}
