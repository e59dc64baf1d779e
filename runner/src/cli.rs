//! Command-line interface: flags are parsed here and turned into calls of the library.
//!
//! Exit codes: 0 success, 1 a run or command failed, 2 usage or experiment-file error,
//! 130 interrupted (Ctrl-C / SIGTERM).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use huse_stage_api::CancelToken;
use tracing::{error, info, warn};

use huse_config::{Diagnostic, Diagnostics, Overrides, Source};
use huse_exec::cache::Cache;
use huse_exec::progress::{Display, LogWriter};
use huse_exec::{self as exec, RunOptions};
use huse_registry::Registry;
use huse_report::table::{self, Cell, Format, Table};
use huse_store::{Cond, Filter, Location, RunStatus, Store};

use crate::builtin_registry;

mod cluster;

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

#[derive(Args, Debug, Clone)]
struct Global {
    /// Results database: a SQLite file path (taken verbatim), sqlite://PATH, or a PostgreSQL
    /// URL (postgres://USER[:PASSWORD]@HOST[:PORT]/DB).
    #[arg(long = "db", id = "db", global = true, env = "HUSE_DB", default_value = ".huse/runs.sqlite", value_name = "DB")]
    db_arg: String,
    /// `db_arg` parsed (in `main`, so that a refused location is never echoed with its password).
    #[arg(skip = Location::Sqlite(PathBuf::new()))]
    db: Location,
    /// Stage cache directory.
    #[arg(long, global = true, env = "HUSE_CACHE", default_value = ".huse/cache")]
    cache: PathBuf,
    /// More log output (-v: debug, -vv: trace); RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Args, Debug, Clone, Default)]
struct RunArgs {
    /// The experiment file.
    experiment: Option<PathBuf>,
    /// Override a key: `train.alpha=0.3` (a stage's `with:` key), `seed=7`, `stages.x.uses=y`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run each sweep point with this many seeds (seed, seed+1, ...).
    #[arg(long)]
    repeat: Option<u32>,
    /// Stages that may run at the same time (default: number of CPUs; 1 to 4096).
    #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    jobs: Option<u32>,
    /// Threads of every stage (default: the CPUs shared among the stages ready to run, never more in all than the CPUs)
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    threads_per_job: Option<u32>,
    /// Stages that may compute on one GPU at the same time (trainings of a sweep share it;
    /// the CPU cores are shared out among all the stages running).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    gpu_slots: u32,
    /// Check the content hash of every cached output before using it (sizes are always checked).
    #[arg(long)]
    verify: bool,
    /// Refuse experiments with more runs than this (sweep points x seeds).
    #[arg(long, value_name = "N", default_value_t = huse_config::MAX_RUNS)]
    max_runs: usize,
    /// Recompute this stage even if its output is cached (repeatable).
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
    /// Recompute every stage (and refresh the cache).
    #[arg(long)]
    no_cache: bool,
    /// Load stage kinds from this plugin library (repeatable), besides the experiment's `plugins:`.
    #[arg(long = "plugin", value_name = "PATH")]
    plugins: Vec<PathBuf>,
    /// Where the runs go: `local` (this machine) or `slurm` (submit to the cluster; settings
    /// in the file's `launcher:` block). Default: the block's `kind`, else local.
    #[arg(long, value_name = "local|slurm")]
    launcher: Option<String>,
    /// With the SLURM launcher: return once the jobs are submitted (print their ids);
    /// `huse-run status` and `huse-run wait` follow them.
    #[arg(long)]
    detach: bool,
}

#[derive(Args, Debug, Clone)]
struct FilterArgs {
    /// Only runs of this experiment.
    #[arg(long, short = 'e')]
    experiment: Option<String>,
    /// Only runs with this status (running, succeeded, failed, interrupted).
    #[arg(long)]
    status: Option<RunStatus>,
    /// Condition on a param or a final metric, e.g. `train.beta=0.5` or `test.t2i.r1>0.6` (repeatable, all must hold).
    #[arg(long = "where", short = 'w', value_name = "COND")]
    conds: Vec<Cond>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run an experiment (the default command).
    Run(RunArgs),
    /// Check an experiment file without running anything.
    Validate(RunArgs),
    /// List the stage kinds `uses:` can name.
    List {
        /// Also list the stages of this plugin library (repeatable).
        #[arg(long = "plugin", value_name = "PATH")]
        plugins: Vec<PathBuf>,
    },
    /// List runs with their varying params and final metrics.
    Runs {
        #[command(flatten)]
        filter: FilterArgs,
        /// Metrics to show (glob, repeatable; default all).
        #[arg(long = "metric", short = 'm', value_name = "GLOB")]
        metrics: Vec<String>,
        /// Sort by a column (param, metric, id, name, status).
        #[arg(long)]
        sort: Option<String>,
        /// Sort descending.
        #[arg(long)]
        desc: bool,
        /// At most this many rows.
        #[arg(long)]
        limit: Option<usize>,
        /// One row per param combination (seeds pooled): mean ± std of each metric.
        #[arg(long)]
        group: bool,
        /// table, csv, json or markdown.
        #[arg(long, short = 'f', default_value = "table")]
        format: Format,
    },
    /// Everything about one run.
    Show {
        #[arg(value_parser = run_id)]
        run: i64,
        /// table, csv, json or markdown.
        #[arg(long, short = 'f', default_value = "table")]
        format: Format,
    },
    /// Differing params and metrics of several runs, side by side.
    Compare {
        #[arg(required = true, num_args = 2.., value_parser = run_id)]
        runs: Vec<i64>,
        #[arg(long = "metric", short = 'm', value_name = "GLOB")]
        metrics: Vec<String>,
        /// table, csv, json or markdown.
        #[arg(long, short = 'f', default_value = "table")]
        format: Format,
    },
    /// Write an HTML page with figures for an experiment, from the database alone.
    Report {
        experiment: String,
        /// Output folder (default: report-EXPERIMENT).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Final metrics to show and plot (glob, repeatable; default test.* when present, else all).
        #[arg(long = "metric", short = 'm', value_name = "GLOB")]
        metrics: Vec<String>,
    },
    /// Export runs, params and metrics (long form) as CSV or JSON.
    Export {
        #[arg(long, short = 'e')]
        experiment: Option<String>,
        #[arg(long, short = 'f', default_value = "csv")]
        format: String,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Find items of a trained run by a sentence or a photo (nearest by cosine distance).
    Search {
        /// The run (its id in the database).
        #[arg(value_parser = run_id)]
        run: i64,
        /// A text query, e.g. "red floral summer dress" (the same as --text).
        #[arg(value_name = "TEXT", conflicts_with_all = ["text", "image"])]
        query: Option<String>,
        /// A text query, e.g. "red floral summer dress".
        #[arg(long, conflicts_with = "image", required_unless_present_any = ["image", "query"])]
        text: Option<String>,
        /// An image query (JPEG or PNG).
        #[arg(long)]
        image: Option<PathBuf>,
        /// How many results.
        #[arg(short, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
        k: u32,
        /// Search the items' image or text embeddings.
        #[arg(long, default_value = "image")]
        modality: huse_search::Modality,
        /// Where the encoders and towers run: auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// table, csv, json or markdown.
        #[arg(long, short = 'f', default_value = "table")]
        format: Format,
    },
    /// A local web page: search trained runs by text or photo, side by side; item pages.
    Serve {
        /// The runs (ids in the database); their results are shown side by side.
        #[arg(required = true, value_parser = run_id)]
        runs: Vec<i64>,
        /// Port (0: any free one; the address is printed).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Address to bind; the default serves this machine only.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Where the encoders and towers run: auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Write a trained run's image and text embeddings of its items (safetensors + ids.json).
    Embed {
        /// The run (its id in the database).
        #[arg(value_parser = run_id)]
        run: i64,
        /// Which items: all, train, val or test.
        #[arg(long, default_value = "all")]
        split: String,
        /// Output folder (default: embed-RUN).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Embed a new table instead: a folder in the run's ingest layout (its table and
        /// image names as the run's ingest stage read them), every usable row.
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// Where the encoders and towers run: auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// The stage cache: `verify` checks every entry's outputs against their recorded hashes.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
    /// The results database: `replay` writes what earlier processes left spooled.
    Db {
        #[command(subcommand)]
        cmd: DbCmd,
    },
    /// The state of every run of an experiment: pending, running, succeeded, failed or
    /// cancelled, from the database and the cluster queue (logs of failed runs named).
    Status(RunArgs),
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
    Best {
        #[arg(long, short = 'm')]
        metric: String,
        /// Lower is better.
        #[arg(long)]
        min: bool,
        #[command(flatten)]
        filter: FilterArgs,
        /// table, csv, json or markdown.
        #[arg(long, short = 'f', default_value = "table")]
        format: Format,
    },
}

#[derive(Subcommand, Debug)]
enum CacheCmd {
    /// Hash every entry's outputs; remove the entries that do not match (they are recomputed when next needed).
    Verify,
}

#[derive(Subcommand, Debug)]
enum DbCmd {
    /// Write the records that processes which could not reach the database left spooled.
    Replay,
    /// Copy finished runs from one results database into another (e.g. a laptop's SQLite
    /// into the group's PostgreSQL); runs the destination already has are skipped.
    Copy {
        /// Source database (path or URL).
        src: String,
        /// Destination database (path or URL; created/migrated if needed).
        dst: String,
        /// Only runs of this experiment.
        #[arg(long, short = 'e')]
        experiment: Option<String>,
    },
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
    let result = rt.block_on(dispatch(cli, display));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

fn init_logging(g: &Global, display: &Display) {
    use tracing_subscriber::EnvFilter;
    let default = if g.quiet {
        "warn"
    } else {
        match g.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
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
    let g = cli.global.clone();
    match cli.cmd {
        None => match cli.run.experiment.clone() {
            Some(_) => run(&g, cli.run, &display).await,
            None => {
                eprintln!("error: no experiment file given\n\nUsage: huse-run EXPERIMENT.yaml   (see huse-run --help)");
                Ok(2)
            }
        },
        Some(Cmd::Run(a)) => run(&g, a, &display).await,
        Some(Cmd::Validate(a)) => {
            let file = a.experiment.clone().context("validate needs an experiment file")?;
            match compile(&file, &a) {
                Ok((exp, _, _)) => {
                    println!("{}: ok ({} run(s), {} stage(s) each)", file.display(), exp.runs.len(), exp.runs[0].stages.len());
                    Ok(0)
                }
                Err(d) => {
                    eprintln!("{d}");
                    Ok(2)
                }
            }
        }
        Some(Cmd::List { plugins }) => {
            let mut registry = builtin_registry();
            for p in &plugins {
                if let Err(e) = registry.load_plugin(p) {
                    eprintln!("error: {e}");
                    return Ok(2);
                }
            }
            let mut t = Table { headers: vec!["kind".into(), "version".into(), "takes".into(), "gives".into(), "source".into(), "about".into()], rows: vec![] };
            for (kind, e) in registry.entries() {
                let s = &e.stage;
                let takes = s.inputs().iter().map(|i| i.name.clone()).collect::<Vec<_>>().join(", ");
                let gives = s.outputs().iter().map(|o| o.name.clone()).collect::<Vec<_>>().join(", ");
                t.rows.push(
                    [kind, s.version(), &takes, &gives, &e.source, s.describe()].iter().map(|x| Cell::Text(x.to_string())).collect(),
                );
            }
            print!("{}", t.render(Format::Table));
            println!("devices: {}", huse_stage_kit::devices());
            Ok(0)
        }
        Some(Cmd::Runs { filter, metrics, sort, desc, limit, group, format }) => {
            let store = open_for_queries(&g).await?;
            warn_unknown_conds(&store, &filter).await?;
            let runs = store.load_runs(&to_filter(filter)).await?;
            let mut t = table::runs_table(&runs, &table::patterns(&metrics)?, group);
            if let Some(s) = sort {
                t.sort_by(&s, desc)?;
            } else if desc {
                t.rows.reverse();
            }
            if let Some(n) = limit {
                t.rows.truncate(n);
            }
            print!("{}", t.render(format));
            Ok(0)
        }
        Some(Cmd::Show { run, format }) => {
            let store = open_for_queries(&g).await?;
            print!("{}", table::render_sections(&table::show(&store, run).await?, format));
            if matches!(format, Format::Table | Format::Markdown) {
                print!("{}", table::summaries_text(&store, run).await?);
            }
            Ok(0)
        }
        Some(Cmd::Compare { runs, metrics, format }) => {
            let store = open_for_queries(&g).await?;
            let all = store.load_runs(&Filter::default()).await?;
            let mut chosen = Vec::new();
            for id in &runs {
                chosen.push(all.iter().find(|r| r.id == *id).cloned().with_context(|| format!("no run with id {id}"))?);
            }
            print!("{}", table::compare_table(&chosen, &table::patterns(&metrics)?).render(format));
            Ok(0)
        }
        Some(Cmd::Report { experiment, out, metrics }) => {
            let store = open_for_queries(&g).await?;
            let out = out.unwrap_or_else(|| huse_report::default_out(&experiment));
            let figs = huse_report::report(&store, &experiment, &out, &metrics).await?;
            println!("{} ({} figures)", out.join("index.html").display(), figs.len());
            Ok(0)
        }
        Some(Cmd::Export { experiment, format, out }) => {
            // Check everything before touching the output file; then write a temporary
            // file beside it and rename, so an existing file is never left half-written.
            if !["csv", "json"].contains(&format.as_str()) {
                eprintln!("error: unknown export format `{format}` (csv or json)");
                return Ok(2);
            }
            let store = open_for_queries(&g).await?;
            match out {
                Some(p) => {
                    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
                    let tmp = tempfile_in(dir, &p)?;
                    let written = async {
                        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?);
                        huse_report::export(&store, experiment.as_deref(), &format, &mut f).await?;
                        std::io::Write::flush(&mut f)?;
                        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                        std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))
                    }
                    .await;
                    if written.is_err() {
                        let _ = std::fs::remove_file(&tmp);
                    }
                    written?;
                }
                None => huse_report::export(&store, experiment.as_deref(), &format, &mut std::io::stdout()).await?,
            }
            Ok(0)
        }
        Some(Cmd::Search { run, query, text, image, k, modality, device, format }) => {
            let text = text.or(query);
            let store = open_for_queries(&g).await?;
            let files = run_files(&store, run).await?;
            store.close().await;
            let searcher = huse_search::Searcher::open(&files, &g.cache.join(".index"), &device_arg(&device)?)?;
            let q = match (&text, &image) {
                (Some(t), _) => searcher.embed_text(t)?,
                (None, Some(p)) => searcher.embed_image(p)?,
                (None, None) => unreachable!("clap requires one"),
            };
            let mut t = Table { headers: ["rank", "id", "title", "class", "split", "distance"].iter().map(|s| s.to_string()).collect(), rows: vec![] };
            for (i, h) in searcher.search(&q, modality, k as usize).into_iter().enumerate() {
                t.rows.push(vec![
                    Cell::Int(i as i64 + 1),
                    Cell::Text(h.id),
                    Cell::Text(h.title),
                    Cell::Text(h.class),
                    Cell::Text(format!("{:?}", h.split).to_lowercase()),
                    Cell::Num(Some(f64::from(h.distance))),
                ]);
            }
            print!("{}", t.render(format));
            Ok(0)
        }
        Some(Cmd::Serve { runs, port, host, device }) => {
            let store = open_for_queries(&g).await?;
            let mut views = Vec::new();
            for run in &runs {
                let files = run_files(&store, *run).await?;
                let name = store.run(*run).await?.name;
                let index = g.cache.join(".index");
                let dev = device_arg(&device)?;
                let searcher = tokio::task::spawn_blocking(move || huse_search::Searcher::open(&files, &index, &dev)).await??;
                views.push(huse_serve::RunView::new(format!("#{run} {name}"), searcher)?);
            }
            store.close().await;
            huse_serve::serve(views, std::net::SocketAddr::new(host, port), |addr| {
                println!("serving {} run(s) on http://{addr}/ (Ctrl-C to stop)", runs.len());
            })
            .await?;
            Ok(0)
        }
        Some(Cmd::Embed { run, split, out, data, device }) => {
            let keep: Option<huse_data::Split> = match split.as_str() {
                "all" => None,
                "train" => Some(huse_data::Split::Train),
                "val" => Some(huse_data::Split::Val),
                "test" => Some(huse_data::Split::Test),
                other => {
                    eprintln!("error: --split {other}: expected all, train, val or test");
                    return Ok(2);
                }
            };
            let store = open_for_queries(&g).await?;
            let files = run_files(&store, run).await?;
            store.close().await;
            let searcher = huse_search::Searcher::open(&files, &g.cache.join(".index"), &device_arg(&device)?)?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("embed-{run}")));
            let n = match data {
                None => huse_search::write_embeddings(&searcher, keep, &out)?,
                Some(dir) => embed_new_table(&searcher, &files, &dir, &out, &display)?,
            };
            println!("{} ({n} items: embeddings.safetensors with `image` and `text` ({n} x {}), ids.json)", out.display(), searcher.dim());
            Ok(0)
        }
        Some(Cmd::Cache { cmd: CacheCmd::Verify }) => {
            let cache = Cache::open(&g.cache)?;
            let (mut good, mut bad) = (0, 0);
            for (kind, key) in cache.entries() {
                match cache.check(&kind, &key, true) {
                    Ok(_) => good += 1,
                    Err(why) => {
                        bad += 1;
                        println!("{kind}/{key}: {why}; removed");
                        cache.remove(&kind, &key)?;
                    }
                }
            }
            println!("{good} entr{} whole, {bad} damaged and removed ({})", if good == 1 { "y" } else { "ies" }, g.cache.display());
            Ok(if bad > 0 { 1 } else { 0 })
        }
        Some(Cmd::Db { cmd: DbCmd::Replay }) => {
            let mut opts = store_options(&g)?;
            opts.replay_on_open = false;
            let store = Store::open(&g.db, opts).await?;
            let r = store.replay_spools().await?;
            let mut remain = 0usize;
            for (f, why) in &r.left {
                remain += 1;
                eprintln!("error: spool {} was not written (kept for the next replay): {why}", f.display());
            }
            for (f, why) in store.unreadable_spools().await {
                remain += 1;
                eprintln!("error: spool {} could not be read (left in place): {why}", f.display());
            }
            for (f, why, n) in store.set_aside_spools().await {
                remain += 1;
                eprintln!("error: spool {} ({n} record(s)) was set aside and will not be written: {why}; inspect it, then delete it", f.display());
            }
            if remain > 0 {
                eprintln!("{} record(s) written; {remain} spool(s) remain unwritten in {}", r.written, g.db);
                return Ok(1);
            }
            println!("results database {} is up to date ({} spooled record(s) written)", g.db, r.written);
            Ok(0)
        }
        Some(Cmd::Db { cmd: DbCmd::Copy { src, dst, experiment } }) => {
            let (src, dst): (Location, Location) = match (src.parse(), dst.parse()) {
                (Ok(s), Ok(d)) => (s, d),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("error: db copy: {e}");
                    return Ok(2);
                }
            };
            if src == dst {
                eprintln!("error: db copy: source and destination are the same database ({src})");
                return Ok(2);
            }
            let from = Store::open_read_only(&src).await?;
            let to = Store::open(&dst, store_options(&g)?).await?;
            let done = huse_store::copy::copy(&from, &to, experiment.as_deref()).await?;
            to.close().await;
            println!(
                "copied {} run(s) from {src} into {dst}; {} already there{}",
                done.copied,
                done.skipped,
                if done.running > 0 { format!("; {} still running, left out (copy again later)", done.running) } else { String::new() }
            );
            Ok(0)
        }
        Some(Cmd::Status(a)) => cluster::status(&g, &a, false).await,
        Some(Cmd::Wait(a)) => cluster::status(&g, &a, true).await,
        Some(Cmd::SlurmTask { launch, shared }) => cluster::task(&g, &launch, shared, &display).await,
        Some(Cmd::Best { metric, min, filter, format }) => {
            let store = open_for_queries(&g).await?;
            warn_unknown_conds(&store, &filter).await?;
            let runs = store.load_runs(&to_filter(filter)).await?;
            print!("{}", table::best_table(&runs, &metric, min)?.render(format));
            Ok(0)
        }
    }
}

/// Where run `run`'s ingest, encode and train outputs are, from the database.
async fn run_files(store: &Store, run: i64) -> Result<huse_search::RunFiles> {
    let info = store.run(run).await?;
    let stages = store.stage_runs(run).await?;
    let find = |kind: &str| {
        stages
            .iter()
            .find(|s| s.kind == kind && s.status == huse_store::StageStatus::Succeeded && s.output_dir.is_some())
            .with_context(|| format!("run {run} ({}) has no succeeded `{kind}` stage; search needs a trained HUSE run", info.name))
    };
    let (ingest, encode, train) = (find("ingest")?, find("encode")?, find("train")?);
    for s in [ingest, encode, train] {
        let dir = PathBuf::from(s.output_dir.as_ref().unwrap());
        if !dir.is_dir() {
            anyhow::bail!("run {run}: the `{}` output {} is no longer in the cache; run the experiment again to recreate it", s.stage, dir.display());
        }
    }
    let (yaml, _) = store.run_config(run).await?;
    let config: serde_json::Value = serde_saphyr::from_str(&yaml).context("the run's resolved config")?;
    Ok(huse_search::RunFiles {
        ingest_dir: ingest.output_dir.clone().unwrap().into(),
        encode_dir: encode.output_dir.clone().unwrap().into(),
        train_dir: train.output_dir.clone().unwrap().into(),
        encode_config: config["stages"][&encode.stage]["with"].clone(),
        ingest_config: config["stages"][&ingest.stage]["with"].clone(),
        index_key: format!("{}-{}", train.cache_key, encode.cache_key),
    })
}

/// Reads a new table in the run's ingest layout (the run's ingest stage, with `root` set to
/// `dir` and every usable row kept) and embeds its items with the run; returns N.
fn embed_new_table(searcher: &huse_search::Searcher, files: &huse_search::RunFiles, dir: &std::path::Path, out: &std::path::Path, display: &Display) -> Result<usize> {
    use huse_stage_api::Progress as _;
    let mut cfg = files.ingest_config.clone();
    if !cfg.is_object() {
        cfg = serde_json::json!({});
    }
    let root = std::path::absolute(dir).with_context(|| format!("{}", dir.display()))?;
    cfg["root"] = serde_json::json!(root);
    cfg["min_items_per_class"] = serde_json::json!(1);
    cfg["limit"] = serde_json::Value::Null;
    cfg["per_class_cap"] = serde_json::Value::Null;
    let tmp = tempfile::tempdir()?;
    huse_stage_api::testing::run(&huse_stage_ingest::Ingest, &cfg, &Default::default(), &tmp.path().join("ingest"), 0)
        .map_err(|e| anyhow::anyhow!("reading {} as the run's ingest stage would: {e}", dir.display()))?;
    let items = huse_data::read_items(&tmp.path().join("ingest").join(huse_data::Artifact::Items))?;
    let bar = display.stage("embed");
    bar.start("texts", Some(items.len() as u64), "items");
    let texts: Vec<&str> = items.iter().map(|i| i.text.as_str()).collect();
    let text = searcher.embed_texts(&texts, 64, &mut |n| bar.inc(n as u64))?;
    bar.start("images", Some(items.len() as u64), "img");
    let paths: Vec<&std::path::Path> = items.iter().map(|i| std::path::Path::new(&i.image)).collect();
    let image = searcher.embed_images(&paths, 32, &mut |n| bar.inc(n as u64))?;
    bar.finish();
    let ids: Vec<String> = items.iter().map(|i| i.id.clone()).collect();
    huse_search::write_embedding_files(image, text, &ids, searcher.dim(), out)
}

/// A run's id on the command line: a positive number, as `huse-run runs` lists them; anything
/// else (a query typed where the id goes, an experiment's name) gets an error that says so.
fn run_id(s: &str) -> std::result::Result<i64, String> {
    match s.trim().parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(format!("a run is named by its id, a number (`huse-run runs` lists them), not '{s}'")),
    }
}

/// The candle device for `--device` (auto: a GPU when this build and machine have one).
fn device_arg(spec: &str) -> Result<candle_core::Device> {
    let spec: huse_stage_api::DeviceSpec = spec.parse().map_err(anyhow::Error::msg)?;
    huse_stage_kit::device_of(spec).map_err(|e| anyhow::anyhow!("{e}"))
}

/// A temporary file name beside `target`.
fn tempfile_in(dir: &std::path::Path, target: &std::path::Path) -> Result<PathBuf> {
    let name = target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "export".into());
    Ok(dir.join(format!(".{name}.{}.tmp", std::process::id())))
}

/// The store options: the busy timeout and retry window from the environment, and the
/// cache's `.spool/` as the fallback spool folder.
fn store_options(g: &Global) -> Result<huse_store::Options> {
    let mut o = huse_store::Options::from_env()?;
    o.fallback_spool_dir = Some(g.cache.join(".spool"));
    Ok(o)
}

/// Opens the database read-only for a query, warning about records still spooled (beside
/// the database or in the cache's fallback spool) or set aside.
async fn open_for_queries(g: &Global) -> Result<Store> {
    let db = &g.db;
    let store = Store::open_read_only_with(db, Some(g.cache.join(".spool"))).await?;
    let n = store.spooled().await;
    if n > 0 {
        warn!("{n} record(s) are spooled and not yet in {db}; `huse-run db replay` writes them");
    }
    let aside = store.set_aside_spools().await;
    if !aside.is_empty() {
        warn!("{} spool(s) of records that cannot be written to {db} were set aside; `huse-run db replay` names them", aside.len());
    }
    Ok(store)
}

/// Warns about `-w` keys that no run (of the `-e` experiment, when given) has as a param
/// or metric: a misspelt key would otherwise just match nothing. An unknown `-e` is an error.
async fn warn_unknown_conds(store: &Store, f: &FilterArgs) -> Result<()> {
    if let Some(e) = &f.experiment {
        store.check_experiment(e).await?;
    }
    if f.conds.is_empty() {
        return Ok(());
    }
    let all = store.load_runs(&Filter { experiment: f.experiment.clone(), ..Default::default() }).await?;
    let keys: Vec<&str> = f.conds.iter().map(|c| c.key.as_str()).collect();
    for (k, near) in table::unknown_keys(&all, &keys) {
        warn!("no run has a param or metric `{k}`{}", near.map(|n| format!(" (did you mean `{n}`?)")).unwrap_or_default());
    }
    Ok(())
}

fn to_filter(f: FilterArgs) -> Filter {
    Filter { experiment: f.experiment, status: f.status, conds: f.conds }
}

fn overrides(a: &RunArgs) -> Overrides {
    Overrides { set: a.set.clone(), repeat: a.repeat, force: a.force.clone(), max_runs: Some(a.max_runs) }
}

/// Reads the experiment file once, loads the plugins it and the command line name, and
/// compiles it; returns the experiment, the registry it was compiled against, and the
/// parsed file (for what is not part of a run, such as the `launcher:` block).
fn compile(file: &std::path::Path, a: &RunArgs) -> Result<(huse_config::Experiment, Registry, Source), Diagnostics> {
    let source = Source::read(file)?;
    let env = |k: &str| std::env::var(k).ok();
    let mut registry = builtin_registry();
    load_plugins(&source, &a.plugins, &mut registry, &env)?;
    let exp = huse_config::compile(&source, &overrides(a), &registry, &env)?;
    Ok((exp, registry, source))
}

/// Loads the plugins of the file's `plugins:` list and of `--plugin` flags into `registry`;
/// errors point at the list entry or the flag.
fn load_plugins(source: &Source, cli: &[PathBuf], registry: &mut Registry, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Diagnostics> {
    let mut diags = Vec::new();
    for p in source.plugins(env) {
        if let Err(e) = registry.load_plugin(&p.path) {
            diags.push(Diagnostic { file: source.display.clone(), origin: p.origin, path: p.key, message: e });
        }
    }
    for p in cli {
        if let Err(e) = registry.load_plugin(p) {
            let origin = huse_config::yaml::Origin::Arg(format!("--plugin {}", p.display()));
            diags.push(Diagnostic { file: source.display.clone(), origin, path: String::new(), message: e });
        }
    }
    if diags.is_empty() { Ok(()) } else { Err(Diagnostics(diags)) }
}

async fn run(g: &Global, a: RunArgs, display: &Display) -> Result<i32> {
    let file = a.experiment.clone().context("no experiment file given")?;
    // Everything is validated before the database or the cache is touched.
    let (exp, registry, source) = match compile(&file, &a) {
        Ok(x) => x,
        Err(d) => {
            eprintln!("{d}");
            return Ok(2);
        }
    };
    match cluster::launcher_of(&source, &a) {
        Ok(Some(cfg)) => return cluster::launch(g, &a, &exp, &registry, &cfg, display).await,
        Ok(None) => {}
        Err(e) => {
            eprintln!("{e}");
            return Ok(2);
        }
    }
    let jobs = a.jobs.map(|j| j as usize).unwrap_or_else(huse_exec::Cores::available);
    let opts = RunOptions {
        jobs,
        force: a.force.clone(),
        no_cache: a.no_cache,
        verify: a.verify,
        threads_per_job: a.threads_per_job.map(|t| t as usize),
        gpu_slots: a.gpu_slots as usize,
        auto_gpu: huse_stage_kit::auto_gpu(),
        ..RunOptions::default()
    };
    run_compiled(g, &g.db, &exp, &registry, &opts, display).await
}

/// Runs a compiled experiment on this machine against the database at `db`, prints the
/// summaries and the outcome table; returns the exit code.
async fn run_compiled(g: &Global, db: &Location, exp: &huse_config::Experiment, registry: &Registry, opts: &RunOptions, display: &Display) -> Result<i32> {
    let (exp, registry, opts) = (exp, registry, opts);
    let cancel = CancelToken::new();
    spawn_signal_handler(cancel.clone());
    let cache = Cache::open(&g.cache)?;
    let store = Store::open(db, store_options(g)?).await?;
    let reaped = store.reap_dead_runs().await?;
    if reaped > 0 {
        warn!("marked {reaped} run(s) of dead processes as interrupted");
    }
    let outcome = exec::execute(exp, registry, &store, &cache, opts, display, &cancel).await?;
    let outcomes = &outcome.runs;
    // Stage summaries (e.g. the evaluation tables) of each finished run (from the database:
    // not when it could not take the results).
    for o in outcomes.iter().filter(|_| outcome.results_incomplete.is_none()) {
        let text = table::summaries_text(&store, o.id).await.unwrap_or_default();
        if !text.is_empty() {
            display.suspend(|| println!("run {} ({}):\n{text}", o.id, o.name));
        }
    }
    store.close().await;

    let mut t = Table { headers: vec!["run".into(), "name".into(), "status".into(), "computed".into(), "cached".into(), "error".into()], rows: vec![] };
    for o in outcomes {
        t.rows.push(vec![
            Cell::Int(o.id),
            Cell::Text(o.name.clone()),
            Cell::Text(o.status.to_string()),
            Cell::Int(o.computed as i64),
            Cell::Int(o.cached as i64),
            Cell::Text(o.error.clone().unwrap_or_default()),
        ]);
    }
    display.suspend(|| print!("{}", t.render(Format::Table)));
    if let Some(why) = &outcome.results_incomplete {
        error!("not every result reached the database: {why}");
        return Ok(1);
    }
    info!("results in {db}; `huse-run show RUN` for details");
    Ok(if cancel.is_cancelled() || outcomes.iter().any(|o| o.status == RunStatus::Interrupted) {
        130
    } else if outcomes.iter().any(|o| o.status == RunStatus::Failed) {
        1
    } else {
        0
    })
}

/// First SIGINT/SIGTERM: cancel running stages and let the run end cleanly. Second: exit now.
fn spawn_signal_handler(cancel: CancelToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
            warn!("cannot install signal handlers");
            return;
        };
        for n in 0.. {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                warn!("interrupted: cancelling running stages (press Ctrl-C again to exit at once)");
                cancel.cancel();
            } else {
                eprintln!("interrupted twice: exiting now");
                std::process::exit(130);
            }
        }
    });
}
