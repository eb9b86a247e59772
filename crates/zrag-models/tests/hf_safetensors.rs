//! The Hugging Face (safetensors) loading path, checked against the GGUF path on the same
//! weights: SmolLM2's GGUF is converted here into a Hugging Face directory (f32 safetensors
//! with the Q/K rows put back in Hugging Face's RoPE layout, tokenizer.json,
//! tokenizer_config.json with the chat template, config.json), loaded by path, and must give
//! the logits of the de-quantised GGUF model and the same tokens.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde_json::json;
use zrag_models::generator::gguf::GgufFile;
use zrag_models::generator::{
    default_generator_path, ChatMessage, LocalGenerator, WeightPrecision,
};

/// llama.cpp's converter permutes Q/K rows so that RoPE rotates adjacent pairs; undo it.
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, out / heads / 2, 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

#[test]
fn a_hugging_face_directory_gives_the_same_model_as_the_gguf() {
    let gguf_path = default_generator_path().expect("run scripts/fetch-models.sh first");
    let mut gguf = GgufFile::open(&gguf_path).unwrap();
    let hidden = gguf.usize("llama.embedding_length").unwrap();
    let heads = gguf.usize("llama.attention.head_count").unwrap();
    let kv_heads = gguf.usize("llama.attention.head_count_kv").unwrap();
    let layers = gguf.usize("llama.block_count").unwrap();
    let ffn = gguf.usize("llama.feed_forward_length").unwrap();
    let vocab = gguf.string_array("tokenizer.ggml.tokens").unwrap().len();
    let hd = hidden / heads;
    let template = gguf.string("tokenizer.chat_template").unwrap().to_string();

    let mut read = |name: &str, shape: &[usize]| -> Tensor {
        gguf.tensor(name, shape)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(
        "model.embed_tokens.weight".into(),
        read("token_embd.weight", &[vocab, hidden]),
    );
    tensors.insert(
        "model.norm.weight".into(),
        read("output_norm.weight", &[hidden]),
    );
    for i in 0..layers {
        let g = |t: &str| format!("blk.{i}.{t}.weight");
        let h = |t: &str| format!("model.layers.{i}.{t}.weight");
        let q = read(&g("attn_q"), &[hidden, hidden]);
        let k = read(&g("attn_k"), &[kv_heads * hd, hidden]);
        tensors.insert(h("self_attn.q_proj"), unpermute(&q, heads));
        tensors.insert(h("self_attn.k_proj"), unpermute(&k, kv_heads));
        tensors.insert(
            h("self_attn.v_proj"),
            read(&g("attn_v"), &[kv_heads * hd, hidden]),
        );
        tensors.insert(
            h("self_attn.o_proj"),
            read(&g("attn_output"), &[hidden, hidden]),
        );
        tensors.insert(h("mlp.gate_proj"), read(&g("ffn_gate"), &[ffn, hidden]));
        tensors.insert(h("mlp.up_proj"), read(&g("ffn_up"), &[ffn, hidden]));
        tensors.insert(h("mlp.down_proj"), read(&g("ffn_down"), &[hidden, ffn]));
        tensors.insert(h("input_layernorm"), read(&g("attn_norm"), &[hidden]));
        tensors.insert(
            h("post_attention_layernorm"),
            read(&g("ffn_norm"), &[hidden]),
        );
    }

    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    drop(tensors);
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rope_theta": gguf.f32("llama.rope.freq_base").unwrap(),
        "rms_norm_eps": gguf.f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
        "max_position_embeddings": gguf.usize("llama.context_length").unwrap(),
        "tie_word_embeddings": true, "eos_token_id": 2, "rope_scaling": null,
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let from_gguf = LocalGenerator::load_with(&gguf_path, WeightPrecision::F32).unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        from_gguf.tokenizer().to_tokenizer_json().unwrap(),
    )
    .unwrap();
    let tokenizer_config = json!({
        "chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
        "add_bos_token": false,
    });
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();

    let from_hf = LocalGenerator::load(dir.path()).unwrap();
    let messages = [ChatMessage::new(
        "user",
        "Name three planets, and the hottest one.",
    )];
    let ids = from_gguf.tokenizer().chat_prompt(&messages).unwrap();
    assert_eq!(from_hf.tokenizer().chat_prompt(&messages).unwrap(), ids);
    for text in [
        "Hello world",
        "12345 and 3.14159",
        "naïve café 🙂",
        "<|im_start|>literal",
    ] {
        assert_eq!(
            from_hf.tokenizer().encode(text).unwrap(),
            from_gguf.tokenizer().encode(text).unwrap(),
            "{text}"
        );
    }
    assert_eq!(
        from_hf.tokenizer().stop_tokens(),
        from_gguf.tokenizer().stop_tokens()
    );
    let (a, b) = (
        from_gguf.model().logits_all(&ids).unwrap(),
        from_hf.model().logits_all(&ids).unwrap(),
    );
    let worst = a
        .iter()
        .zip(&b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "logits differ by {worst}");
}
