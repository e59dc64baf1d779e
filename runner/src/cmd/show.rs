//! `huse-run show RUN`: everything about one run — params, stages, metrics, summaries.

use anyhow::Result;
use clap::Args;
use std::collections::BTreeSet;

use huse_report::table::{self, Cell, Format};
use huse_store::RunStatus;

use super::{Global, open_for_queries, run_id};

/// `show`'s arguments.
#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The run (its id in the database).
    #[arg(value_parser = run_id)]
    pub run: i64,
    /// table, csv, json or markdown.
    #[arg(long, short = 'f', default_value = "table")]
    pub format: Format,
}

/// Prints the run's sections (and its summaries, as text formats).
pub async fn run(g: &Global, a: ShowArgs) -> Result<i32> {
    let store = open_for_queries(g).await?;
    let mut sections = table::show(&store, a.run).await?;
    let run = store.run(a.run).await?;
    if run.status == RunStatus::Running {
        // Which of its stages run now and which wait, from its DAG and the stages done.
        let (yaml, _) = store.run_config(a.run).await?;
        let done: BTreeSet<String> = store.stage_runs(a.run).await?.into_iter().map(|s| s.stage).collect();
        let (now, waiting) = stages_to_go(&yaml, &done);
        let info = &mut sections[0].1;
        info.rows.push(vec![Cell::Text("running now".into()), Cell::Text(now.join(", "))]);
        info.rows.push(vec![Cell::Text("waiting".into()), Cell::Text(waiting.join(", "))]);
    }
    print!("{}", table::render_sections(&sections, a.format));
    if matches!(a.format, Format::Table | Format::Markdown) {
        print!("{}", table::summaries_text(&store, a.run).await?);
    }
    Ok(0)
}

/// The stages of a run's resolved config (YAML) that are not `done`: those whose `needs` are
/// all done (running now, or about to) and the others (waiting), each by name.
fn stages_to_go(resolved_yaml: &str, done: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    let tree: serde_json::Value = serde_saphyr::from_str(resolved_yaml).unwrap_or_default();
    let (mut now, mut waiting) = (Vec::new(), Vec::new());
    let Some(stages) = tree.get("stages").and_then(|s| s.as_object()) else { return (now, waiting) };
    for (name, stage) in stages {
        if done.contains(name) {
            continue;
        }
        let needs = stage.get("needs").and_then(|n| n.as_array()).cloned().unwrap_or_default();
        if needs.iter().filter_map(|n| n.as_str()).all(|n| done.contains(n)) {
            now.push(name.clone());
        } else {
            waiting.push(name.clone());
        }
    }
    (now, waiting)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stages_whose_needs_are_done_run_now() {
        let yaml = "name: e\nstages:\n  ingest:\n    uses: ingest\n  encode:\n    uses: encode\n    needs: [ingest]\n  graph:\n    uses: graph\n    needs: [ingest]\n  train:\n    uses: train\n    needs: [encode, graph]\n";
        let done: BTreeSet<String> = ["ingest".to_string(), "graph".to_string()].into();
        let (now, waiting) = stages_to_go(yaml, &done);
        assert_eq!(now, ["encode"]);
        assert_eq!(waiting, ["train"]);
    }
}
