//! The `huse-run` binary: a thin layer over the `huse_run` library.

fn main() {
    std::process::exit(huse_run::cli::main());
}
