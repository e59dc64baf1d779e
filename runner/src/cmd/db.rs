//! `huse-run db replay` and `db copy`: the results database's own upkeep.

use anyhow::Result;
use clap::Subcommand;
use huse_store::{Location, Store};

use super::{Global, store_options};

/// `db`'s subcommands.
#[derive(Subcommand, Debug)]
pub enum DbCmd {
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

/// Runs the subcommand.
pub async fn run(g: &Global, cmd: DbCmd) -> Result<i32> {
    match cmd {
        DbCmd::Replay => replay(g).await,
        DbCmd::Copy { src, dst, experiment } => copy(g, &src, &dst, experiment.as_deref()).await,
    }
}

/// Writes what is spooled; names every spool that remains unwritten and exits 1 while any does.
async fn replay(g: &Global) -> Result<i32> {
    let mut opts = store_options(g)?;
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
        eprintln!(
            "error: spool {} ({n} record(s)) was set aside and will not be written: {why}; inspect it, then delete it",
            f.display()
        );
    }
    if remain > 0 {
        eprintln!("{} record(s) written; {remain} spool(s) remain unwritten in {}", r.written, g.db);
        return Ok(1);
    }
    println!("results database {} is up to date ({} spooled record(s) written)", g.db, r.written);
    Ok(0)
}

async fn copy(g: &Global, src: &str, dst: &str, experiment: Option<&str>) -> Result<i32> {
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
    let to = Store::open(&dst, store_options(g)?).await?;
    let done = huse_store::copy::copy(&from, &to, experiment).await?;
    to.close().await;
    println!(
        "copied {} run(s) from {src} into {dst}; {} already there{}",
        done.copied,
        done.skipped,
        if done.running > 0 {
            format!("; {} still running, left out (copy again later)", done.running)
        } else {
            String::new()
        }
    );
    Ok(0)
}
