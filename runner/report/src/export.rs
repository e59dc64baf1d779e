//! `huse-run export`: every run's params and metrics in long form, as CSV or JSON, made
//! from the results database alone.

use anyhow::{Result, bail};
use huse_store::{Filter, Store};

/// Writes runs, params and metrics in long form: one row per (run, kind, key, step).
/// An experiment that is not in the database is an error (nothing is written).
pub async fn export(store: &Store, experiment: Option<&str>, format: &str, out: &mut dyn std::io::Write) -> Result<()> {
    if let Some(e) = experiment {
        store.check_experiment(e).await?;
    }
    let runs = store.load_runs(&Filter { experiment: experiment.map(String::from), ..Default::default() }).await?;
    let mut rows: Vec<(i64, String, String, String, &'static str, String, Option<i64>, String)> = Vec::new();
    for r in &runs {
        for (k, v) in &r.params {
            rows.push((
                r.id,
                r.experiment.clone(),
                r.name.clone(),
                r.status.to_string(),
                "param",
                k.clone(),
                None,
                v.clone(),
            ));
        }
        for (key, step, v) in store.metric_series(r.id).await? {
            rows.push((
                r.id,
                r.experiment.clone(),
                r.name.clone(),
                r.status.to_string(),
                "metric",
                key,
                Some(step),
                v.map(|x| x.to_string()).unwrap_or_else(|| "NaN".into()),
            ));
        }
    }
    match format {
        "csv" => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(["run_id", "experiment", "run", "status", "kind", "key", "step", "value"])?;
            for (id, e, n, s, kind, k, step, v) in rows {
                w.write_record([
                    id.to_string(),
                    e,
                    n,
                    s,
                    kind.to_string(),
                    k,
                    step.map(|x| x.to_string()).unwrap_or_default(),
                    v,
                ])?;
            }
            w.flush()?;
        }
        "json" => {
            let arr: Vec<serde_json::Value> = rows
                .into_iter()
                .map(|(id, e, n, s, kind, k, step, v)| {
                    let value = if kind == "metric" { v.parse::<f64>().map(|x| serde_json::json!(x)).unwrap_or(serde_json::Value::Null) } else { serde_json::json!(v) };
                    serde_json::json!({"run_id": id, "experiment": e, "run": n, "status": s, "kind": kind, "key": k, "step": step, "value": value})
                })
                .collect();
            serde_json::to_writer_pretty(&mut *out, &arr)?;
            writeln!(out)?;
        }
        other => bail!("unknown export format `{other}` (csv or json)"),
    }
    Ok(())
}
