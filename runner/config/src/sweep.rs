//! The sweep pass: `sweep:` as a grid (`key: [values]`, cartesian product) or as explicit
//! `points:` combined with an optional `grid:`, each key checked to address a stage or a
//! top-level setting; returns one (label, assignments) per point.

use std::collections::BTreeSet;

use crate::yaml::{Key, Node, Value};
use crate::{Ctx, did_you_mean, settable_path};

/// One point of a sweep or search: its label and its assignments (tree path, value).
pub(crate) type Point = (String, Vec<(Vec<String>, Node)>);

/// The sweep's points. Without a sweep: one empty point.
pub(crate) fn points(
    cx: &mut Ctx,
    root: &Node,
    stage_names: &BTreeSet<String>,
    repeat: u32,
    max_runs: usize,
) -> Vec<Point> {
    let Some(sweep) = root.get("sweep") else {
        if repeat as usize > max_runs {
            let origin = root.get("repeat").map(|n| n.origin.clone()).unwrap_or_else(|| root.origin.clone());
            cx.err(
                &origin,
                "repeat",
                format!(
                    "{repeat} seeds make {repeat} runs, more than the limit of {max_runs} (raise it with --max-runs)"
                ),
            );
            return Vec::new();
        }
        return vec![(String::new(), Vec::new())];
    };
    let Some(map) = sweep.as_map() else {
        cx.err(&sweep.origin, "sweep", format!("expected a mapping, found {}", sweep.value.type_name()));
        return Vec::new();
    };
    let explicit = map.iter().any(|(k, _)| k.name == "grid" || k.name == "points");
    let mut grid: Vec<(Key, Vec<Node>)> = Vec::new();
    let mut points: Vec<Vec<(Key, Node)>> = Vec::new();
    let grid_entries = |cx: &mut Ctx, m: &[(Key, Node)], prefix: &str| {
        let mut out = Vec::new();
        for (k, v) in m {
            match &v.value {
                Value::Seq(items) if !items.is_empty() => out.push((k.clone(), items.clone())),
                _ => cx.err(
                    &v.origin,
                    &format!("{prefix}{}", k.name),
                    format!("expected a non-empty list of values, found {}", v.value.type_name()),
                ),
            }
        }
        out
    };
    if explicit {
        for (k, v) in map {
            match k.name.as_str() {
                "grid" => match v.as_map() {
                    Some(m) => grid = grid_entries(cx, m, "sweep.grid."),
                    None => cx.err(&v.origin, "sweep.grid", "expected a mapping of key: [values]"),
                },
                "points" => match &v.value {
                    Value::Seq(items) => {
                        for (i, p) in items.iter().enumerate() {
                            match p.as_map() {
                                Some(m) => points.push(m.to_vec()),
                                None => {
                                    cx.err(&p.origin, &format!("sweep.points.{i}"), "expected a mapping of key: value")
                                }
                            }
                        }
                    }
                    _ => cx.err(&v.origin, "sweep.points", "expected a list of mappings"),
                },
                other => cx.err(
                    &k.origin,
                    &format!("sweep.{other}"),
                    format!(
                        "unknown key `{other}`{} (a sweep with `grid:` or `points:` takes only those two)",
                        did_you_mean(other, ["grid", "points"])
                    ),
                ),
            }
        }
    } else {
        grid = grid_entries(cx, map, "sweep.");
    }
    // Check the keys address something in the experiment.
    let check = |cx: &mut Ctx, k: &Key, prefix: &str| match settable_path(&k.name, stage_names) {
        Ok(path) => path,
        Err(why) => {
            cx.err(&k.origin, &format!("{prefix}{}", k.name), format!("sweep key {why}"));
            Vec::new()
        }
    };
    let prefix = if explicit { "sweep.grid." } else { "sweep." };
    let grid: Vec<(Key, Vec<String>, Vec<Node>)> =
        grid.into_iter().map(|(k, v)| (k.clone(), check(cx, &k, prefix), v)).collect();
    // Count before expanding: a huge grid must not exhaust memory.
    let n_combos = grid.iter().fold(1usize, |n, (_, _, v)| n.saturating_mul(v.len()));
    let n_runs = n_combos.saturating_mul(points.len().max(1)).saturating_mul(repeat as usize);
    if n_runs > max_runs {
        let shown = if n_runs == usize::MAX { "more than 2^64".to_string() } else { n_runs.to_string() };
        cx.err(
            &sweep.origin,
            "sweep",
            format!("the sweep makes {shown} runs, more than the limit of {max_runs} (raise it with --max-runs)"),
        );
        return Vec::new();
    }
    let axes: Vec<Axis> = grid.into_iter().map(|(k, path, values)| (k.name, path, values)).collect();
    let combos = product(&axes);
    let mut pts: Vec<Vec<Assignment>> = Vec::new();
    if points.is_empty() {
        pts = combos;
    } else {
        for p in &points {
            let entries: Vec<_> =
                p.iter().map(|(k, v)| (k.name.clone(), check(cx, k, "sweep.points."), v.clone())).collect();
            for c in &combos {
                let mut e = entries.clone();
                e.extend(c.iter().cloned());
                pts.push(e);
            }
        }
    }
    pts.into_iter().map(|p| (label(&p), p.into_iter().map(|(_, path, v)| (path, v)).collect())).collect()
}

/// One assignment of a point: the key as written, its tree path, the value.
pub(crate) type Assignment = (String, Vec<String>, Node);
/// A grid axis: the key as written, its tree path, its values.
pub(crate) type Axis = (String, Vec<String>, Vec<Node>);

/// Every combination of the axes' values (the first axis varies slowest).
pub(crate) fn product(axes: &[Axis]) -> Vec<Vec<Assignment>> {
    let mut combos: Vec<Vec<Assignment>> = vec![Vec::new()];
    for (k, path, values) in axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((k.clone(), path.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    combos
}

/// A point's label: `k=v,k=v` in its order.
pub(crate) fn label(p: &[Assignment]) -> String {
    p.iter().map(|(k, _, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use crate::tests::{DIAMOND, compile_err, compile_ok};

    #[test]
    fn a_grid_is_the_cartesian_product_in_file_order() {
        let e = compile_ok(&format!("{DIAMOND}sweep:\n  left.factor: [1, 2]\n  right.offset: [0, 5, 7]\n"), &[]);
        let names: Vec<&str> = e.runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names.len(), 6);
        assert_eq!(names[0], "d@left.factor=1,right.offset=0");
        assert_eq!(names[5], "d@left.factor=2,right.offset=7");
        assert_eq!(e.runs[5].point, "left.factor=2,right.offset=7");
    }

    #[test]
    fn points_combine_with_a_grid_and_repeat_adds_seeds() {
        let text = format!(
            "{DIAMOND}repeat: 2\nsweep:\n  points:\n    - {{ left.factor: 1 }}\n    - {{ left.factor: 3 }}\n  grid:\n    right.factor: [4, 5]\n"
        );
        let e = compile_ok(&text, &[]);
        assert_eq!(e.runs.len(), 8);
        assert_eq!(e.runs[0].name, "d@left.factor=1,right.factor=4/seed=3");
        assert_eq!(e.runs[1].name, "d@left.factor=1,right.factor=4/seed=4");
        assert_eq!(e.runs[1].seed, 4);
    }

    #[test]
    fn bad_sweep_keys_and_values_are_positioned() {
        let e = compile_err(&format!("{DIAMOND}sweep:\n  lefft.factor: [1]\n  right.factor: 2\n"), &[]);
        assert!(
            e.iter().any(|d| d.starts_with("e.yaml:9:3: sweep.lefft.factor: sweep key `lefft.factor` names no stage")
                && d.contains("did you mean `left`")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|d| d.starts_with("e.yaml:10:17: sweep.right.factor: expected a non-empty list")),
            "{e:?}"
        );
        let e = compile_err(&format!("{DIAMOND}sweep:\n  grid: {{}}\n  pointz: []\n"), &[]);
        assert!(e.iter().any(|d| d.contains("unknown key `pointz`; did you mean `points`?")), "{e:?}");
        let e = compile_err(&format!("{DIAMOND}sweep:\n  stages: [1]\n"), &[]);
        assert!(e.iter().any(|d| d.contains("sweep.stages: sweep key `stages`")), "{e:?}");
    }

    #[test]
    fn sweep_size_is_capped_before_expanding() {
        let values = (0..100).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        let text = format!(
            "{DIAMOND}sweep:\n  left.factor: [{values}]\n  left.offset: [{values}]\n  right.factor: [{values}]\n"
        );
        let e = compile_err(&text, &[]);
        assert!(e.iter().any(|d| d.contains("the sweep makes 1000000 runs, more than the limit of 100000")), "{e:?}");
        let o = crate::Overrides { max_runs: Some(10), repeat: Some(6), ..Default::default() };
        let small = format!("{DIAMOND}sweep:\n  left.factor: [1, 2]\n");
        let e = crate::compile_str(&small, "e.yaml", &o, &crate::tests::registry(), &|_| None).unwrap_err().to_string();
        assert!(e.contains("makes 12 runs, more than the limit of 10"), "{e}");
    }

    fn with_cli_sweep(text: &str, sweep: &[&str]) -> Result<Vec<String>, Vec<String>> {
        let o = crate::Overrides { sweep: sweep.iter().map(|s| s.to_string()).collect(), ..Default::default() };
        crate::compile_str(text, "e.yaml", &o, &crate::tests::registry(), &|_| None)
            .map(|e| e.runs.iter().map(|r| r.point.clone()).collect())
            .map_err(|d| d.0.iter().map(|d| d.to_string()).collect())
    }

    #[test]
    fn command_line_sweeps_add_grid_axes_to_the_files_sweep() {
        // Without a sweep in the file: a grid of its own.
        let points = with_cli_sweep(DIAMOND, &["left.factor=1,2,3"]).unwrap();
        assert_eq!(points, ["left.factor=1", "left.factor=2", "left.factor=3"]);
        // A YAML list, and two axes combine.
        let points = with_cli_sweep(DIAMOND, &["left.factor=[1, 2]", "right.offset=0,5"]).unwrap();
        assert_eq!(points.len(), 4, "{points:?}");
        // Beside the file's axes; an axis of the same key replaces the file's.
        let file = format!("{DIAMOND}sweep:\n  left.factor: [7, 8]\n  right.factor: [1, 2]\n");
        let points = with_cli_sweep(&file, &["left.factor=3"]).unwrap();
        assert_eq!(points, ["left.factor=3,right.factor=1", "left.factor=3,right.factor=2"]);
        // Into the grid of a `grid:`/`points:` sweep.
        let file = format!("{DIAMOND}sweep:\n  points:\n    - {{ left.factor: 5 }}\n");
        let points = with_cli_sweep(&file, &["right.factor=1,2"]).unwrap();
        assert_eq!(points.len(), 2, "{points:?}");
        assert!(points.iter().all(|p| p.contains("left.factor=5")), "{points:?}");
        // Mistakes name the argument.
        let e = with_cli_sweep(DIAMOND, &["lefft.factor=1,2"]).unwrap_err();
        assert!(e.iter().any(|d| d.contains("--sweep lefft.factor=1,2") && d.contains("did you mean `left`")), "{e:?}");
        let e = with_cli_sweep(DIAMOND, &["left.factor"]).unwrap_err();
        assert!(e.iter().any(|d| d.contains("expected KEY=V1,V2")), "{e:?}");
        let e = with_cli_sweep(DIAMOND, &["left.factor=[]"]).unwrap_err();
        assert!(e.iter().any(|d| d.contains("expected a non-empty list")), "{e:?}");
    }
}
