//! The `huse-run` binary: a thin layer over the `huse_run` library.

fn main() {
    // candle runs large element-wise ops on a spinning thread pool of its own, sized to the
    // machine and outside any stage's thread budget; one thread (the caller) keeps every
    // stage within its budget (the heavy element-wise work is in our kernels, on the
    // stage's pool). Set before any thread exists; a user's own setting wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: the process has a single thread here.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    keep_freed_memory();
    std::process::exit(huse_run::cli::main());
}

/// Keeps freed memory in the process instead of returning it to the system at once: glibc
/// gives buffers over its mmap threshold straight back (munmap) and trims the heap's top, so
/// every train step, BERT layer and image batch page-faulted and zeroed its buffers afresh
/// (5-15% of a stage's time in the kernel's page-fault and clear-page code). Buffers up to
/// 32 MiB now come from the heap and freed memory stays for the next step; the resident size
/// is then the heap's high-water mark (the full-data encode peaked at 1.10 GiB with it, 0.56
/// without; 0.80 once MobileNetV2 kept its own buffers). Measured: the train step +7% at 1
/// and 2 threads (README, Benchmarks). The benches do the same.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
