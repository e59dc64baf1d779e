//! Command-line interface: the flags are parsed here and each command is handed to its
//! module in [`crate::cmd`] (`huse-run runs` -> `cmd::runs::run`).
//!
//! Exit codes: 0 success, 1 a run or command failed, 2 usage or experiment-file error,
//! 130 interrupted (Ctrl-C / SIGTERM).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use huse_exec::progress::{Display, LogWriter};

use crate::cmd::{self, Global, run::RunArgs};

#[derive(Parser, Debug)]
#[command(name = "huse-run", version, about = "Run, sweep and compare HUSE experiments described in YAML.")]
#[command(subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    global: Global,
}

/// Whether `args` (without the program name) parse as a command line, and clap's message
/// when they do not. Nothing runs: the docs' check of their command examples uses it.
pub fn parses(args: &[&str]) -> std::result::Result<(), String> {
    Cli::try_parse_from(std::iter::once("huse-run").chain(args.iter().copied())).map(|_| ()).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run an experiment (the default command).
    Run(RunArgs),
    /// Check an experiment file without running anything.
    Validate(RunArgs),
    /// List the stage kinds `uses:` can name.
    List(cmd::list::ListArgs),
    /// List runs with their varying params and final metrics.
    Runs(cmd::runs::RunsArgs),
    /// Everything about one run.
    Show(cmd::show::ShowArgs),
    /// Differing params and metrics of several runs, side by side.
    Compare(cmd::compare::CompareArgs),
    /// Write an HTML page with figures for an experiment, from the database alone.
    Report(cmd::report::ReportArgs),
    /// Export runs, params and metrics (long form) as CSV or JSON.
    Export(cmd::export::ExportArgs),
    /// Find items of a trained run by a sentence or a photo (nearest by cosine distance).
    Search(cmd::search::SearchArgs),
    /// A local web page: search trained runs by text or photo, side by side; item pages.
    Serve(cmd::serve::ServeArgs),
    /// The results app: experiments, a runs table with search, sorting, grouping and paging, run pages.
    Ui(cmd::ui::UiArgs),
    /// Write a trained run's image and text embeddings of its items (safetensors + ids.json).
    Embed(cmd::embed::EmbedArgs),
    /// The stage cache: `verify` checks every entry's outputs against their recorded hashes.
    Cache {
        #[command(subcommand)]
        cmd: cmd::cache::CacheCmd,
    },
    /// The results database: `replay` writes what earlier processes left spooled.
    Db {
        #[command(subcommand)]
        cmd: cmd::db::DbCmd,
    },
    /// The state of every run of an experiment: pending, running, succeeded, failed or
    /// cancelled, from the database and the cluster queue (logs of failed runs named).
    Status(RunArgs),
    /// A search's trials: their objectives (mean ± std over seeds), the best of each, and
    /// the Pareto front; `--report DIR` also writes its page with figures.
    Study(cmd::study::StudyArgs),
    /// Wait until no job of an experiment's cluster launches is queued or running; then
    /// print `status` (exit 1 if a run failed or was cancelled).
    Wait(RunArgs),
    /// (Internal) the entry point of a SLURM job of a launch.
    #[command(hide = true)]
    SlurmTask {
        /// The launch manifest.
        launch: PathBuf,
        /// Compute this shared stage job of the launch (else: the array task in SLURM_ARRAY_TASK_ID).
        #[arg(long)]
        shared: Option<usize>,
    },
    /// The run with the best final value of a metric.
    Best(cmd::best::BestArgs),
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    use clap::{CommandFactory, FromArgMatches};
    let parsed = Cli::command()
        .after_help(format!("Devices (`device:`, `--device`) in this build: {}.", huse_stage_kit::devices_built()))
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let mut cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    // Parsed here, not by clap: clap would echo the raw value, password and all.
    cli.global.db = match cli.global.db_arg.parse() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: --db / HUSE_DB: {e}");
            return 2;
        }
    };
    let display = if cli.global.quiet { Display::quiet() } else { Display::new() };
    init_logging(&cli.global, &display);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(dispatch(cli, display)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<cmd::UsageError>().is_some() { 2 } else { 1 }
        }
    }
}

fn init_logging(g: &Global, display: &Display) {
    use tracing_subscriber::EnvFilter;
    let default = match (g.quiet, g.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("{default},sqlx=warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(LogWriter(display.clone()))
        .try_init();
}

async fn dispatch(cli: Cli, display: Display) -> Result<i32> {
    let g = &cli.global;
    // A query piped into `head` ends quietly when the reader goes, as other Unix tools do
    // (runs and servers keep Rust's default: a closed pipe is an error they handle).
    if matches!(
        cli.cmd,
        Some(
            Cmd::List(_)
                | Cmd::Runs(_)
                | Cmd::Show(_)
                | Cmd::Compare(_)
                | Cmd::Best(_)
                | Cmd::Export(_)
                | Cmd::Search(_)
                | Cmd::Study(_)
        )
    ) {
        // SAFETY: sets a signal disposition before any other thread writes to stdout.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.cmd {
        None if cli.run.experiment.is_none() => {
            eprintln!("error: no experiment file given\n\nUsage: huse-run EXPERIMENT.yaml   (see huse-run --help)");
            Ok(2)
        }
        None => cmd::run::run(g, cli.run, &display).await,
        Some(Cmd::Run(a)) => cmd::run::run(g, a, &display).await,
        Some(Cmd::Validate(a)) => cmd::run::validate(&a),
        Some(Cmd::List(a)) => cmd::list::run(a),
        Some(Cmd::Runs(a)) => cmd::runs::run(g, a).await,
        Some(Cmd::Show(a)) => cmd::show::run(g, a).await,
        Some(Cmd::Compare(a)) => cmd::compare::run(g, a).await,
        Some(Cmd::Report(a)) => cmd::report::run(g, a).await,
        Some(Cmd::Export(a)) => cmd::export::run(g, a).await,
        Some(Cmd::Search(a)) => cmd::search::run(g, a).await,
        Some(Cmd::Serve(a)) => cmd::serve::run(g, a).await,
        Some(Cmd::Ui(a)) => cmd::ui::run(g, a).await,
        Some(Cmd::Embed(a)) => cmd::embed::run(g, a, &display).await,
        Some(Cmd::Cache { cmd }) => cmd::cache::run(g, cmd),
        Some(Cmd::Db { cmd }) => cmd::db::run(g, cmd).await,
        Some(Cmd::Study(a)) => cmd::study::run(g, &a).await,
        Some(Cmd::Status(a)) => cmd::cluster::status(g, &a, false).await,
        Some(Cmd::Wait(a)) => cmd::cluster::status(g, &a, true).await,
        Some(Cmd::SlurmTask { launch, shared }) => cmd::cluster::task(g, &launch, shared, &display).await,
        Some(Cmd::Best(a)) => cmd::best::run(g, a).await,
    }
}
