//! Process-wide malloc settings for zrag's binaries: [`tune_allocator`].
//!
//! candle gives every op a fresh output buffer, so a forward or backward pass allocates and
//! frees activation-sized blocks (megabytes) thousands of times. With glibc's defaults the
//! larger blocks are mmap'd and go back to the kernel when freed, and the top of the heap is
//! trimmed, so the next batch faults the pages in again and the kernel zeroes every one:
//! 10–18 % of the encoder's forward pass on MiniLM. A 256 MiB mmap threshold and a 1 GiB trim
//! threshold keep those blocks in the heap for the next op instead. (Capping the arenas at one
//! as well was measured and gave nothing clear on the training step; BENCHMARKS.md, issue 8.)
//!
//! The binaries (the CLI and the benchmark examples) call it, so benchmarks measure what users
//! run; the library never changes process-wide state on its own.

/// Applies the settings above to glibc's malloc, unless the user chose malloc settings
/// through `GLIBC_TUNABLES`. Call it once at the start of `main`, before other threads start;
/// it does nothing on other C libraries. Returns whether the settings were applied.
///
/// The price is freed memory that stays mapped (up to the trim threshold) until it is reused
/// or the process exits.
pub fn tune_allocator() -> bool {
    let user_choice = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc"));
    if user_choice {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // SAFETY: mallopt only changes malloc's parameters; it is called before other threads
    // allocate (see the doc comment), with values mallopt(3) documents.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_settings() {
        // mallopt returns 0 for a value it rejects (older glibc capped the mmap threshold at
        // 32 MiB, which would silently leave the default in place).
        assert!(super::apply());
    }
}
