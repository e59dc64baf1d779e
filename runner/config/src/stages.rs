//! The passes over one resolved tree (a sweep point after overrides and interpolation):
//! run settings ([`settings`]), stage entries ([`entries`]), dependency order
//! ([`topo_order`]), artifact wiring ([`wire`]) and each stage's own validation
//! ([`validate_configs`]). Each pass records its problems in the shared diagnostics; a
//! later pass runs only when the earlier ones found none.

use std::collections::BTreeMap;

use huse_stage_api::DeviceSpec;

use crate::yaml::{Key, Node, Origin, Value};
use crate::{Ctx, Edge, STAGE_KEYS, StageSpec, did_you_mean, valid_name};

/// Validates one resolved tree; returns (seed, device, stages in topological order).
pub(crate) fn compile_tree(cx: &mut Ctx, tree: &Node) -> Option<(u64, DeviceSpec, Vec<StageSpec>)> {
    let before = cx.errors;
    let (seed, device) = settings(cx, tree);
    let Some(stages_node) = tree.get("stages") else {
        cx.err(&tree.origin, "stages", "missing required key `stages`");
        return None;
    };
    let Some(stage_map) = stages_node.as_map().filter(|m| !m.is_empty()) else {
        cx.err(&stages_node.origin, "stages", "expected a non-empty mapping of stage name -> { uses, needs, with }");
        return None;
    };
    let mut specs = entries(cx, stage_map);
    if cx.errors > before {
        return None;
    }
    let key_origin = |name: &str| {
        stage_map.iter().find(|(k, _)| k.name == name).map(|(k, _)| k.origin.clone()).unwrap_or(Origin::Default)
    };
    let order = match topo_order(&specs) {
        Ok(o) => o,
        Err(cycle) => {
            let first = &cycle[0];
            cx.err(
                &key_origin(first),
                &format!("stages.{first}.needs"),
                format!("dependency cycle: {}", cycle.join(" -> ")),
            );
            return None;
        }
    };
    wire(cx, &mut specs, &key_origin);
    validate_configs(cx, &specs, tree);
    if cx.errors > before {
        return None;
    }
    let mut by_name: BTreeMap<String, StageSpec> = specs.into_iter().map(|s| (s.name.clone(), s)).collect();
    Some((seed, device, order.iter().map(|n| by_name.remove(n).expect("ordered names are stage names")).collect()))
}

/// `seed`, `device` and `description`.
pub(crate) fn settings(cx: &mut Ctx, tree: &Node) -> (u64, DeviceSpec) {
    let seed = match tree.get("seed") {
        None => 0,
        Some(Node { value: Value::Int(i), .. }) if *i >= 0 => *i as u64,
        Some(n) => {
            cx.err(&n.origin, "seed", format!("expected a non-negative integer, found {}", n.value.type_name()));
            0
        }
    };
    let device = match tree.get("device") {
        None => DeviceSpec::Auto,
        Some(n) => n.to_string().parse::<DeviceSpec>().unwrap_or_else(|e| {
            cx.err(&n.origin, "device", e);
            DeviceSpec::Auto
        }),
    };
    if let Some(d) = tree.get("description")
        && !matches!(d.value, Value::Str(_))
    {
        cx.err(&d.origin, "description", "expected a string");
    }
    (seed, device)
}

/// Each `stages:` entry: its name, keys, `uses` (a registered kind), `needs` (other stages)
/// and `with` (a mapping). Inputs are left empty for [`wire`].
pub(crate) fn entries(cx: &mut Ctx, stage_map: &[(Key, Node)]) -> Vec<StageSpec> {
    let names: Vec<&str> = stage_map.iter().map(|(k, _)| k.name.as_str()).collect();
    let mut specs = Vec::new();
    for (k, body) in stage_map {
        let sp = format!("stages.{}", k.name);
        if !valid_name(&k.name) {
            cx.err(&k.origin, &sp, "stage names may use letters, digits, `-`, `_` and `.` only");
        }
        let Some(m) = body.as_map() else {
            cx.err(&body.origin, &sp, format!("expected a mapping with `uses`, found {}", body.value.type_name()));
            continue;
        };
        for (sk, _) in m {
            if !STAGE_KEYS.contains(&sk.name.as_str()) {
                let hint = did_you_mean(&sk.name, STAGE_KEYS.iter().copied());
                cx.err(
                    &sk.origin,
                    &format!("{sp}.{}", sk.name),
                    format!("unknown key `{}`{hint} (a stage takes uses, needs, with)", sk.name),
                );
            }
        }
        let kind = match body.get("uses") {
            Some(Node { value: Value::Str(s), origin }) => {
                if cx.registry.get(s).is_none() {
                    let hint = did_you_mean(s, cx.registry.kinds());
                    let known = cx.registry.kinds().collect::<Vec<_>>().join(", ");
                    cx.err(
                        origin,
                        &format!("{sp}.uses"),
                        format!("unknown stage kind `{s}`{hint} (known kinds: {known})"),
                    );
                }
                s.clone()
            }
            Some(n) => {
                cx.err(
                    &n.origin,
                    &format!("{sp}.uses"),
                    format!("expected a stage kind name, found {}", n.value.type_name()),
                );
                continue;
            }
            None => {
                cx.err(&k.origin, &sp, "missing required key `uses`");
                continue;
            }
        };
        let needs = needs_of(cx, &sp, &k.name, body.get("needs"), &names);
        let with = body.get("with");
        if let Some(w) = with
            && !matches!(w.value, Value::Map(_) | Value::Null)
        {
            cx.err(&w.origin, &format!("{sp}.with"), format!("expected a mapping, found {}", w.value.type_name()));
            continue;
        }
        specs.push(StageSpec {
            name: k.name.clone(),
            kind,
            needs,
            inputs: Vec::new(),
            config: with.map(Node::to_json).unwrap_or(serde_json::Value::Null),
        });
    }
    specs
}

fn needs_of(cx: &mut Ctx, sp: &str, me: &str, node: Option<&Node>, names: &[&str]) -> Vec<String> {
    let Some(n) = node else { return Vec::new() };
    let items: Vec<&Node> = match &n.value {
        Value::Seq(v) => v.iter().collect(),
        Value::Str(_) => vec![n],
        _ => {
            cx.err(
                &n.origin,
                &format!("{sp}.needs"),
                format!("expected a list of stage names, found {}", n.value.type_name()),
            );
            return Vec::new();
        }
    };
    let mut needs = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("{sp}.needs.{i}");
        match &item.value {
            Value::Str(s) if s == me => cx.err(&item.origin, &path, format!("stage `{s}` cannot need itself")),
            Value::Str(s) if names.contains(&s.as_str()) => needs.push(s.clone()),
            Value::Str(s) => {
                let hint = did_you_mean(s, names.iter().copied());
                cx.err(
                    &item.origin,
                    &path,
                    format!("unknown stage `{s}` in needs{hint} (stages: {})", names.join(", ")),
                );
            }
            _ => cx.err(&item.origin, &path, format!("expected a stage name, found {}", item.value.type_name())),
        }
    }
    needs
}

/// Kahn's algorithm in file order; on a cycle returns its members `[a, b, a]`.
pub(crate) fn topo_order(specs: &[StageSpec]) -> Result<Vec<String>, Vec<String>> {
    let mut done: Vec<String> = Vec::new();
    let mut left: Vec<&StageSpec> = specs.iter().collect();
    while !left.is_empty() {
        let pos = left.iter().position(|s| s.needs.iter().all(|n| done.contains(n)));
        match pos {
            Some(i) => done.push(left.remove(i).name.clone()),
            None => {
                // Every remaining stage waits on another remaining one: walk until a repeat.
                let mut path = vec![left[0].name.clone()];
                loop {
                    let cur = specs.iter().find(|s| s.name == *path.last().unwrap()).unwrap();
                    let next = cur.needs.iter().find(|n| !done.contains(n)).unwrap().clone();
                    if let Some(start) = path.iter().position(|p| *p == next) {
                        let mut cycle = path[start..].to_vec();
                        cycle.push(next);
                        return Err(cycle);
                    }
                    path.push(next);
                }
            }
        }
    }
    Ok(done)
}

/// Resolves every declared input of every stage to the `needs` that give it, keeping the
/// edges in the specs; a required input nobody gives, or a single input several give, is
/// an error at the stage's `needs`.
pub(crate) fn wire(cx: &mut Ctx, specs: &mut [StageSpec], key_origin: &dyn Fn(&str) -> Origin) {
    let gives_by_stage: BTreeMap<String, Vec<String>> = specs
        .iter()
        .map(|s| {
            let outs = cx.registry.get(&s.kind).map(|e| e.stage.outputs_for(&s.config)).unwrap_or_default();
            (s.name.clone(), outs.into_iter().map(|o| o.name).collect())
        })
        .collect();
    let gives = |stage: &str, artifact: &str| gives_by_stage[stage].iter().any(|o| o == artifact);
    let mut problems = Vec::new();
    for spec in specs.iter_mut() {
        let entry = cx.registry.get(&spec.kind).expect("kinds checked by entries()");
        for input in entry.stage.inputs_for(&spec.config) {
            let providers: Vec<String> = spec.needs.iter().filter(|n| gives(n, &input.name)).cloned().collect();
            let sp = format!("stages.{}.needs", spec.name);
            if providers.is_empty() && input.required {
                let givers: Vec<&str> = cx
                    .registry
                    .entries()
                    .filter(|(_, e)| e.stage.outputs().iter().any(|o| o.name == input.name))
                    .map(|(k, _)| k)
                    .collect();
                problems.push((
                    key_origin(&spec.name),
                    sp,
                    format!(
                        "stage `{}` ({}) takes artifact `{}`, but none of its needs [{}] gives it (kinds that give it: {})",
                        spec.name,
                        spec.kind,
                        input.name,
                        spec.needs.join(", "),
                        if givers.is_empty() { "none".to_string() } else { givers.join(", ") }
                    ),
                ));
            } else if providers.len() > 1 && !input.many {
                problems.push((
                    key_origin(&spec.name),
                    sp,
                    format!(
                        "stage `{}` takes one `{}`, but several of its needs give it: {}",
                        spec.name,
                        input.name,
                        providers.join(", ")
                    ),
                ));
            }
            spec.inputs.extend(providers.into_iter().map(|from| Edge { artifact: input.name.clone(), from }));
        }
    }
    for (origin, path, message) in problems {
        cx.err(&origin, &path, message);
    }
}

/// Each stage's own validation of its `with:`, positioned at the offending key.
pub(crate) fn validate_configs(cx: &mut Ctx, specs: &[StageSpec], tree: &Node) {
    for spec in specs {
        let entry = cx.registry.get(&spec.kind).expect("kinds checked by entries()").clone();
        let Err(e) = entry.stage.validate(&spec.config) else { continue };
        let mut path = vec!["stages".to_string(), spec.name.clone(), "with".to_string()];
        path.extend(e.path.iter().cloned());
        let mut message = e.message.clone();
        let mut unknown_key = false;
        // serde reports an unknown field at its parent: point at the field itself.
        if let Some(field) = message.strip_prefix("unknown field `").and_then(|r| r.split('`').next()).map(String::from)
        {
            let expected: Vec<String> = message
                .split("expected ")
                .nth(1)
                .map(|r| {
                    r.split(['`', ','])
                        .map(str::trim)
                        .filter(|s| !s.is_empty() && *s != "one of" && *s != "or")
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            message = format!("{message}{}", did_you_mean(&field, expected.iter().map(String::as_str)));
            if path.last() != Some(&field) {
                path.push(field);
            }
            unknown_key = true;
        }
        let origin = if unknown_key { tree.key_origin_of(&path) } else { tree.origin_of(&path) };
        cx.err(&origin, &path.join("."), message);
    }
}

#[cfg(test)]
mod tests {
    use crate::Edge;
    use crate::tests::{DIAMOND, compile_err, compile_ok};

    #[test]
    fn stages_come_in_dependency_order_with_their_edges() {
        let text = DIAMOND.replace("  source: { uses: toy-source, with: { count: 4 } }\n", "")
            + "  source: { uses: toy-source }\n";
        let e = compile_ok(&text, &[]);
        let order: Vec<&str> = e.runs[0].stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(order, ["source", "left", "right", "total"]);
        let total = &e.runs[0].stages[3];
        assert_eq!(
            total.inputs,
            vec![
                Edge { artifact: "scaled.json".into(), from: "left".into() },
                Edge { artifact: "scaled.json".into(), from: "right".into() }
            ]
        );
        assert_eq!(e.runs[0].stages[1].inputs, vec![Edge { artifact: "numbers.json".into(), from: "source".into() }]);
    }

    #[test]
    fn entry_errors_are_collected_and_positioned() {
        let text = "name: x\nstages:\n  a: { uses: toy-sorce, neds: [] }\n  b: { uses: toy-scale, needs: [c, b] }\n  c: { uses: 3 }\n  d: { uses: toy-scale, with: [1] }\n";
        let e = compile_err(text, &[]);
        let want = [
            "e.yaml:3:25: stages.a.neds: unknown key `neds`; did you mean `needs`?",
            "e.yaml:3:14: stages.a.uses: unknown stage kind `toy-sorce`; did you mean `toy-source`?",
            "e.yaml:4:36: stages.b.needs.1: stage `b` cannot need itself",
            "e.yaml:5:14: stages.c.uses: expected a stage kind name, found an integer",
            "e.yaml:6:31: stages.d.with: expected a mapping, found a list",
        ];
        for w in want {
            assert!(e.iter().any(|d| d.starts_with(w)), "missing {w:?} in {e:#?}");
        }
    }

    #[test]
    fn an_error_repeated_by_every_sweep_point_still_stops_the_point() {
        // Each point repeats the same entry error (listed once); the later passes must not
        // run on the incomplete stage list (they used to panic in the topological sort).
        let text = "name: x\nstages:\n  a: { uses: toy-source }\n  b: 3\n  c: { uses: toy-scale, needs: [b] }\nsweep:\n  a.count: [1, 2]\n";
        let e = compile_err(text, &[]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("stages.b: expected a mapping"), "{e:?}");
    }

    #[test]
    fn cycles_name_their_members() {
        let text = "name: x\nstages:\n  a: { uses: toy-scale, needs: [b] }\n  b: { uses: toy-scale, needs: [a] }\n";
        assert_eq!(compile_err(text, &[])[0], "e.yaml:3:3: stages.a.needs: dependency cycle: a -> b -> a");
    }

    #[test]
    fn wiring_errors_name_the_artifact_and_the_givers() {
        let text = "name: x\nstages:\n  s: { uses: toy-source }\n  t: { uses: toy-scale }\n  u: { uses: toy-scale, needs: [s] }\n  v: { uses: toy-scale, needs: [s, u] }\n  w: { uses: toy-scale, needs: [s] }\n  z: { uses: toy-scale, needs: [u, w] }\n";
        let e = compile_err(text, &[]);
        assert!(e.iter().any(|d| d.starts_with("e.yaml:4:3: stages.t.needs: stage `t` (toy-scale) takes artifact `numbers.json`, but none of its needs [] gives it (kinds that give it: toy-source)")), "{e:#?}");
        assert!(!e.iter().any(|d| d.contains("stages.v.needs")), "v's needs give numbers.json once: {e:#?}");
        assert!(e.iter().any(|d| d.contains("stages.z.needs")), "{e:#?}");
    }

    #[test]
    fn a_stage_config_error_points_at_the_key() {
        let e = compile_err(DIAMOND.replace("factor: 2.0", "factr: 2.0").as_str(), &[]);
        assert!(
            e[0].starts_with("e.yaml:5:55: stages.left.with.factr: unknown field `factr`")
                && e[0].ends_with("did you mean `factor`?"),
            "{e:?}"
        );
        let e = compile_err(DIAMOND, &["left.factor=[1]"]);
        assert!(
            e[0].starts_with("e.yaml (command line `--set left.factor=[1]`): stages.left.with.factor: invalid type"),
            "{e:?}"
        );
    }
}
