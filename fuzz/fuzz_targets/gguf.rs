//! The GGUF reader on arbitrary bytes, through zrag's `GgufFile` (header, metadata and tensor
//! directory by candle's `gguf_file::Content`, typed access and errors by zrag), then what
//! zrag does with a header it accepted: every typed metadata accessor on every key, every
//! tensor read at its own shape, and the byte-level BPE tokenizer built from the
//! `tokenizer.*` metadata, used to encode, decode and build a chat prompt.
//!
//! A malformed file must be an error: no panic, and no absurd allocation (run with
//! `-rss_limit_mb=2048`, the default, so that a length field claiming 2^60 elements that is
//! believed shows up as an out-of-memory crash).

#![no_main]

use std::io::Cursor;
use std::path::Path;
use std::sync::Once;

use candle_core::quantized::gguf_file::Content;
use libfuzzer_sys::fuzz_target;
use zrag_models::generator::gguf::GgufFile;
use zrag_models::generator::{ChatMessage, GeneratorTokenizer};

static HOOK: Once = Once::new();

fuzz_target!(|data: &[u8]| {
    // `GgufFile` runs candle's header reader under `catch_unwind` (a panic there is an error
    // naming the file), but libfuzzer-sys's panic hook aborts on every panic, caught or not.
    // Back to the default hook (print, do not abort): a panic that escapes zrag still fails
    // the run, as libfuzzer-sys aborts when this closure unwinds.
    HOOK.call_once(|| drop(std::panic::take_hook()));

    let path = Path::new("fuzz.gguf");
    let Ok(mut gguf) = GgufFile::from_bytes(path, data.to_vec()) else {
        return;
    };
    // The same header through candle directly, for the key and tensor names (GgufFile does
    // not list them). It was just read once, so it reads again.
    let content = Content::read(&mut Cursor::new(data)).expect("read twice");
    for key in content.metadata.keys() {
        assert!(gguf.has(key));
        let _ = gguf.usize(key);
        let _ = gguf.optional_usize(key);
        let _ = gguf.f32(key);
        let _ = gguf.bool(key);
        let _ = gguf.string(key);
        let _ = gguf.array(key);
        let _ = gguf.string_array(key);
        let _ = gguf.int_array(key);
    }
    for (name, info) in &content.tensor_infos {
        assert!(gguf.has_tensor(name));
        let _ = gguf.tensor(name, info.shape.dims());
    }
    if let Ok(tokenizer) = GeneratorTokenizer::from_gguf(&gguf) {
        let _ = tokenizer.vocab_size();
        let _ = tokenizer.stop_tokens();
        if let Ok(ids) = tokenizer.encode("Hello, world! <|im_start|> 123") {
            let _ = tokenizer.decode(&ids);
            let _ = tokenizer.decode_with_special(&ids);
        }
        let _ = tokenizer.decode(&[0, 1, 2, u32::MAX]);
        let _ = tokenizer.chat_prompt(&[
            ChatMessage::new("system", "Answer briefly."),
            ChatMessage::new("user", "What is RAG?"),
        ]);
    }
});
