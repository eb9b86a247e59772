use std::time::Instant;
fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (batch, seq, reps) = (args[0], args[1], args[2]);
    let enc = zrag_models::BertEncoder::load(&zrag_models::default_encoder_dir().unwrap()).unwrap();
    let seqs: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..seq)
                .map(|i| {
                    if i == 0 {
                        101
                    } else if i == seq - 1 {
                        102
                    } else {
                        1000 + ((b * 7 + i * 13) % 20000) as u32
                    }
                })
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    enc.embed_token_batch(&refs).unwrap();
    let t0 = Instant::now();
    let c0 = cpu();
    for _ in 0..reps {
        enc.embed_token_batch(&refs).unwrap();
    }
    let dt = t0.elapsed().as_secs_f64() / reps as f64;
    let cpu_s = (cpu() - c0) / reps as f64;
    println!(
        "batch {batch} x {seq}: {:.1} ms/batch wall, {:.1} ms cpu, {:.1} sentences/s wall",
        dt * 1e3,
        cpu_s * 1e3,
        batch as f64 / dt
    );
}
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}
