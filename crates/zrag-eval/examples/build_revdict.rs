//! Builds the reverse-dictionary benchmark from the default sources and prints its statistics.
//!
//! `cargo run --release -p zrag-eval --example build_revdict -- OUT_DIR [MAX_DOCS]`

fn main() {
    let mut args = std::env::args().skip(1);
    let out = args.next().unwrap_or_else(|| "target/revdict".to_string());
    let mut cfg = zrag_eval::revdict::RevdictConfig::from_zrag_home(out);
    cfg.max_docs = args
        .next()
        .map(|n| n.parse().expect("MAX_DOCS must be a number"));
    match zrag_eval::revdict::build(&cfg) {
        Ok(stats) => println!("{}", serde_json::to_string_pretty(&stats).unwrap()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
