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
    std::process::exit(huse_run::cli::main());
}
