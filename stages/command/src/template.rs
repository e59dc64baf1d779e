//! Run-time references in a command's argv and env: `${params.NAME}`, `${inputs.ARTIFACT}`
//! and `${stage.FIELD}`, filled in when the stage runs (the experiment loader leaves dotted
//! references alone).

use std::collections::BTreeMap;

/// The `${stage.FIELD}` names a command may use.
pub const STAGE_FIELDS: &[&str] = &["name", "seed", "device", "threads", "out_dir", "work_dir", "json", "metrics"];

/// What the references stand for in one run of the stage.
pub struct Values<'a> {
    /// The `params:` mapping.
    pub params: &'a serde_json::Map<String, serde_json::Value>,
    /// Artifact name -> path (several providers: joined by `:`).
    pub inputs: &'a BTreeMap<String, String>,
    /// `stage.FIELD` -> value.
    pub stage: &'a BTreeMap<&'static str, String>,
}

/// A param as text: strings as they are, other values as JSON (`30`, `0.5`, `true`, `[1,2]`).
pub fn param_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Checks every reference in `s` against what will exist (`inputs` the declared input
/// names), without values: the message names the bad reference and what exists.
pub fn check(s: &str, params: &serde_json::Map<String, serde_json::Value>, inputs: &[String]) -> Result<(), String> {
    for r in references(s)? {
        match r.split_once('.') {
            Some(("params", k)) if params.contains_key(k) => {}
            Some(("params", k)) => {
                return Err(format!(
                    "`${{{r}}}` names `{k}`, which `params` does not have (it has: {})",
                    names(params.keys())
                ));
            }
            Some(("inputs", k)) if inputs.iter().any(|i| i == k) => {}
            Some(("inputs", k)) => {
                return Err(format!(
                    "`${{{r}}}` names `{k}`, which `inputs` does not list (it lists: {})",
                    names(inputs)
                ));
            }
            Some(("stage", k)) if STAGE_FIELDS.contains(&k) => {}
            Some(("stage", k)) => {
                return Err(format!(
                    "`${{stage.{k}}}` is not known; the stage's fields are {}",
                    STAGE_FIELDS.join(", ")
                ));
            }
            _ => {
                return Err(format!(
                    "`${{{r}}}` is not known: write `${{params.NAME}}`, `${{inputs.ARTIFACT}}` or `${{stage.FIELD}}`"
                ));
            }
        }
    }
    Ok(())
}

/// `s` with every reference replaced by its value (checked beforehand by [`check`]).
pub fn fill(s: &str, v: &Values) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    for (range, name) in spans(s)? {
        out.push_str(&s[at..range.start]);
        let value = match name.split_once('.') {
            Some(("params", k)) => v.params.get(k).map(param_text),
            Some(("inputs", k)) => v.inputs.get(k).cloned(),
            Some(("stage", k)) => v.stage.get(k).cloned(),
            _ => None,
        };
        out.push_str(&value.ok_or_else(|| format!("`${{{name}}}` has no value"))?);
        at = range.end;
    }
    out.push_str(&s[at..]);
    Ok(out)
}

/// The dotted names referenced in `s`.
fn references(s: &str) -> Result<Vec<&str>, String> {
    Ok(spans(s)?.into_iter().map(|(_, name)| name).collect())
}

/// Each `${name}` in `s`: its byte range (`$` to `}`) and the name.
fn spans(s: &str) -> Result<Vec<(std::ops::Range<usize>, &str)>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = s[at..].find("${") {
        let open = at + i;
        let len = s[open + 2..].find('}').ok_or_else(|| format!("unclosed `${{` in \"{s}\""))?;
        out.push((open..open + len + 3, &s[open + 2..open + 2 + len]));
        at = open + len + 3;
    }
    Ok(out)
}

fn names<S: AsRef<str>>(it: impl IntoIterator<Item = S>) -> String {
    let v: Vec<String> = it.into_iter().map(|s| s.as_ref().to_string()).collect();
    if v.is_empty() { "nothing".into() } else { v.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_checked_then_filled() {
        let params = serde_json::json!({"epochs": 30, "name": "a b", "lr": 0.5}).as_object().unwrap().clone();
        let inputs: BTreeMap<String, String> = [("x.bin".to_string(), "/c/x.bin".to_string())].into();
        let stage: BTreeMap<&'static str, String> = [("threads", "4".to_string())].into();
        let s = "--epochs=${params.epochs} --name ${params.name} ${inputs.x.bin} -j${stage.threads} ${params.lr}";
        check(s, &params, &["x.bin".into()]).unwrap();
        let v = Values { params: &params, inputs: &inputs, stage: &stage };
        assert_eq!(fill(s, &v).unwrap(), "--epochs=30 --name a b /c/x.bin -j4 0.5");
        assert!(check("${params.epoch}", &params, &[]).unwrap_err().contains("it has: epochs, lr, name"));
        assert!(check("${inputs.y}", &params, &["x.bin".into()]).unwrap_err().contains("it lists: x.bin"));
        assert!(check("${stage.cores}", &params, &[]).unwrap_err().contains("threads"));
        assert!(check("${seed}", &params, &[]).unwrap_err().contains("`${params.NAME}`"));
        assert!(check("${params.x", &params, &[]).unwrap_err().contains("unclosed"));
    }
}
