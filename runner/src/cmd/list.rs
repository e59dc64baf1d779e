//! `huse-run list`: the stage kinds `uses:` can name — inputs, outputs, version, source —
//! and the devices of this build.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use huse_report::table::{Cell, Format, Table};

use crate::builtin_registry;

/// `list`'s arguments.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Also list the stages of this plugin library (repeatable).
    #[arg(long = "plugin", value_name = "PATH")]
    pub plugins: Vec<PathBuf>,
}

/// Prints the table of stage kinds.
pub fn run(a: ListArgs) -> Result<i32> {
    let mut registry = builtin_registry();
    for p in &a.plugins {
        if let Err(e) = registry.load_plugin(p) {
            eprintln!("error: {e}");
            return Ok(2);
        }
    }
    let mut t = Table {
        headers: vec!["kind".into(), "version".into(), "takes".into(), "gives".into(), "source".into(), "about".into()],
        rows: vec![],
    };
    for (kind, e) in registry.entries() {
        let s = &e.stage;
        let takes = s.inputs().iter().map(|i| i.name.clone()).collect::<Vec<_>>().join(", ");
        let gives = s.outputs().iter().map(|o| o.name.clone()).collect::<Vec<_>>().join(", ");
        t.rows.push(
            [kind, s.version(), &takes, &gives, &e.source, s.describe()]
                .iter()
                .map(|x| Cell::Text(x.to_string()))
                .collect(),
        );
    }
    print!("{}", t.render(Format::Table));
    println!("devices: {}", huse_stage_kit::devices());
    Ok(0)
}
