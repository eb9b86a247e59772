//! zrag's own BERT encoder forward pass on candle-core / candle-nn.
//!
//! Every op used here has a backward pass (the fused dense, attention, layer-norm and GELU ops
//! come from [`crate::ops`], which define their gradients), so the same code serves inference
//! and, later, retriever training: build the model from a `VarBuilder` over a `VarMap` holding
//! the Hugging Face-named weights and gradients reach every one of them.
//!
//! The layout choices are for CPU speed: activations are kept as 2-D `(batch * seq, hidden)`
//! matrices so every projection is one large matmul, the query, key and value projections are
//! stacked into one matrix, and dense weights are stored transposed. Those stacked/transposed
//! copies are made once, in [`BertModel::load`]; gradients flow through them to the original
//! variables, but a trainer that updates the variables must call `load` again (a copy of the
//! weights, milliseconds) before the next forward pass.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::{Activation, BertConfig, Pooling};
use crate::int8::{int8_linear, Int8Linear};
use crate::ops::{
    add_layer_norm, attention, attention_composed, embeddings_layer_norm, layer_norm,
    layer_norm_composed, linear, linear_add_layer_norm, linear_composed, linear_gelu_erf,
};
use crate::ModelError;

/// Additive attention bias for padded keys: exp of it underflows to exactly 0 after the
/// softmax's max subtraction, so padding cannot change a real token's output. Finite, so a
/// fully masked row would give a uniform distribution rather than NaN.
const PADDING_BIAS: f32 = -1e9;

/// A dense layer `y = x W^T + b`, `W` being Hugging Face's `(out, in)` weight.
#[derive(Clone, Debug)]
struct Linear {
    /// `W^T`, `(in, out)` contiguous: the layout [`linear`] multiplies fastest.
    weight_t: Tensor,
    bias: Tensor,
    /// The same layer quantised to int8, used instead of the f32 weights when present
    /// (inference only: it has no gradients).
    int8: Option<Arc<Int8Linear>>,
}

impl Linear {
    /// From Hugging Face's `(out, in)` weight.
    fn new(weight: &Tensor, bias: Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
            int8: None,
        })
    }

    /// `x` is `(rows, in)`; returns `(rows, out)`.
    fn forward(&self, x: &Tensor, ops: OpSet) -> candle_core::Result<Tensor> {
        match (&self.int8, ops) {
            (Some(layer), _) => int8_linear(x, layer, false),
            (None, OpSet::Fused) => linear(x, &self.weight_t, &self.bias),
            (None, OpSet::Composed) => linear_composed(x, &self.weight_t, &self.bias),
        }
    }

    /// `gelu_erf(forward(x))`, fused into the int8 layer's output pass.
    fn forward_gelu_erf(&self, x: &Tensor, ops: OpSet) -> candle_core::Result<Tensor> {
        match (&self.int8, ops) {
            (Some(layer), _) => int8_linear(x, layer, true),
            (None, OpSet::Fused) => linear_gelu_erf(x, &self.weight_t, &self.bias),
            (None, OpSet::Composed) => self.forward(x, ops)?.gelu_erf(),
        }
    }

    /// `norm(forward(x) + residual)`; at inference the sum and norm run as the product's
    /// epilogue (f32) or in one pass after it (int8).
    fn forward_add_norm(
        &self,
        x: &Tensor,
        residual: &Tensor,
        norm: &LayerNorm,
        ops: OpSet,
    ) -> candle_core::Result<Tensor> {
        match (&self.int8, ops) {
            (None, OpSet::Fused) => linear_add_layer_norm(
                x,
                &self.weight_t,
                &self.bias,
                residual,
                (&norm.gamma, &norm.beta),
                norm.eps,
            ),
            (Some(layer), OpSet::Fused) => add_layer_norm(
                &int8_linear(x, layer, false)?,
                residual,
                (&norm.gamma, &norm.beta),
                norm.eps,
            ),
            _ => norm.forward(&(self.forward(x, ops)? + residual)?, ops),
        }
    }

    fn with_int8(&self, enabled: bool) -> candle_core::Result<Self> {
        let int8 = if enabled {
            let (in_dim, out_dim) = self.weight_t.dims2()?;
            let weight_t = self.weight_t.flatten_all()?.to_vec1::<f32>()?;
            let bias = self.bias.to_vec1::<f32>()?;
            Some(Arc::new(Int8Linear::quantize(
                &weight_t, in_dim, out_dim, &bias,
            )))
        } else {
            None
        };
        Ok(Self {
            weight_t: self.weight_t.clone(),
            bias: self.bias.clone(),
            int8,
        })
    }
}

#[derive(Clone, Debug)]
struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor, ops: OpSet) -> candle_core::Result<Tensor> {
        match ops {
            OpSet::Fused => layer_norm(x, &self.gamma, &self.beta, self.eps),
            OpSet::Composed => layer_norm_composed(x, &self.gamma, &self.beta, self.eps),
        }
    }
}

/// Which implementation of the dense, attention, layer-norm and GELU ops the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OpSet {
    /// zrag's fused CPU kernels with hand-written backward passes ([`crate::ops`]).
    #[default]
    Fused,
    /// The same maths from candle's primitive ops (matmul, broadcast, exp, …), autodiff
    /// throughout: the reference the fused model's outputs and gradients are checked against,
    /// and the "straightforward candle BERT" that training speed is measured against.
    Composed,
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    /// Query, key and value projections stacked: `(3 * hidden, hidden)`.
    qkv: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// A BERT encoder (embeddings + transformer layers), without pooler or heads.
#[derive(Clone, Debug)]
pub struct BertModel {
    config: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    ops: OpSet,
}

/// Fetches tensors from a `VarBuilder`, naming the file and full tensor name on failure.
struct WeightReader<'a, 'b> {
    vb: &'a VarBuilder<'b>,
    source: &'a Path,
}

impl WeightReader<'_, '_> {
    fn get(&self, shape: &[usize], name: &str) -> Result<Tensor, ModelError> {
        self.vb
            .get(shape, name)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|err| ModelError::Weights {
                path: self.source.to_path_buf(),
                tensor: qualified(self.vb, name),
                message: err.to_string(),
            })
    }

    fn at(&self, prefix: &str) -> VarBuilder<'_> {
        self.vb.pp(prefix)
    }
}

fn qualified(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl BertModel {
    /// Builds the model from Hugging Face BERT tensor names (`embeddings.*`, `encoder.layer.N.*`,
    /// optionally under a `bert.` prefix). `source` names the weight file in errors.
    pub fn load(vb: VarBuilder, config: &BertConfig, source: &Path) -> Result<Self, ModelError> {
        let vb = if !vb.contains_tensor("embeddings.word_embeddings.weight")
            && vb.contains_tensor("bert.embeddings.word_embeddings.weight")
        {
            vb.pp("bert")
        } else {
            vb
        };
        let h = config.hidden_size;
        let root = WeightReader { vb: &vb, source };
        let layer_norm = |reader: &WeightReader, prefix: &str| -> Result<LayerNorm, ModelError> {
            let vb = reader.at(prefix);
            let r = WeightReader { vb: &vb, source };
            Ok(LayerNorm {
                gamma: r.get(&[h], "weight")?,
                beta: r.get(&[h], "bias")?,
                eps: config.layer_norm_eps,
            })
        };
        // (weight, bias) of a dense layer, weight in the file's (out, in) layout.
        let dense_weights = |reader: &WeightReader,
                             prefix: &str,
                             out_dim: usize,
                             in_dim: usize|
         -> Result<(Tensor, Tensor), ModelError> {
            let vb = reader.at(prefix);
            let r = WeightReader { vb: &vb, source };
            Ok((
                r.get(&[out_dim, in_dim], "weight")?,
                r.get(&[out_dim], "bias")?,
            ))
        };

        let embeddings_vb = root.at("embeddings");
        let embeddings = WeightReader {
            vb: &embeddings_vb,
            source,
        };
        let word_embeddings = embeddings.get(&[config.vocab_size, h], "word_embeddings.weight")?;
        let position_embeddings = embeddings.get(
            &[config.max_position_embeddings, h],
            "position_embeddings.weight",
        )?;
        let token_type_embeddings =
            embeddings.get(&[config.type_vocab_size, h], "token_type_embeddings.weight")?;
        let embedding_norm = layer_norm(&embeddings, "LayerNorm")?;

        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for index in 0..config.num_hidden_layers {
            let layer_vb = root.at(&format!("encoder.layer.{index}"));
            let layer = WeightReader {
                vb: &layer_vb,
                source,
            };
            // A weight-layout failure here is a bug, not bad input, but still name the tensors.
            let layout_error = |what: &str| {
                let tensor = qualified(&layer_vb, what);
                move |err: candle_core::Error| ModelError::Weights {
                    path: source.to_path_buf(),
                    tensor,
                    message: err.to_string(),
                }
            };
            let linear = |prefix: &str, out_dim: usize, in_dim: usize| {
                let (weight, bias) = dense_weights(&layer, prefix, out_dim, in_dim)?;
                Linear::new(&weight, bias).map_err(layout_error(prefix))
            };
            // Query, key and value stacked into one (3h, h) projection: one matmul, not three.
            let (query_w, query_b) = dense_weights(&layer, "attention.self.query", h, h)?;
            let (key_w, key_b) = dense_weights(&layer, "attention.self.key", h, h)?;
            let (value_w, value_b) = dense_weights(&layer, "attention.self.value", h, h)?;
            let qkv = Tensor::cat(&[&query_w, &key_w, &value_w], 0)
                .and_then(|weight| {
                    let bias = Tensor::cat(&[&query_b, &key_b, &value_b], 0)?;
                    Linear::new(&weight, bias)
                })
                .map_err(layout_error("attention.self.{query,key,value}"))?;
            layers.push(EncoderLayer {
                qkv,
                attention_output: linear("attention.output.dense", h, h)?,
                attention_norm: layer_norm(&layer, "attention.output.LayerNorm")?,
                intermediate: linear("intermediate.dense", config.intermediate_size, h)?,
                output: linear("output.dense", h, config.intermediate_size)?,
                output_norm: layer_norm(&layer, "output.LayerNorm")?,
            });
        }
        Ok(Self {
            config: config.clone(),
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embedding_norm,
            layers,
            ops: OpSet::Fused,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// This model running `ops` (same weights).
    pub fn with_ops(&self, ops: OpSet) -> Self {
        Self {
            ops,
            ..self.clone()
        }
    }

    pub fn ops(&self) -> OpSet {
        self.ops
    }

    /// This model with its dense layers (`int8`) quantised to int8 or (`!int8`) back on the
    /// f32 weights, which it always keeps. Embeddings, layer norms and attention stay f32.
    pub fn with_int8_dense(&self, int8: bool) -> candle_core::Result<Self> {
        let mut model = self.clone();
        for layer in &mut model.layers {
            layer.qkv = layer.qkv.with_int8(int8)?;
            layer.attention_output = layer.attention_output.with_int8(int8)?;
            layer.intermediate = layer.intermediate.with_int8(int8)?;
            layer.output = layer.output.with_int8(int8)?;
        }
        Ok(model)
    }

    /// Token states `(batch, seq, hidden)` for `input_ids` and `token_type_ids` (both
    /// `(batch, seq)` u32) under `attention_mask` (`(batch, seq)` f32, 1 = token, 0 = padding).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        let hidden = self.config.hidden_size;
        if seq > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence of {seq} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        let fused = match self.ops {
            OpSet::Fused => embeddings_layer_norm(
                [
                    &self.word_embeddings,
                    &self.token_type_embeddings,
                    &self.position_embeddings,
                ],
                (input_ids, token_type_ids),
                (&self.embedding_norm.gamma, &self.embedding_norm.beta),
                self.embedding_norm.eps,
            )?,
            OpSet::Composed => None,
        };
        let mut states = match fused {
            Some(states) => states,
            None => self.embed_separately(input_ids, token_type_ids)?,
        };

        // (1 - mask) * PADDING_BIAS, as one affine op.
        let key_bias = attention_mask
            .to_dtype(DType::F32)?
            .affine(-(PADDING_BIAS as f64), PADDING_BIAS as f64)?;
        for layer in &self.layers {
            states = self.encoder_layer(layer, &states, &key_bias, batch)?;
        }
        states.reshape((batch, seq, hidden))
    }

    /// The embedding layer from candle's gathers and adds (training, or a bad id to report).
    fn embed_separately(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        let (hidden, rows) = (self.config.hidden_size, batch * seq);
        let words = self
            .word_embeddings
            .index_select(&input_ids.flatten_all()?, 0)?;
        let types = self
            .token_type_embeddings
            .index_select(&token_type_ids.flatten_all()?, 0)?;
        let positions = self.position_embeddings.narrow(0, 0, seq)?;
        let embedded = (words + types)?
            .reshape((batch, seq, hidden))?
            .broadcast_add(&positions)?
            .reshape((rows, hidden))?;
        self.embedding_norm.forward(&embedded, self.ops)
    }

    /// One transformer layer on `states` `(batch * seq, hidden)`.
    fn encoder_layer(
        &self,
        layer: &EncoderLayer,
        states: &Tensor,
        key_bias: &Tensor,
        batch: usize,
    ) -> candle_core::Result<Tensor> {
        let ops = self.ops;
        let heads = self.config.num_attention_heads;
        let qkv = layer.qkv.forward(states, ops)?;
        let context = match ops {
            OpSet::Fused => attention(&qkv, key_bias, batch, heads)?,
            OpSet::Composed => attention_composed(&qkv, key_bias, batch, heads)?,
        };
        let states = layer.attention_output.forward_add_norm(
            &context,
            states,
            &layer.attention_norm,
            ops,
        )?;

        let activated = match self.config.activation {
            Activation::GeluErf => layer.intermediate.forward_gelu_erf(&states, ops)?,
            Activation::GeluTanh => layer.intermediate.forward(&states, ops)?.gelu()?,
            Activation::Relu => layer.intermediate.forward(&states, ops)?.relu()?,
        };
        layer
            .output
            .forward_add_norm(&activated, &states, &layer.output_norm, ops)
    }
}

/// Sentence vectors `(batch, hidden)` from token states `(batch, seq, hidden)`.
pub fn pool(
    pooling: Pooling,
    states: &Tensor,
    attention_mask: &Tensor,
) -> candle_core::Result<Tensor> {
    match pooling {
        Pooling::Cls => states.narrow(1, 0, 1)?.squeeze(1),
        Pooling::Mean => {
            // Sum the real tokens' states with one batched (1 x seq) @ (seq x hidden) matmul.
            let mask = attention_mask.to_dtype(DType::F32)?;
            let summed = mask.unsqueeze(1)?.matmul(states)?.squeeze(1)?;
            // sentence-transformers clamps the count at 1e-9.
            let counts = mask.sum_keepdim(1)?.maximum(1e-9f64)?;
            summed.broadcast_div(&counts)
        }
    }
}

/// Scales every row of `vectors` `(batch, dim)` to unit L2 norm (PyTorch's
/// `F.normalize(eps=1e-12)`: a zero row stays zero).
pub fn l2_normalize(vectors: &Tensor) -> candle_core::Result<Tensor> {
    let norms = vectors
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .maximum(1e-12f64)?;
    vectors.broadcast_div(&norms)
}
