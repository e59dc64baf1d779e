//! `huse-run cache verify`: hash every cache entry's outputs; remove the damaged ones.

use anyhow::Result;
use clap::Subcommand;
use huse_exec::cache::Cache;

use super::Global;

/// `cache`'s subcommands.
#[derive(Subcommand, Debug)]
pub enum CacheCmd {
    /// Hash every entry's outputs; remove the entries that do not match (they are recomputed when next needed).
    Verify,
}

/// Runs the subcommand.
pub fn run(g: &Global, cmd: CacheCmd) -> Result<i32> {
    let CacheCmd::Verify = cmd;
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
    println!(
        "{good} entr{} whole, {bad} damaged and removed ({})",
        if good == 1 { "y" } else { "ies" },
        g.cache.display()
    );
    Ok(if bad > 0 { 1 } else { 0 })
}
