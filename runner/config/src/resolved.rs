//! What a compiled run records: its params (every leaf of the resolved config, flattened)
//! and the resolved config as YAML.

use crate::yaml::{Node, Value};

/// Every leaf of the resolved tree, flattened: `seed`, `<stage>.uses`, `<stage>.<with key
/// path>`. The device is not a param: it is the run's own `device` column (parsed once, in
/// the stage pass).
pub fn params_of(tree: &Node) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    if let Some(n) = tree.get("seed") {
        out.push(("seed".to_string(), n.to_json()));
    }
    if let Some(stages) = tree.get("stages").and_then(Node::as_map) {
        for (k, body) in stages {
            if let Some(u) = body.get("uses") {
                out.push((format!("{}.uses", k.name), u.to_json()));
            }
            if let Some(w) = body.get("with") {
                let mut leaves = Vec::new();
                w.flatten(&k.name, &mut leaves);
                out.extend(leaves.into_iter().filter(|(p, v)| p != &k.name || !v.is_null()));
            }
        }
    }
    out
}

/// The resolved config as YAML, in the file's key order, without `sweep`, `repeat` and
/// `launcher` (how a sweep is submitted is not part of a run's config).
pub fn yaml(tree: &Node) -> String {
    let mut t = tree.clone();
    if let Value::Map(m) = &mut t.value {
        m.retain(|(k, _)| !["sweep", "repeat", "launcher"].contains(&k.name.as_str()));
    }
    serde_saphyr::to_string(&ordered_json(&t)).unwrap_or_else(|_| t.to_json().to_string())
}

/// JSON that keeps the file's key order (for a readable resolved config).
fn ordered_json(n: &Node) -> OrderedJson<'_> {
    OrderedJson(n)
}

struct OrderedJson<'a>(&'a Node);

impl serde::Serialize for OrderedJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match &self.0.value {
            Value::Map(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m {
                    map.serialize_entry(&k.name, &OrderedJson(v))?;
                }
                map.end()
            }
            Value::Seq(v) => {
                let mut seq = s.serialize_seq(Some(v.len()))?;
                for x in v {
                    seq.serialize_element(&OrderedJson(x))?;
                }
                seq.end()
            }
            _ => self.0.to_json().serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::tests::{DIAMOND, compile_ok};

    #[test]
    fn params_are_the_flattened_leaves() {
        let e = compile_ok(DIAMOND, &[]);
        let p: std::collections::BTreeMap<_, _> = e.runs[0].params.iter().cloned().collect();
        assert_eq!(p["seed"], 3);
        assert!(!p.contains_key("device"), "the device is the run's column, not a param");
        assert_eq!(e.runs[0].device, huse_stage_api::DeviceSpec::Auto);
        assert_eq!(p["left.factor"], 2.0);
        assert_eq!(p["total.uses"], "toy-sum");
        assert!(!p.contains_key("right"), "a stage without `with:` has no null param");
        assert!(e.runs[0].resolved_yaml.starts_with("name: d\nseed: 3\nstages:"), "{}", e.runs[0].resolved_yaml);
    }
}
