//! Integration tests of the `huse-run` binary on toy experiments: DAG order and overlap,
//! cache hits, sweeps, config errors, interruption, concurrent writers and queries.

mod common;

use common::{Out, Sandbox, known_runs};

const DIAMOND: &str = "\
name: diamond
seed: 3
stages:
  source: { uses: toy-source, with: { count: 10 } }
  left:   { uses: toy-scale, needs: [source], with: { factor: 2.0, seconds: 1.0 } }
  right:  { uses: toy-scale, needs: [source], with: { factor: 3.0, seconds: 1.0 } }
  total:  { uses: toy-sum, needs: [left, right] }
";

fn timing(sb: &Sandbox, run: i64, stage: &str) -> (f64, f64) {
    let dir = &sb.sql(&format!("SELECT output_dir FROM stage_runs WHERE run_id = {run} AND stage = '{stage}'"))[0][0];
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(format!("{dir}/timing.json")).unwrap()).unwrap();
    (t["start"].as_f64().unwrap(), t["end"].as_f64().unwrap())
}

#[test]
fn dag_runs_in_dependency_order_and_independent_stages_overlap() {
    let sb = Sandbox::new();
    let f = sb.write("d.yaml", DIAMOND);
    sb.run(&[f.to_str().unwrap(), "--jobs", "2"]).expect(0);
    let (s, l, r, t) =
        (timing(&sb, 1, "source"), timing(&sb, 1, "left"), timing(&sb, 1, "right"), timing(&sb, 1, "total"));
    assert!(s.1 <= l.0 && s.1 <= r.0, "source must end before its dependants start");
    assert!(l.0 < r.1 && r.0 < l.1, "left {l:?} and right {r:?} must overlap");
    assert!(t.0 >= l.1 && t.0 >= r.1, "total must start after both inputs");
    // 0..10 scaled by 2 and 3: sum = 45 * 5.
    assert_eq!(sb.sql("SELECT value FROM final_metrics WHERE run_id = 1 AND key = 'sum'")[0][0], "225");
    assert_eq!(sb.sql("SELECT status FROM runs")[0][0], "succeeded");

    // With one job at a time they cannot overlap.
    let sb = Sandbox::new();
    let f = sb.write("d.yaml", DIAMOND);
    sb.run(&[f.to_str().unwrap(), "--jobs", "1"]).expect(0);
    let (l, r) = (timing(&sb, 1, "left"), timing(&sb, 1, "right"));
    assert!(l.1 <= r.0 || r.1 <= l.0, "--jobs 1 must serialise");
}

#[test]
fn a_second_run_is_all_cache_hits_and_force_recomputes() {
    let sb = Sandbox::new();
    let f = sb.write("d.yaml", &DIAMOND.replace("seconds: 1.0", "seconds: 0.0"));
    let f = f.to_str().unwrap();
    sb.run(&[f]).expect(0);
    let out = sb.run(&[f]).expect(0);
    assert!(out.stderr().contains("cache hit"), "{}", out.stderr());
    assert_eq!(sb.count("SELECT count(*) FROM stage_runs WHERE run_id = 1 AND cached = 0"), 4);
    assert_eq!(sb.count("SELECT count(*) FROM stage_runs WHERE run_id = 2 AND cached = 1"), 4);
    // Cached metrics are replayed into the new run.
    assert_eq!(sb.sql("SELECT value FROM final_metrics WHERE run_id = 2 AND key = 'sum'")[0][0], "225");
    // Same keys: the cache entries are shared.
    assert_eq!(sb.count("SELECT count(DISTINCT cache_key) FROM stage_runs"), 4,);
    sb.run(&[f, "--force", "left"]).expect(0);
    let recomputed = sb.sql("SELECT stage FROM stage_runs WHERE run_id = 3 AND cached = 0");
    assert_eq!(recomputed, vec![vec!["left".to_string()]]);
    sb.run(&[f, "--no-cache"]).expect(0);
    assert_eq!(sb.count("SELECT count(*) FROM stage_runs WHERE run_id = 4 AND cached = 0"), 4);
    // A changed config changes the key of that stage and of everything downstream only; the
    // log says why in words (which setting, which input), the keys only with -v.
    let err = sb.run(&[f, "--set", "right.factor=4"]).expect(0).stderr();
    let why = |stage: &str, err: &str| {
        err.lines().find(|l| l.contains(&format!("{stage}: running"))).unwrap_or_default().to_string()
    };
    assert!(why("right", &err).ends_with("config `factor` 3.0 -> 4"), "{err}");
    assert!(why("total", &err).ends_with("input from `right/scaled.json` changed"), "{err}");
    let err = sb.run(&["-v", f, "--set", "right.factor=5"]).expect(0).stderr();
    assert!(why("total", &err).contains("input from `right/scaled.json` changed (its key "), "{err}");
    assert!(why("total", &err).contains("(than the closest cached entry, "), "{err}");
    let recomputed: Vec<String> = sb
        .sql("SELECT stage FROM stage_runs WHERE run_id = 5 AND cached = 0 ORDER BY stage")
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    assert_eq!(recomputed, ["right", "total"]);
    assert_eq!(sb.sql("SELECT value FROM final_metrics WHERE run_id = 5 AND key = 'sum'")[0][0], "270");
}

#[test]
fn a_sweep_from_the_command_line_runs_its_grid_with_seeds_and_ends_with_a_summary() {
    let sb = Sandbox::new();
    let f = sb.write(
        "c.yaml",
        "name: cli-sweep\nstages:\n  source: { uses: toy-source, with: { count: 4 } }\n  \
         mid: { uses: toy-scale, needs: [source], with: { add_seed: true } }\n  total: { uses: toy-sum, needs: [mid] }\n",
    );
    let out = sb.run(&[f.to_str().unwrap(), "--sweep", "mid.factor=1,2", "--repeat", "2"]).expect(0);
    assert_eq!(sb.count("SELECT count(*) FROM runs WHERE status = 'succeeded'"), 4);
    let factors = sb.sql("SELECT DISTINCT value FROM params WHERE key = 'mid.factor' ORDER BY value");
    assert_eq!(factors, [["1".to_string()], ["2".to_string()]]);
    // One table across the two points at the end, mean ± std over the seeds.
    assert!(out.stdout().contains("by sweep point") && out.stdout().contains(" ± "), "{}", out.stdout());
    // A mistake names the argument and writes nothing.
    let err = sb.run(&[f.to_str().unwrap(), "--sweep", "mid.factr=1,2"]).expect(2).stderr();
    assert!(err.contains("--sweep mid.factr=1,2") && err.contains("factor"), "{err}");
    assert_eq!(sb.count("SELECT count(*) FROM runs"), 4);
}

#[test]
fn a_random_search_runs_its_trials_with_seeds() {
    let sb = Sandbox::new();
    let f = sb.write(
        "r.yaml",
        "name: rs\nrepeat: 2\nstages:\n  source: { uses: toy-source, with: { count: 4 } }\n  \
         mid: { uses: toy-scale, needs: [source], with: { add_seed: true } }\n  \
         total: { uses: toy-sum, needs: [mid], with: { also_as: val.sum } }\n\
         search:\n  params:\n    mid.factor: { uniform: [0.5, 2.0] }\n    mid.offset: { int: [0, 3] }\n  \
         objectives: [ { metric: val.sum, goal: max } ]\n  trials: 3\n  sampler: { kind: random, seed: 1 }\n",
    );
    let out = sb.run(&[f.to_str().unwrap()]).expect(0);
    assert_eq!(sb.count("SELECT count(*) FROM runs WHERE status = 'succeeded'"), 6, "3 trials x 2 seeds");
    assert_eq!(sb.count("SELECT count(DISTINCT value) FROM params WHERE key = 'mid.factor'"), 3);
    for v in sb.sql("SELECT value FROM params WHERE key = 'mid.factor'") {
        let x: f64 = v[0].parse().unwrap();
        assert!((0.5..2.0).contains(&x), "{x}");
    }
    assert!(out.stdout().contains("by sweep point"), "{}", out.stdout());
    // The same file again: the same trials, all cached.
    let again = sb.run(&[f.to_str().unwrap()]).expect(0);
    assert!(again.stderr().contains("cache hit"), "{}", again.stderr());
    assert_eq!(sb.count("SELECT count(DISTINCT value) FROM params WHERE key = 'mid.factor'"), 3);
    // The study: every trial with its objective over its seeds; with one objective the front is
    // the best trial, the one with the largest mean of val.sum.
    let study = sb.run(&["study", f.to_str().unwrap()]).expect(0).stdout();
    assert!(study.contains("3 trial(s) of 3, 6 run(s): 6 succeeded") && study.contains("val.sum (max)"), "{study}");
    assert!(study.contains("Pareto front: 1 trial(s)"), "{study}");
    let best: Vec<(String, f64)> = sb
        .sql("SELECT r.name, m.value FROM runs r JOIN final_metrics m ON m.run_id = r.id WHERE m.key = 'val.sum'")
        .into_iter()
        .map(|row| (row[0].split('/').next().unwrap().to_string(), row[1].parse().unwrap()))
        .collect();
    let mut means: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for (point, v) in best {
        means.entry(point).or_default().push(v);
    }
    let top = means
        .iter()
        .map(|(p, v)| (p.clone(), v.iter().sum::<f64>() / v.len() as f64))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    let starred = study.lines().find(|l| l.contains('*')).unwrap_or_else(|| panic!("{study}"));
    let trial = top.0.split('@').nth(1).unwrap().split(',').next().unwrap().to_string();
    assert!(starred.contains(&trial), "the front is {trial} ({top:?}):\n{study}");
    assert!(study.contains(&format!("best val.sum: {:.4}", top.1)), "{study}");
    // A file without a search says so.
    let plain = sb.write("p.yaml", "name: p\nstages:\n  source: { uses: toy-source }\n");
    assert!(sb.run(&["study", plain.to_str().unwrap()]).expect(2).stderr().contains("has no `search:` block"));
}

/// A TPE study over two toy params: val.sum = 4 * offset + factor * 6 (count 4, seed 0).
fn tpe_study(seconds: f64) -> String {
    format!(
        "name: tpe\nstages:\n  source: {{ uses: toy-source, with: {{ count: 4 }} }}\n  \
         mid: {{ uses: toy-scale, needs: [source], with: {{ seconds: {seconds} }} }}\n  \
         total: {{ uses: toy-sum, needs: [mid], with: {{ also_as: val.sum }} }}\n\
         search:\n  params:\n    mid.factor: {{ uniform: [0.5, 2.0] }}\n    mid.offset: {{ int: [0, 3] }}\n  \
         objectives: [ {{ metric: val.sum, goal: min }} ]\n  trials: 10\n  sampler: {{ kind: tpe, seed: 2, startup: 4 }}\n"
    )
}

/// Each trial's index -> how many succeeded runs it has, from the run names.
fn trials_recorded(sb: &Sandbox) -> std::collections::BTreeMap<u32, i64> {
    let mut m = std::collections::BTreeMap::new();
    for row in sb.sql("SELECT sweep_point FROM runs WHERE status = 'succeeded'") {
        let i: u32 = row[0].strip_prefix("trial=").unwrap().split(',').next().unwrap().parse().unwrap();
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

#[test]
fn a_tpe_study_runs_its_trials_one_after_another_and_continues_after_a_kill() {
    // Two fresh studies of the same file: the same trials, in the same order.
    let points = |jobs: &str| {
        let sb = Sandbox::new();
        let f = sb.write("t.yaml", &tpe_study(0.0));
        let out = sb.run(&[f.to_str().unwrap(), "--jobs", jobs]).expect(0);
        assert!(out.stdout().contains("10 trial(s) ran"), "{}", out.stdout());
        assert!(out.stdout().contains("10 trial(s) of 10, 10 run(s): 10 succeeded"), "{}", out.stdout());
        assert_eq!(trials_recorded(&sb), (0..10).map(|i| (i, 1)).collect());
        // The shared stage ran once; every trial's point differs.
        assert_eq!(sb.count("SELECT count(*) FROM stage_runs WHERE stage = 'source' AND cached = 0"), 1);
        assert_eq!(sb.count("SELECT count(DISTINCT sweep_point) FROM runs"), 10);
        sb.sql("SELECT sweep_point FROM runs ORDER BY id").into_iter().map(|r| r[0].clone()).collect::<Vec<_>>()
    };
    let first = points("1");
    assert_eq!(points("1"), first, "a seed's study is deterministic");
    // Three trials at a time: the same count, no duplicates (points depend on what had ended).
    points("3");

    // Killed while trials run: the rerun continues, the interrupted trial again under its
    // own label, with no trial doubled or lost.
    let sb = Sandbox::new();
    let f = sb.write("t.yaml", &tpe_study(0.4));
    let f = f.to_str().unwrap();
    let mut child =
        sb.cmd(&[f]).stderr(std::process::Stdio::null()).stdout(std::process::Stdio::null()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    let succeeded =
        || if sb.db().exists() { sb.count("SELECT count(*) FROM runs WHERE status = 'succeeded'") } else { 0 };
    while succeeded() < 3 {
        assert!(t0.elapsed().as_secs() < 60, "three trials did not end in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = trials_recorded(&sb);
    assert!((3..10).contains(&before.len()), "{before:?}");
    let out = sb.run(&[f]).expect(0);
    assert!(
        out.stderr().contains("as interrupted")
            || sb.count("SELECT count(*) FROM runs WHERE status = 'interrupted'") == 0,
        "{}",
        out.stderr()
    );
    assert_eq!(trials_recorded(&sb), (0..10).map(|i| (i, 1)).collect(), "each trial once");
    let study = sb.run(&["study", f]).expect(0).stdout();
    assert!(study.contains("study `tpe` (tpe sampler, seed 2): 10 trial(s) of 10"), "{study}");
    assert!(study.contains("Pareto front: 1 trial(s)"), "{study}");
    // Once the study is complete, running the file again starts nothing.
    let again = sb.run(&[f]).expect(0);
    assert!(again.stdout().contains("0 trial(s) ran"), "{}", again.stdout());
}

#[test]
fn asha_prunes_trials_at_rungs_and_records_them_pruned_with_their_last_values() {
    // val.loss at epoch e = factor / e + offset: a larger offset is worse at every rung.
    let sb = Sandbox::new();
    let f = sb.write(
        "a.yaml",
        "name: asha\nstages:\n  source: { uses: toy-source, with: { count: 4 } }\n  \
         mid: { uses: toy-scale, needs: [source], with: { metrics: 9, report_as: val.loss } }\n  \
         total: { uses: toy-sum, needs: [mid] }\n\
         search:\n  params:\n    mid.factor: { uniform: [0.5, 2.0] }\n    mid.offset: { int: [0, 5] }\n  \
         objectives: [ { metric: val.loss, goal: min } ]\n  trials: 12\n  \
         sampler: { kind: tpe, seed: 1, startup: 4 }\n  pruner: { kind: asha, min_epochs: 1, max_epochs: 9, reduction: 3 }\n",
    );
    let f = f.to_str().unwrap();
    let out = sb.run(&[f]).expect(0);
    let pruned = sb.count("SELECT count(*) FROM runs WHERE status = 'pruned'");
    let done = sb.count("SELECT count(*) FROM runs WHERE status = 'succeeded'");
    assert_eq!(pruned + done, 12, "{}", out.stderr());
    assert!(pruned >= 4 && done >= 1, "{pruned} pruned, {done} ran to the end");
    assert!(out.stdout().contains(&format!("({pruned} pruned run(s), 0 failed)")), "{}", out.stdout());
    // A pruned run stopped at a rung (1 or 3) with that epoch's value as its last; its
    // downstream stage was skipped and its stage recorded pruned.
    for row in sb.sql(
        "SELECT r.id, max(m.step) FROM runs r JOIN metrics m ON m.run_id = r.id AND m.key = 'val.loss' \
         WHERE r.status = 'pruned' GROUP BY r.id",
    ) {
        assert!(row[1] == "1" || row[1] == "3", "run {} stopped at epoch {}", row[0], row[1]);
        let stages = sb.sql(&format!("SELECT stage, status FROM stage_runs WHERE run_id = {} ORDER BY stage", row[0]));
        assert!(stages.contains(&vec!["mid".to_string(), "pruned".to_string()]), "{stages:?}");
        assert!(stages.contains(&vec!["total".to_string(), "skipped".to_string()]), "{stages:?}");
    }
    // Pruning saved epochs: fewer than 12 x 9 were run.
    let epochs = sb.count("SELECT count(*) FROM metrics WHERE key = 'val.loss'");
    assert!(epochs <= 12 * 9 - pruned * 6, "{epochs} epochs");
    // The first trial at a rung always goes on; the best trial ran to the end.
    let best = &sb.sql("SELECT r.status FROM runs r JOIN metrics m ON m.run_id = r.id AND m.key = 'val.loss' AND m.step = 1 ORDER BY m.value, r.id LIMIT 1")[0][0];
    assert_eq!(best, "succeeded");
    let study = sb.run(&["study", f]).expect(0).stdout();
    assert!(study.contains(&format!("{pruned} pruned")), "{study}");
    // The study is complete: nothing runs again, pruned trials included.
    assert!(sb.run(&[f]).expect(0).stdout().contains("0 trial(s) ran"));
}

#[test]
fn a_3x3_sweep_creates_9_runs_and_computes_the_shared_upstream_once() {
    let sb = Sandbox::new();
    let f = sb.write(
        "s.yaml",
        "name: sweep\nstages:\n  source: { uses: toy-source, with: { count: 4, seconds: 0.3 } }\n  \
         mid: { uses: toy-scale, needs: [source], with: { factor: 1.0 } }\n  total: { uses: toy-sum, needs: [mid] }\n\
         sweep:\n  mid.factor: [1, 2, 3]\n  mid.offset: [0, 10, 20]\n",
    );
    sb.run(&[f.to_str().unwrap(), "--jobs", "4"]).expect(0);
    assert_eq!(sb.count("SELECT count(*) FROM runs WHERE status = 'succeeded'"), 9);
    assert_eq!(sb.count("SELECT count(*) FROM stage_runs WHERE stage = 'source' AND cached = 0"), 1);
    assert_eq!(sb.count("SELECT count(*) FROM stage_runs WHERE stage = 'source'"), 9);
    assert_eq!(std::fs::read_dir(sb.cache().join("toy-source")).unwrap().count(), 1);
    // Each point's params are queryable and its metric is right: sum = factor * 6 + 4 * offset.
    let rows = sb.sql(
        "SELECT pf.value, po.value, f.value FROM runs r
         JOIN params pf ON pf.run_id = r.id AND pf.key = 'mid.factor'
         JOIN params po ON po.run_id = r.id AND po.key = 'mid.offset'
         JOIN final_metrics f ON f.run_id = r.id AND f.key = 'sum' ORDER BY r.id",
    );
    assert_eq!(rows.len(), 9);
    for r in rows {
        let (fa, of, sum): (f64, f64, f64) = (r[0].parse().unwrap(), r[1].parse().unwrap(), r[2].parse().unwrap());
        assert_eq!(sum, fa * 6.0 + 4.0 * of);
    }
    // Names say the point.
    assert_eq!(sb.sql("SELECT name FROM runs WHERE id = 2")[0][0], "sweep@mid.factor=1,mid.offset=10");
}

#[test]
fn explicit_points_and_seed_repetition() {
    let sb = Sandbox::new();
    let f = sb.write(
        "p.yaml",
        "name: pts\nseed: 5\nrepeat: 3\nstages:\n  source: { uses: toy-source }\n  \
         mid: { uses: toy-scale, needs: [source], with: { add_seed: true } }\n\
         sweep:\n  points:\n    - { mid.factor: 1, mid.offset: 0 }\n    - { mid.factor: 0, mid.offset: 1 }\n",
    );
    sb.run(&[f.to_str().unwrap()]).expect(0);
    assert_eq!(sb.count("SELECT count(*) FROM runs"), 6);
    assert_eq!(sb.sql("SELECT group_concat(seed) FROM (SELECT seed FROM runs ORDER BY id)")[0][0], "5,6,7,5,6,7");
    // The seed-free source is shared by all six runs.
    assert_eq!(sb.count("SELECT count(*) FROM stage_runs WHERE stage = 'source' AND cached = 0"), 1);
    // Grouped: mean ± std over the 3 seeds. mean of (x + seed) over x in 0..10 = 4.5 + seed.
    let out = sb.run(&["runs", "--group", "--format", "csv", "--metric", "mean"]).expect(0);
    let text = out.stdout();
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), "experiment,mid.factor,mid.offset,runs,mean,mean.std");
    assert_eq!(lines.next().unwrap(), "pts,0,1,3,7,1");
    assert_eq!(lines.next().unwrap(), "pts,1,0,3,10.5,1");
}

/// Each bad experiment must fail with a positioned message and leave no trace.
#[test]
fn config_errors_are_positioned_and_write_nothing() {
    let good = "name: bad\nstages:\n  source: { uses: toy-source }\n  mid:\n    uses: toy-scale\n    needs: [source]\n    with:\n      factor: 2.0\n";
    let cases: &[(&str, String, &[&str], &str)] = &[
        (
            "unknown top key",
            good.replace("stages:", "stagse:"),
            &[],
            "b.yaml:2:1: stagse: unknown key `stagse`; did you mean `stages`?",
        ),
        (
            "unknown stage key",
            good.replace("    needs:", "    need:"),
            &[],
            "b.yaml:6:5: stages.mid.need: unknown key `need`; did you mean `needs`?",
        ),
        (
            "unknown config key",
            good.replace("factor: 2.0", "factr: 2.0"),
            &[],
            "b.yaml:8:7: stages.mid.with.factr: unknown field `factr`",
        ),
        ("did you mean for config key", good.replace("factor: 2.0", "factr: 2.0"), &[], "did you mean `factor`?"),
        (
            "unknown kind",
            good.replace("uses: toy-scale", "uses: toy-scal"),
            &[],
            "b.yaml:5:11: stages.mid.uses: unknown stage kind `toy-scal`; did you mean `toy-scale`?",
        ),
        (
            "unknown needs",
            good.replace("needs: [source]", "needs: [sorce]"),
            &[],
            "b.yaml:6:13: stages.mid.needs.0: unknown stage `sorce` in needs; did you mean `source`?",
        ),
        (
            "cycle",
            good.replace("source: { uses: toy-source }", "source: { uses: toy-scale, needs: [mid] }"),
            &[],
            "dependency cycle: source -> mid -> source",
        ),
        (
            "wrong type",
            good.replace("factor: 2.0", "factor: abc"),
            &[],
            "b.yaml:8:15: stages.mid.with.factor: invalid type: string \"abc\", expected f64",
        ),
        (
            "stage's own validation",
            good.replace("factor: 2.0", "seconds: -1"),
            &[],
            "b.yaml:8:16: stages.mid.with.seconds: must be >= 0",
        ),
        (
            "wrong top-level type",
            good.replace("name: bad", "name: bad\nseed: -4"),
            &[],
            "b.yaml:2:7: seed: expected a non-negative integer",
        ),
        (
            "bad override",
            good.to_string(),
            &["--set", "mid.factor=abc"],
            "(command line `--set mid.factor=abc`): stages.mid.with.factor: invalid type: string \"abc\", expected f64",
        ),
        (
            "unset variable",
            good.replace("factor: 2.0", "fail: ${HUSE_TEST_SURELY_UNSET}"),
            &[],
            "b.yaml:8:13: stages.mid.with.fail: environment variable `HUSE_TEST_SURELY_UNSET` is not set",
        ),
        (
            "missing input artifact",
            good.replace("needs: [source]", "needs: []"),
            &[],
            "stages.mid.needs: stage `mid` (toy-scale) takes artifact `numbers.json`, but none of its needs [] gives it (kinds that give it: toy-source)",
        ),
        (
            "syntax",
            good.replace("needs: [source]", "needs: [source"),
            &[],
            "b.yaml:7:9: invalid YAML: illegal placement of ':' indicator",
        ),
        (
            "bad sweep key",
            format!("{good}sweep:\n  mdi.factor: [1, 2]\n"),
            &[],
            "b.yaml:10:3: sweep.mdi.factor: sweep key `mdi.factor` names no stage or settable top-level key; did you mean `mid`?",
        ),
        (
            "bad sweep value",
            format!("{good}sweep:\n  mid.factor: [1, x]\n"),
            &[],
            "b.yaml:10:19: stages.mid.with.factor: invalid type: string \"x\", expected f64",
        ),
    ];
    for (what, yaml, extra, expected) in cases {
        let sb = Sandbox::new();
        let f = sb.write("b.yaml", yaml);
        let mut args = vec![f.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = sb.run(&args);
        let err = out.stderr();
        assert_eq!(out.code(), 2, "{what}: exit code; stderr:\n{err}");
        assert!(err.contains(expected), "{what}: expected\n  {expected}\nin\n{err}");
        assert!(!sb.db().exists(), "{what}: the database must not be created");
        assert!(!sb.cache().exists(), "{what}: the cache must not be created");
        // `validate` reports the same without running.
        let mut vargs = vec!["validate"];
        vargs.extend(args.iter().copied());
        assert!(sb.run(&vargs).expect(2).stderr().contains(expected), "{what}: validate");
    }
}

#[test]
fn a_failed_stage_skips_its_dependants_and_fails_only_its_run() {
    let sb = Sandbox::new();
    let f = sb.write(
        "f.yaml",
        "name: fails\nstages:\n  source: { uses: toy-source }\n  mid: { uses: toy-scale, needs: [source] }\n  \
         total: { uses: toy-sum, needs: [mid] }\nsweep:\n  mid.fail: [\"boom at step 3\", null]\n",
    );
    let out = sb.run(&[f.to_str().unwrap()]).expect(1);
    assert!(out.stdout().contains("boom at step 3"), "{}", out.stdout());
    let runs = sb.sql("SELECT status, coalesce(error, '') FROM runs ORDER BY id");
    assert_eq!(runs[0], vec!["failed".to_string(), "stage `mid` failed: boom at step 3".to_string()]);
    assert_eq!(runs[1][0], "succeeded");
    assert_eq!(sb.sql("SELECT status FROM stage_runs WHERE run_id = 1 AND stage = 'total'")[0][0], "skipped");
    // Nothing of the failed stage is left in the cache.
    assert_eq!(std::fs::read_dir(sb.cache().join("toy-scale")).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(sb.cache().join(".tmp")).unwrap().count(), 0);
}

#[test]
fn sigint_marks_the_run_interrupted_and_a_rerun_completes() {
    let sb = Sandbox::new();
    let f = sb.write(
        "i.yaml",
        "name: slow\nstages:\n  source: { uses: toy-source }\n  mid: { uses: toy-scale, needs: [source], with: { seconds: 3 } }\n",
    );
    let f = f.to_str().unwrap();
    let child = sb.cmd(&[f]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Wait until the slow stage is writing into its temporary directory.
    let tmp = sb.cache().join(".tmp");
    let t0 = std::time::Instant::now();
    while std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(t0.elapsed().as_secs() < 20, "the stage never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // `show` of the running run: how long so far, which stage runs and which waits (not NaN).
    let shown = sb.run(&["show", "1"]).expect(0).stdout();
    assert!(shown.contains("so far (running)") && !shown.contains("NaN"), "{shown}");
    let line = |k: &str| shown.lines().find(|l| l.contains(k)).unwrap_or_default().to_string();
    assert!(line("running now").contains("mid"), "{shown}");
    let json = sb.run(&["show", "1", "-f", "json"]).expect(0).stdout();
    assert!(json.contains("\"running now\"") && json.contains("\"mid\""), "{json}");
    let kill = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(sb.sql("SELECT status FROM runs")[0][0], "interrupted");
    assert_eq!(sb.sql("SELECT status FROM stage_runs WHERE stage = 'mid'")[0][0], "interrupted");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "no half-written output may remain");
    assert!(!sb.cache().join("toy-scale").exists());
    // The rerun completes, reusing the finished upstream stage.
    sb.run(&[f]).expect(0);
    assert_eq!(sb.sql("SELECT status FROM runs WHERE id = 2")[0][0], "succeeded");
    assert_eq!(sb.sql("SELECT cached FROM stage_runs WHERE run_id = 2 AND stage = 'source'")[0][0], "1");
}

#[test]
fn a_killed_process_leaves_a_run_that_the_next_start_marks_interrupted() {
    let sb = Sandbox::new();
    let f = sb.write("k.yaml", "name: k\nstages:\n  s: { uses: toy-source, with: { seconds: 10 } }\n");
    let f = f.to_str().unwrap();
    let mut child = sb.cmd(&[f]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::read_dir(sb.cache().join(".tmp")).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(t0.elapsed().as_secs() < 20);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let f2 = sb.write("k2.yaml", "name: k2\nstages:\n  s: { uses: toy-source }\n");
    sb.run(&[f2.to_str().unwrap()]).expect(0);
    assert_eq!(sb.sql("SELECT status FROM runs WHERE id = 1")[0][0], "interrupted");
    assert_eq!(std::fs::read_dir(sb.cache().join(".tmp")).unwrap().count(), 0, "stale temp dirs are swept");
}

#[test]
fn eight_concurrent_processes_lose_no_rows() {
    let sb = Sandbox::new();
    common::eight_concurrent_writers(&sb, None);
    assert_eq!(sb.count("SELECT count(*) FROM runs WHERE status = 'succeeded'"), 8);
    // 300 loss steps + 1 mean per run.
    assert_eq!(sb.count("SELECT count(*) FROM metrics"), 8 * 301);
    assert_eq!(sb.count("SELECT count(*) FROM stage_runs"), 16);
    assert_eq!(sb.count("SELECT count(*) FROM params WHERE key = 'mid.offset'"), 8);
}

#[test]
fn runs_filters_sorts_and_prints_all_formats() {
    let sb = known_runs();
    // The search language: and, or, not, in, parentheses; errors point at the column.
    let ids = |q: &str| -> Vec<String> {
        let out = sb.run(&["runs", "-f", "csv", "--columns", "id", "--query", q]).expect(0).stdout();
        out.lines().skip(1).map(String::from).collect()
    };
    assert_eq!(ids("sum >= 10 and (mid.offset = 0 or mid.factor = 1)"), ["2", "3"]);
    assert_eq!(ids("not mid.factor in (2) or state = failed"), ["1", "2"]);
    assert_eq!(ids("mid.factor in (1, 2) and name != 'q@mid.factor=1,mid.offset=0'"), ["2", "3", "4"]);
    let err = sb.run(&["runs", "--query", "sum >"]).expect(2).stderr();
    assert!(err.contains("at column 6: expected a value") && err.contains("sum >\n     ^"), "{err}");
    let err = sb.run(&["best", "-m", "sum", "--query", "summ > 1"]).expect(2).stderr();
    assert!(err.contains("at column 1: no param, metric or field `summ` (did you mean `sum`?)"), "{err}");
    // sums: (1,0)=6, (1,1)=10, (2,0)=12, (2,1)=16
    let csv = sb.run(&["runs", "--format", "csv", "--metric", "sum"]).expect(0).stdout();
    assert_eq!(
        csv,
        "id,experiment,name,status,mid.factor,mid.offset,sum\n\
         1,q,\"q@mid.factor=1,mid.offset=0\",succeeded,1,0,6\n\
         2,q,\"q@mid.factor=1,mid.offset=1\",succeeded,1,1,10\n\
         3,q,\"q@mid.factor=2,mid.offset=0\",succeeded,2,0,12\n\
         4,q,\"q@mid.factor=2,mid.offset=1\",succeeded,2,1,16\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&sb.run(&["runs", "-f", "json", "-w", "mid.factor=2", "-w", "sum>12"]).expect(0).stdout())
            .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    assert_eq!(json[0]["id"], 4);
    assert_eq!(json[0]["sum"], 16.0);
    assert_eq!(json[0]["loss"], 2.0 / 3.0);
    let md =
        sb.run(&["runs", "-f", "markdown", "-m", "sum", "--sort", "sum", "--desc", "--limit", "2"]).expect(0).stdout();
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines.len(), 4, "{md}");
    assert!(lines[0].starts_with("| id "), "{md}");
    assert!(lines[1].starts_with("|--"), "{md}");
    assert!(lines[2].contains("| 16 "), "{md}");
    assert!(lines[3].contains("| 12 "), "{md}");
    let table = sb.run(&["runs", "--all", "-w", "mid.offset!=0", "-w", "sum<=10"]).expect(0).stdout();
    assert!(table.contains("q@mid.factor=1,mid.offset=1") && !table.contains("mid.offset=0,"), "{table}");
    assert!(table.contains('│'), "a drawn table: {table}");
    // Filter values are bound, not pasted: quotes are just characters.
    let out = sb.run(&["runs", "-f", "csv", "-w", "mid.uses=x' OR '1'='1"]).expect(0).stdout();
    assert_eq!(out.lines().count(), 1, "{out}");
    // Filtering on a metric that does not exist gives no rows; a bad condition is a usage error.
    assert_eq!(sb.run(&["runs", "-f", "json", "-w", "nope>1"]).expect(0).stdout().trim(), "[]");
    assert_eq!(sb.run(&["runs", "-w", "nope"]).code(), 2);
}

#[test]
fn show_compare_and_best_in_all_formats() {
    let sb = known_runs();
    let show: serde_json::Value =
        serde_json::from_str(&sb.run(&["show", "3", "-f", "json"]).expect(0).stdout()).unwrap();
    let fields: Vec<(&str, &serde_json::Value)> =
        show["run"].as_array().unwrap().iter().map(|r| (r["field"].as_str().unwrap(), &r["value"])).collect();
    assert!(fields.contains(&("status", &serde_json::json!("succeeded"))));
    assert!(show["params"].as_array().unwrap().iter().any(|p| p["param"] == "mid.factor" && p["value"] == "2"));
    assert_eq!(show["stages"].as_array().unwrap().len(), 3);
    assert!(show["metrics (last step)"].as_array().unwrap().iter().any(|m| m["metric"] == "sum" && m["value"] == 12.0));
    for f in ["table", "csv", "markdown"] {
        let out = sb.run(&["show", "3", "-f", f]).expect(0).stdout();
        assert!(out.contains("mid.factor") && out.contains("12") && out.contains("toy-scale"), "{f}: {out}");
    }

    let cmp = sb.run(&["compare", "1", "4", "-f", "csv", "-m", "sum"]).expect(0).stdout();
    assert_eq!(
        cmp,
        ",key,#1,#4\nparam,mid.factor,1,2\nparam,mid.offset,0,1\nrun,status,succeeded,succeeded\nmetric,sum,6,16\n"
    );
    // Without -m: only the metrics that differ (runs 1 and 2 share factor 1, so their loss
    // curve ends on the same value); as a table, only the headline ones, with a note.
    let cmp = sb.run(&["compare", "1", "2", "-f", "csv"]).expect(0).stdout();
    assert!(cmp.contains("metric,sum,6,10") && cmp.contains("metric,mean,") && !cmp.contains("loss"), "{cmp}");
    let cmp = sb.run(&["compare", "1", "2"]).expect(0).stdout();
    assert!(cmp.contains("sum") && !cmp.contains("mean") && !cmp.contains("loss"), "{cmp}");
    assert!(cmp.contains("(1 more metric(s) differ; -m GLOB or --all)"), "{cmp}");
    assert!(cmp.lines().all(|l| l.chars().count() <= 80), "{cmp}");
    let all = sb.run(&["compare", "1", "2", "--all"]).expect(0).stdout();
    assert!(all.contains("mean") && !all.contains("loss") && !all.contains("more metric"), "{all}");
    for f in ["table", "json", "markdown"] {
        let out = sb.run(&["compare", "1", "4", "-f", f]).expect(0).stdout();
        assert!(out.contains("mid.offset") && out.contains("16"), "{f}: {out}");
    }

    let best = sb.run(&["best", "--metric", "sum", "-f", "csv"]).expect(0).stdout();
    assert_eq!(best, "id,experiment,name,sum,mid.factor,mid.offset\n4,q,\"q@mid.factor=2,mid.offset=1\",16,2,1\n");
    let best = sb.run(&["best", "--metric", "sum", "--min", "-f", "json"]).expect(0).stdout();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&best).unwrap()[0]["id"], 1);
    let best = sb.run(&["best", "--metric", "sum", "-w", "mid.factor=1", "-f", "markdown"]).expect(0).stdout();
    assert!(best.contains("| 2 ") && best.contains("| 10 "), "{best}");
    assert!(sb.run(&["best", "--metric", "sum"]).expect(0).stdout().contains("16"));
    assert!(sb.run(&["best", "--metric", "nope"]).expect(1).stderr().contains("no run has a value for metric `nope`"));
    assert!(sb.run(&["show", "99"]).expect(1).stderr().contains("no run with id 99"));
}

#[test]
fn list_shows_the_registered_stage_kinds() {
    let sb = Sandbox::new();
    let out = sb.run(&["list"]).expect(0).stdout();
    for k in ["toy-source", "toy-scale", "toy-sum"] {
        assert!(out.contains(k), "{out}");
    }
}

#[test]
fn queries_without_a_database_say_so() {
    let sb = Sandbox::new();
    assert!(sb.run(&["runs"]).expect(1).stderr().contains("no results database"));
    assert!(!sb.db().exists());
}

#[test]
fn a_run_argument_that_is_not_an_id_says_what_a_run_is() {
    let sb = Sandbox::new();
    // A query typed where the run goes, a zero, a name: each a usage error naming the argument.
    for args in [
        &["search", "red running shoes"][..],
        &["show", "0"],
        &["compare", "1", "two"],
        &["embed", "3.5"],
        &["serve", "quick"],
    ] {
        let err = sb.run(args).expect(2).stderr();
        assert!(
            err.contains("a run is named by its id, a number (`huse-run runs` lists them)") && err.contains("<RUN"),
            "{args:?}: {err}"
        );
    }
    // The query as a positional argument or as --text, not both.
    let err = sb.run(&["search", "1", "red", "--text", "blue"]).expect(2).stderr();
    assert!(err.contains("cannot be used with"), "{err}");
    assert!(!sb.db().exists());
}

/// (start, end, threads, pool) of every computed stage of the invocation's runs.
fn budgets(sb: &Sandbox) -> Vec<(String, f64, f64, usize, usize)> {
    sb.sql("SELECT DISTINCT stage, output_dir FROM stage_runs WHERE cached = 0")
        .into_iter()
        .map(|r| {
            let t: serde_json::Value =
                serde_json::from_slice(&std::fs::read(format!("{}/timing.json", r[1])).unwrap()).unwrap();
            let n = |k: &str| t[k].as_u64().unwrap() as usize;
            (r[0].clone(), t["start"].as_f64().unwrap(), t["end"].as_f64().unwrap(), n("threads"), n("pool"))
        })
        .collect()
}

#[test]
fn every_stage_runs_in_a_pool_of_its_thread_budget_and_the_running_ones_never_exceed_the_cpus() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    // Six runs whose `scale` stages (0.3 s each) all become ready when the shared source ends.
    let yaml = "name: share\nseed: 1\ndevice: cpu\nstages:\n  source: { uses: toy-source, with: { count: 5 } }\n  scale: { uses: toy-scale, needs: [source], with: { seconds: 0.3 } }\nsweep:\n  scale.factor: [1, 2, 3, 4, 5, 6]\n";
    let sb = Sandbox::new();
    let f = sb.write("share.yaml", yaml);
    let out = sb.run(&[f.to_str().unwrap()]).expect(0);
    let b = budgets(&sb);
    assert_eq!(b.len(), 7, "{b:?}");
    for (stage, _, _, threads, pool) in &b {
        assert_eq!(threads, pool, "{stage} runs in a pool of its budget");
        assert!((1..=cpus).contains(threads), "{stage}: {threads} threads on {cpus} CPUs");
    }
    // The source runs alone: every core. The six scales share them.
    let source = b.iter().find(|s| s.0 == "source").unwrap();
    assert_eq!(source.3, cpus);
    let share = (cpus / cpus.min(6)).max(1);
    assert!(b.iter().filter(|s| s.0 == "scale").all(|s| s.3 == share), "{share} each: {b:?}");
    // At no moment do the running stages hold more threads than there are CPUs.
    for (_, t, _, _, _) in &b {
        let busy: usize = b.iter().filter(|s| s.1 <= *t && *t < s.2).map(|s| s.3).sum();
        assert!(busy <= cpus, "{busy} threads at once on {cpus} CPUs: {b:?}");
    }
    assert!(
        out.stderr().contains(&"running toy-source (key ".to_string())
            && out.stderr().contains(&format!("{cpus} thread")),
        "{}",
        out.stderr()
    );

    // One job at a time: each gets every core.
    let sb = Sandbox::new();
    let f = sb.write("share.yaml", yaml);
    sb.run(&[f.to_str().unwrap(), "--jobs", "1"]).expect(0);
    assert!(budgets(&sb).iter().all(|s| s.3 == cpus && s.4 == cpus));

    // Told otherwise, a stage gets what it was told, even beyond the CPUs.
    let sb = Sandbox::new();
    let f = sb.write("share.yaml", yaml);
    let n = (cpus + 1).to_string();
    sb.run(&[f.to_str().unwrap(), "--threads-per-job", &n, "--jobs", "2"]).expect(0);
    assert!(budgets(&sb).iter().all(|s| s.3 == cpus + 1 && s.4 == cpus + 1));
}

/// The largest number of `stage` intervals (start, end) open at one instant.
fn most_at_once(b: &[(String, f64, f64, usize, usize)], stage: &str) -> usize {
    let runs: Vec<_> = b.iter().filter(|s| s.0 == stage).collect();
    runs.iter().map(|a| runs.iter().filter(|s| s.1 <= a.1 && a.1 < s.2).count()).max().unwrap_or(0)
}

#[test]
fn a_gpu_runs_as_many_device_stages_at_once_as_it_has_slots_and_they_share_the_cores() {
    // toy-scale says it computes on the device (it only sleeps, so this needs no GPU): on
    // `cuda:0` each holds a slot of GPU 0; toy-source does not use the device and holds none.
    let cpus = std::thread::available_parallelism().unwrap().get();
    let yaml = "name: slots\nseed: 1\ndevice: cuda:0\nstages:\n  source: { uses: toy-source, with: { count: 5 } }\n  scale: { uses: toy-scale, needs: [source], with: { seconds: 0.4 } }\nsweep:\n  scale.factor: [1, 2, 3, 4, 5, 6]\n";
    for slots in [1usize, 2, 3] {
        let sb = Sandbox::new();
        let f = sb.write("slots.yaml", yaml);
        let out = sb.run(&[f.to_str().unwrap(), "--jobs", "6", "--gpu-slots", &slots.to_string()]).expect(0);
        let b = budgets(&sb);
        assert_eq!(b.len(), 7, "{b:?}");
        // The cores go to the stages that hold a slot, not to the six waiting for one.
        let share = (cpus / 6.min(slots)).max(1);
        // Never more than the slots at once; and the slots are used (six ready stages), as
        // far as the cores go (three slots on two CPUs: two at a time, a thread each).
        assert_eq!(most_at_once(&b, "scale"), slots.min(cpus / share), "{slots} slot(s): {b:?}");
        assert!(
            b.iter().filter(|s| s.0 == "scale").all(|s| s.3 == share && s.4 == share),
            "{share} threads each with {slots} slot(s): {b:?}"
        );
        assert!(out.stderr().contains("a slot of GPU 0"), "{}", out.stderr());
    }
    // On the CPU the same sweep is not limited by slots: `--jobs 6` runs them together.
    let sb = Sandbox::new();
    let f = sb.write("slots.yaml", &yaml.replace("cuda:0", "cpu"));
    let out = sb.run(&[f.to_str().unwrap(), "--jobs", "6", "--gpu-slots", "1"]).expect(0);
    assert!(most_at_once(&budgets(&sb), "scale") > 1, "CPU stages hold no GPU slot");
    assert!(!out.stderr().contains("a slot of GPU"), "{}", out.stderr());
}

#[test]
fn list_and_help_say_which_devices_this_build_supports() {
    let sb = Sandbox::new();
    let list = sb.run(&["list"]).expect(0);
    let help = sb.run(&["--help"]).expect(0);
    for out in [list.stdout(), help.stdout()] {
        assert!(out.contains("cpu"), "{out}");
        if cfg!(feature = "cuda") {
            assert!(out.contains("cuda:"), "{out}");
        } else {
            assert!(out.contains("no CUDA support") && out.contains("--features cuda"), "{out}");
        }
    }
}

#[test]
fn best_group_answers_with_the_best_sweep_point_over_its_seeds() {
    let sb = Sandbox::new();
    let f = sb.write(
        "g.yaml",
        "name: g\nstages:\n  source: { uses: toy-source, with: { count: 4 } }\n  \
         mid: { uses: toy-scale, needs: [source] }\n  total: { uses: toy-sum, needs: [mid] }\n\
         sweep:\n  mid.factor: [1, 2, 3]\nrepeat: 2\n",
    );
    let out = sb.run(&[f.to_str().unwrap()]).expect(0).stdout();
    // The sweep ends with one table across its points (headline metrics, mean ± std).
    assert!(out.contains("6 runs of g, by sweep point (mean ± std over seeds):"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("│ 3 ") && l.contains("┆ 2 ") && l.contains("18 ± 0")), "{out}");
    // sum = 6 x factor in every seed: the best point is factor 3, 18 ± 0 over 2 runs.
    let csv = sb.run(&["best", "-m", "sum", "--group", "-f", "csv"]).expect(0).stdout();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "experiment,mid.factor,runs,sum,sum.std", "{csv}");
    assert_eq!(lines[1], "g,3,2,18,0", "{csv}");
    assert_eq!(lines.len(), 2, "one row: {csv}");
    let low = sb.run(&["best", "-m", "sum", "--group", "--min", "-f", "csv"]).expect(0).stdout();
    assert_eq!(low.lines().nth(1), Some("g,1,2,6,0"), "{low}");
}

#[test]
fn the_project_file_gives_defaults_that_the_environment_overrides() {
    let sb = Sandbox::new();
    let sub = sb.path().join("work/deeper");
    std::fs::create_dir_all(&sub).unwrap();
    sb.write(
        "huse.toml",
        "# defaults for this project\n[env]\nHUSE_DB = { value = \"results/runs.sqlite\", relative = true }\n\
         PROJECT_TAG = \"fromfile\"\n",
    );
    std::fs::create_dir_all(sb.path().join("results")).unwrap();
    let f = sb.write("p.yaml", "name: \"p-${PROJECT_TAG}\"\nstages:\n  s: { uses: toy-source }\n");
    // From a folder below the file, with neither variable set: both come from huse.toml.
    let run = |cmd: &mut std::process::Command| Out(cmd.output().unwrap());
    let mut c = sb.cmd(&[f.to_str().unwrap()]);
    c.current_dir(&sub).env_remove("HUSE_DB").env_remove("PROJECT_TAG");
    run(&mut c).expect(0);
    let db = sb.path().join("results/runs.sqlite");
    assert!(db.exists(), "the database went where huse.toml says");
    let mut c = sb.cmd(&["runs", "-f", "csv"]);
    c.current_dir(&sub).env_remove("HUSE_DB");
    let out = run(&mut c).expect(0).stdout();
    assert!(out.contains("p-fromfile"), "{out}");
    // A variable set in the environment wins.
    let mut c = sb.cmd(&[f.to_str().unwrap()]);
    c.current_dir(&sub).env("PROJECT_TAG", "fromenv");
    run(&mut c).expect(0);
    assert!(sb.db().exists(), "HUSE_DB from the environment wins");
    assert!(sb.run(&["runs", "-f", "csv"]).expect(0).stdout().contains("p-fromenv"));
    // A broken file is an error that names it, its line and the problem.
    sb.write("huse.toml", "[env]\nHUSE_DB = 3\n");
    let mut c = sb.cmd(&["runs"]);
    c.current_dir(&sub);
    let err = run(&mut c).expect(2).stderr();
    assert!(err.contains("huse.toml:2:") && err.contains("error"), "{err}");
}

#[test]
fn runs_fits_the_terminal_by_default_and_shows_headline_metrics() {
    let sb = Sandbox::new();
    let f = sb.write(
        "w.yaml",
        "name: widths\nstages:\n  source: { uses: toy-source, with: { count: 4 } }\n  \
         left: { uses: toy-scale, needs: [source], with: { metrics: 3 } }\n  \
         right: { uses: toy-scale, needs: [source], with: { metrics: 3, factor: 2.0 } }\n  \
         total: { uses: toy-sum, needs: [left, right] }\n\
         sweep:\n  left.factor: [1.0, 2.0]\n  left.offset: [0.0, 1.5]\n  right.offset: [0.25, 0.75]\n",
    );
    let err = sb.run(&[f.to_str().unwrap()]).expect(0).stderr();
    // The sweep as a whole: `run k of 8` as each run ends.
    for k in 1..=8 {
        assert!(err.contains(&format!("run {k} of 8 ended: widths@")), "{err}");
    }
    // Not a terminal here: 80 columns. The varying params and toy-sum's headline `sum`; the
    // name (experiment@params) and the other metrics are left out, with a note.
    let short = sb.run(&["runs"]).expect(0).stdout();
    assert!(short.lines().all(|l| l.chars().count() <= 80), "{short}");
    let header = short.lines().nth(1).unwrap();
    for col in ["id", "status", "left.factor", "left.offset", "right.offset", "sum"] {
        assert!(header.contains(col), "{col}: {short}");
    }
    assert!(!header.contains("left.mean") && !header.contains("widths@"), "{short}");
    assert!(short.contains("4 more metric(s) not shown") && short.contains("--all"), "{short}");
    // --all and -m give today's full table; csv is always whole.
    let all = sb.run(&["runs", "--all"]).expect(0).stdout();
    assert!(all.lines().nth(2).unwrap().contains("left.mean") && all.contains("widths@left.factor=1.0"), "{all}");
    assert!(all.lines().any(|l| l.chars().count() > 80));
    assert!(sb.run(&["runs", "-m", "*.mean"]).expect(0).stdout().contains("right.mean"));
    assert!(sb.run(&["runs", "-f", "csv"]).expect(0).stdout().lines().next().unwrap().contains("left.loss"));
    // --columns: exactly those, in that order; a wrong name is an error with the nearest.
    let csv = sb.run(&["runs", "-f", "csv", "--columns", "id,sum,left.factor"]).expect(0).stdout();
    assert!(csv.starts_with("id,sum,left.factor\n1,19,1.0\n"), "{csv}");
    let err = sb.run(&["runs", "--columns", "id,left.facter"]).expect(2).stderr();
    assert!(err.contains("no column `left.facter` (nearest: left.factor"), "{err}");
    // A metric with one value in every row (right's factor never changes, nor its loss) is
    // one line above the table, not a column; csv keeps it.
    assert!(all.starts_with("same in every row: right.loss 0.6667\n"), "{all}");
    assert!(!all.lines().nth(2).unwrap().contains("right.loss"), "{all}");
    assert!(sb.run(&["runs", "-f", "csv"]).expect(0).stdout().lines().next().unwrap().contains("right.loss"));
}

/// The documents hold: every relative link (and `#anchor`) of README.md and docs/ leads
/// somewhere, every `huse-run` command they show names a real subcommand (its `--help`
/// answers) or validates (an experiment file with its flags), and every complete experiment
/// they show as YAML validates.
#[test]
fn the_docs_links_commands_and_experiments_hold() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let mut docs = vec![root.join("README.md")];
    let mut stack = vec![root.join("docs")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                docs.push(p);
            }
        }
    }
    assert!(docs.len() >= 6, "README and the docs: {docs:?}");
    let sb = Sandbox::new();
    let mut problems = Vec::new();
    let mut checked = (0, 0, 0, 0);
    let mut helped = std::collections::BTreeSet::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        let shown = doc.strip_prefix(&root).unwrap().display().to_string();
        // Links.
        let mut rest = text.as_str();
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = &rest[..end];
            if target.starts_with("http://")
                || target.starts_with("https://")
                || target.contains(' ')
                || target.is_empty()
            {
                continue;
            }
            checked.0 += 1;
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let path = if file.is_empty() { doc.clone() } else { doc.parent().unwrap().join(file) };
            if !path.exists() {
                problems.push(format!("{shown}: link to {target}: no such file"));
                continue;
            }
            if !anchor.is_empty() && path.extension().is_some_and(|x| x == "md") {
                let slugs: Vec<String> = std::fs::read_to_string(&path)
                    .unwrap()
                    .lines()
                    .filter(|l| l.starts_with('#'))
                    .map(|l| slug(l.trim_start_matches('#')))
                    .collect();
                if !slugs.iter().any(|s| s == anchor) {
                    problems.push(format!("{shown}: link to {target}: no heading with that anchor"));
                }
            }
        }
        // Fenced blocks: commands and experiments.
        let mut in_block: Option<String> = None;
        let mut block = String::new();
        for line in text.lines() {
            let t = line.trim_start();
            if let Some(lang) = t.strip_prefix("```") {
                match in_block.take() {
                    None => {
                        in_block = Some(lang.trim().to_string());
                        block.clear();
                    }
                    Some(lang) => {
                        if lang == "yaml"
                            && block.lines().any(|l| l.starts_with("name:"))
                            && block.lines().any(|l| l.starts_with("stages:"))
                        {
                            checked.2 += 1;
                            let f = sb.write("doc.yaml", &block);
                            let out = sb
                                .cmd(&["validate", f.to_str().unwrap()])
                                .env("HUSE_ASSETS", root.join("../shared/assets"))
                                .output()
                                .unwrap();
                            if !out.status.success() {
                                problems.push(format!(
                                    "{shown}: experiment does not validate:\n{block}\n{}",
                                    String::from_utf8_lossy(&out.stderr)
                                ));
                            }
                        }
                    }
                }
                continue;
            }
            if in_block.is_some() {
                block.push_str(line);
                block.push('\n');
                let words = shell_words(line.split(" # ").next().unwrap());
                let Some(at) = words.iter().position(|w| w == "huse-run") else { continue };
                if words[..at].iter().any(|w| !w.contains('=')) {
                    continue; // part of another command (cargo ... -- huse-run args)
                }
                let args: Vec<&str> = words[at + 1..].iter().map(String::as_str).collect();
                // Global options first (`--db URL`), then the command.
                let mut k = 0;
                while k < args.len() && ["--db", "--cache"].contains(&args[k]) {
                    k += 2;
                }
                let Some(first) = args.get(k) else { continue };
                if first.ends_with(".yaml") {
                    let file = root.join(first);
                    if !file.exists() || !args[k + 1..].iter().all(|a| !a.contains("FILE") && !a.contains("...")) {
                        continue; // a placeholder (EXPERIMENT.yaml)
                    }
                    checked.1 += 1;
                    let mut v = vec!["validate", file.to_str().unwrap()];
                    v.extend(args[k + 1..].iter().filter(|a| !["--detach"].contains(a)).copied());
                    // Flags of a run that validate does not need to check.
                    let v: Vec<&str> = v.into_iter().collect();
                    // From the repository root, where the docs say to run them.
                    let out = sb
                        .cmd(&v)
                        .current_dir(&root)
                        .env("HUSE_ASSETS", root.join("../shared/assets"))
                        .output()
                        .unwrap();
                    if !out.status.success() {
                        problems.push(format!(
                            "{shown}: `{}` does not validate: {}",
                            line.trim(),
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                } else if first.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !first.is_empty() {
                    // The whole line, flags and values, as the parser sees it (placeholders such as
                    // RUN_ID or <dir> aside: their command is checked by its --help below).
                    let placeholder = |a: &&str| {
                        a.contains("...")
                            || a.starts_with('[')
                            || a.contains('<')
                            || (a.len() >= 2
                                && a.chars().any(|c| c.is_ascii_uppercase())
                                && a.chars()
                                    .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit() || c == '-'))
                    };
                    if !args.iter().any(placeholder) {
                        checked.3 += 1;
                        if let Err(e) = huse_run::cli::parses(&args) {
                            problems.push(format!("{shown}: `{}` does not parse: {e}", line.trim()));
                        }
                    }
                    let sub = if ["db", "cache"].contains(first) {
                        format!("{first} {}", args.get(k + 1).unwrap_or(&""))
                    } else {
                        first.to_string()
                    };
                    if helped.insert(sub.clone()) {
                        checked.1 += 1;
                        let mut v: Vec<&str> = sub.split(' ').filter(|s| !s.is_empty()).collect();
                        v.push("--help");
                        let out = sb.cmd(&v).output().unwrap();
                        if !out.status.success() {
                            problems.push(format!(
                                "{shown}: `huse-run {sub}` is not a command: {}",
                                String::from_utf8_lossy(&out.stderr)
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
    eprintln!("checked links, commands, experiments, parsed lines: {checked:?}");
    assert!(
        checked.0 >= 15 && checked.1 >= 15 && checked.2 >= 1 && checked.3 >= 20,
        "checked links, commands, experiments, parsed lines: {checked:?}"
    );
}

/// GitHub's anchor of a heading: lower case, spaces to `-`, punctuation but `-` and `_` dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| {
            if c == ' ' {
                Some('-')
            } else if c.is_alphanumeric() || c == '-' || c == '_' {
                Some(c)
            } else {
                None
            }
        })
        .collect()
}

/// A command line split as a shell would (quotes grouped; no expansion).
fn shell_words(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quote, mut any) = (Vec::new(), String::new(), None::<char>, false);
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}
