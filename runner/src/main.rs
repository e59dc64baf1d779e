//! The `huse-run` binary: a thin layer over the `huse_run` library.

fn main() {
    // Defaults of environment variables from the project file (`huse.toml` here or above),
    // set while the process has one thread.
    if let Err(e) = huse_run::project::apply_defaults() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    // candle's own thread pool to one thread, freed memory kept (see `huse_cpu::setup_process`).
    // SAFETY: the process has a single thread here.
    unsafe { huse_cpu::setup_process() };
    std::process::exit(huse_run::cli::main());
}
