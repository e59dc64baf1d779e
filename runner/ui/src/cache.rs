//! The app's memory of the results database, so that a page of an experiment with 100,000
//! runs does not read millions of metric rows per request: every run's fields and params,
//! and the final values of only the metric keys some page has asked for. Each request first
//! brings it up to date with what changed since the last one ([`Store::changes_since`]: runs
//! recorded, runs that logged metrics) and rereads the runs still running; a key no page had
//! asked for is read once, for every run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use anyhow::Result;
use huse_store::{RunRow, RunStatus, Slice, Store};

/// Which metrics a page needs.
#[derive(Debug, Clone)]
pub(crate) enum Want {
    /// These shown names (keys, or `stage.key`) and those the patterns match.
    Names(BTreeSet<String>, Vec<glob::Pattern>),
    /// Every one.
    All,
}

#[derive(Default)]
struct State {
    /// The newest run and metric row seen.
    run_id: i64,
    metric_id: i64,
    /// Each experiment's runs by id, shared with the requests that read them (a change
    /// copies the list only while a request still holds the old one).
    runs: BTreeMap<String, Arc<Vec<RunRow>>>,
    /// Each cached run's experiment.
    exp_of: HashMap<i64, String>,
    /// Metric keys (as logged) whose final values every cached run carries.
    keys: BTreeSet<String>,
    /// Every (stage, key) each experiment's runs logged.
    logged: BTreeMap<String, BTreeSet<(String, String)>>,
}

impl State {
    /// The names a query or column can use for `exp`'s metrics: each key, and `stage.key` for
    /// a key that several stages log.
    fn names(&self, exp: &str) -> BTreeSet<String> {
        let Some(pairs) = self.logged.get(exp) else { return BTreeSet::new() };
        let mut stages: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, k) in pairs {
            *stages.entry(k).or_default() += 1;
        }
        let mut out: BTreeSet<String> = BTreeSet::new();
        for (s, k) in pairs {
            out.insert(k.clone());
            if stages[k.as_str()] > 1 {
                out.insert(format!("{s}.{k}"));
            }
        }
        out
    }

    /// The logged keys behind shown names (`stage.key` -> `key`) and names the patterns match.
    fn keys_of(&self, names: &BTreeSet<String>, patterns: &[glob::Pattern]) -> BTreeSet<String> {
        let all: BTreeSet<&(String, String)> = self.logged.values().flatten().collect();
        let mut names = names.clone();
        if !patterns.is_empty() {
            let exps: Vec<&String> = self.logged.keys().collect();
            names
                .extend(exps.into_iter().flat_map(|e| self.names(e)).filter(|n| patterns.iter().any(|p| p.matches(n))));
        }
        let mut out = BTreeSet::new();
        for n in &names {
            for (s, k) in &all {
                if n == k || n.strip_prefix(s.as_str()).and_then(|r| r.strip_prefix('.')) == Some(k.as_str()) {
                    out.insert(k.clone());
                }
            }
        }
        out
    }

    /// Puts a run (new or reread) in its place.
    fn put(&mut self, r: RunRow) {
        self.exp_of.insert(r.id, r.experiment.clone());
        let list = Arc::make_mut(self.runs.entry(r.experiment.clone()).or_default());
        match list.binary_search_by_key(&r.id, |x| x.id) {
            Ok(i) => list[i] = r,
            Err(i) => list.insert(i, r),
        }
    }

    fn learn(&mut self, logged: Vec<(String, String, String)>) {
        for (e, s, k) in logged {
            self.logged.entry(e).or_default().insert((s, k));
        }
    }
}

/// See the module doc.
#[derive(Default)]
pub(crate) struct Cache {
    state: tokio::sync::Mutex<Option<State>>,
}

impl Cache {
    /// The logged keys behind shown metric names (`stage.key` or `key`).
    pub(crate) async fn logged_keys(&self, names: &BTreeSet<String>) -> Vec<String> {
        let guard = self.state.lock().await;
        let Some(st) = guard.as_ref() else { return Vec::new() };
        st.keys_of(names, &[]).into_iter().collect()
    }
}

/// Runs reread at a time.
const CHUNK: usize = 2000;

impl Cache {
    /// The runs of `exp` by id, up to date, with the final values of the metrics `want` names
    /// (and any others already cached), and every metric name `exp` has.
    pub(crate) async fn runs(
        &self,
        store: &Store,
        exp: &str,
        want: &Want,
    ) -> Result<(Arc<Vec<RunRow>>, BTreeSet<String>)> {
        let mut guard = self.state.lock().await;
        if guard.is_none() {
            // The newest ids first: whatever is written while the rest is read is reread next time.
            let top = store.changes_since(i64::MAX, i64::MAX).await?;
            let mut st = State { run_id: top.run_id, metric_id: top.metric_id, ..State::default() };
            st.learn(store.metric_keys(None, None).await?);
            let keys = match want {
                Want::All => None,
                Want::Names(n, p) => Some(st.keys_of(n, p)),
            };
            let slice = Slice { keys: keys.clone().map(|k| k.into_iter().collect()), ..Slice::default() };
            for r in store.runs_slice(&slice).await? {
                st.put(r);
            }
            st.keys = keys.unwrap_or_else(|| st.logged.values().flatten().map(|(_, k)| k.clone()).collect());
            *guard = Some(st);
        } else {
            let st = guard.as_mut().expect("set");
            let changes = store.changes_since(st.run_id, st.metric_id).await?;
            let mut ids: BTreeSet<i64> = changes.runs.into_iter().collect();
            // Runs still running (or shown failed while their records wait in a spool) may
            // change state or log more.
            ids.extend(
                st.runs
                    .values()
                    .flat_map(|l| l.iter())
                    .filter(|r| {
                        r.status == RunStatus::Running
                            || r.error.as_deref().is_some_and(|e| e.starts_with("results incomplete"))
                    })
                    .map(|r| r.id),
            );
            let ids: Vec<i64> = ids.into_iter().collect();
            for chunk in ids.chunks(CHUNK) {
                let slice = Slice {
                    ids: Some(chunk.to_vec()),
                    keys: Some(st.keys.iter().cloned().collect()),
                    ..Slice::default()
                };
                for r in store.runs_slice(&slice).await? {
                    st.put(r);
                }
                let logged = store.metric_keys(None, Some(chunk)).await?;
                st.learn(logged);
            }
            st.run_id = changes.run_id;
            st.metric_id = changes.metric_id;
        }
        let st = guard.as_mut().expect("set");
        // Keys no page had asked for: read once, for every run.
        let wanted = match want {
            Want::All => st.logged.values().flatten().map(|(_, k)| k.clone()).collect(),
            Want::Names(n, p) => st.keys_of(n, p),
        };
        let missing: Vec<String> = wanted.difference(&st.keys).cloned().collect();
        if !missing.is_empty() {
            let slice = Slice { keys: Some(missing.clone()), with_runs: false, ..Slice::default() };
            for r in store.runs_slice(&slice).await? {
                let Some(exp) = st.exp_of.get(&r.id).cloned() else { continue };
                let list = Arc::make_mut(st.runs.entry(exp).or_default());
                if let Ok(i) = list.binary_search_by_key(&r.id, |x| x.id) {
                    list[i].metrics.extend(r.metrics);
                }
            }
            st.keys.extend(missing);
        }
        let runs = st.runs.get(exp).cloned().unwrap_or_default();
        let names = st.names(exp);
        Ok((runs, names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use huse_store::{Location, MetricRow, Options, Run};

    async fn add_run(store: &Store, exp: i64, name: &str, beta: f64) -> i64 {
        let run = Run::starting("e", name, "", 0, "cpu");
        let params = [("train.beta".to_string(), serde_json::json!(beta))];
        store.insert_run(exp, &run, "name: e\n", &params).await.unwrap()
    }

    fn metric(run_id: i64, stage: &str, key: &str, step: i64, value: f64) -> MetricRow {
        MetricRow { run_id, stage: stage.into(), key: key.into(), step, value }
    }

    #[tokio::test]
    async fn the_cache_follows_new_runs_new_metrics_ended_runs_and_new_columns() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&Location::Sqlite(dir.path().join("r.sqlite")), Options::default()).await.unwrap();
        let exp = store.experiment("e", "e.yaml").await.unwrap();
        let a = add_run(&store, exp, "a", 0.0).await;
        store
            .insert_metrics(&[metric(a, "train", "loss", 0, 2.0), metric(a, "evaluate", "acc", 0, 0.5)])
            .await
            .unwrap();
        store.finish_run(a, RunStatus::Succeeded, None).await.unwrap();
        let b = add_run(&store, exp, "b", 0.5).await;
        store.insert_metrics(&[metric(b, "train", "loss", 0, 3.0)]).await.unwrap();
        let cache = Cache::default();
        let acc = Want::Names(["acc".to_string()].into(), Vec::new());
        let (runs, names) = cache.runs(&store, "e", &acc).await.unwrap();
        assert_eq!(names, ["acc".to_string(), "loss".to_string()].into());
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].metrics, [("acc".to_string(), Some(0.5))].into(), "only the metric asked for");
        assert_eq!(runs[1].status, RunStatus::Running);
        // b logs more and ends; c is recorded: all of it shows on the next request.
        store
            .insert_metrics(&[metric(b, "train", "loss", 1, 1.5), metric(b, "evaluate", "acc", 0, 0.75)])
            .await
            .unwrap();
        store.finish_run(b, RunStatus::Succeeded, None).await.unwrap();
        let c = add_run(&store, exp, "c", 1.0).await;
        store.insert_metrics(&[metric(c, "evaluate", "acc", 0, 0.9), metric(c, "other", "acc", 0, 0.1)]).await.unwrap();
        let (runs, names) = cache.runs(&store, "e", &acc).await.unwrap();
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[1].status, RunStatus::Succeeded);
        assert_eq!(runs[1].metrics.get("acc"), Some(&Some(0.75)));
        assert!(names.contains("evaluate.acc") && names.contains("other.acc"), "{names:?}");
        // Two stages of c log `acc`: its names are qualified, as the query commands show them.
        assert_eq!(runs[2].metrics.get("evaluate.acc"), Some(&Some(0.9)));
        // A column no page had asked for is read for every run, at its last step.
        let loss = Want::Names(["loss".to_string()].into(), Vec::new());
        let (runs, _) = cache.runs(&store, "e", &loss).await.unwrap();
        assert_eq!(runs[1].metrics.get("loss"), Some(&Some(1.5)));
        assert_eq!(runs[0].metrics.get("loss"), Some(&Some(2.0)));
        // The same as the store's own full load, run for run.
        let full = store.load_runs(&huse_store::Filter::default()).await.unwrap();
        let (cached, _) = cache.runs(&store, "e", &Want::All).await.unwrap();
        for (x, y) in full.iter().zip(cached.iter()) {
            assert_eq!((x.id, &x.status, &x.params, &x.metrics), (y.id, &y.status, &y.params, &y.metrics));
        }
        assert_eq!(full.len(), cached.len());
    }
}
