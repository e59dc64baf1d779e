//! The `huse-run` binary: a thin layer over the `huse_run` library.

fn main() {
    // candle's own thread pool to one thread, freed memory kept (see `huse_cpu::setup_process`).
    // SAFETY: the process has a single thread here.
    unsafe { huse_cpu::setup_process() };
    std::process::exit(huse_run::cli::main());
}
