//! `huse-run list`: the stage kinds `uses:` can name — inputs, outputs, version, source —
//! and the devices of this build; `list --config KIND`: the keys of a kind's `with:` block,
//! read from the JSON Schema the stage gives ([`huse_stage_api::Stage::config_schema`]).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use huse_report::table::{Cell, Format, Table};
use serde_json::Value;

use crate::builtin_registry;

/// `list`'s arguments.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Also list the stages of this plugin library (repeatable).
    #[arg(long = "plugin", value_name = "PATH")]
    pub plugins: Vec<PathBuf>,
    /// Instead, list the keys of this kind's `with:` block: type, default and what each is for.
    #[arg(long = "config", value_name = "KIND")]
    pub config: Option<String>,
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
    if let Some(kind) = &a.config {
        return config_keys(&registry, kind);
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

/// Prints the keys of `kind`'s config (exit 2 for an unknown kind).
fn config_keys(registry: &huse_registry::Registry, kind: &str) -> Result<i32> {
    let Some((_, entry)) = registry.entries().find(|(k, _)| *k == kind) else {
        let kinds: Vec<&str> = registry.entries().map(|(k, _)| k).collect();
        eprintln!("error: no stage kind `{kind}` (there are: {})", kinds.join(", "));
        return Ok(2);
    };
    let Some(schema) = entry.stage.config_schema() else {
        println!("`{kind}` does not describe its config keys");
        return Ok(0);
    };
    let keys = config_rows(&schema);
    println!("{kind}: {}", entry.stage.describe());
    if keys.is_empty() {
        println!("(no keys)");
    }
    let width = console::Term::stdout().size_checked().map_or(80, |(_, w)| usize::from(w)).max(40);
    let key_width = keys.iter().map(|k| k.key.len()).max().unwrap_or(0);
    for k in &keys {
        let default = if k.default.is_empty() { String::new() } else { format!(" = {}", k.default) };
        println!("  {:key_width$}  {}{default}", k.key, k.ty);
        for line in wrap(&k.about, width - 6) {
            println!("      {line}");
        }
    }
    Ok(0)
}

/// `text` in lines of at most `width` characters (a longer word keeps its own line).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(l) if l.chars().count() + 1 + word.chars().count() <= width => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// One key of a config, from its schema.
#[derive(Debug, PartialEq)]
struct KeyRow {
    key: String,
    ty: String,
    default: String,
    about: String,
}

/// The rows of a config's JSON Schema (schemars' draft 2020-12): one per key in name order, nested
/// objects as `outer.inner`, a tagged enum's variants' keys marked with their tag.
fn config_rows(schema: &Value) -> Vec<KeyRow> {
    let mut out = Vec::new();
    object_rows(schema, schema, "", None, "", &mut out);
    out
}

fn resolve<'a>(root: &'a Value, s: &'a Value) -> &'a Value {
    match s.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/")) {
        Some(path) => path.split('/').fold(root, |v, p| &v[p]),
        None => s,
    }
}

/// `s` with its `$ref` followed, keeping the referring schema's own description/default.
fn object_rows(root: &Value, s: &Value, prefix: &str, defaults: Option<&Value>, note: &str, out: &mut Vec<KeyRow>) {
    let s = resolve(root, s);
    let Some(props) = s.get("properties").and_then(Value::as_object) else { return };
    for (name, p) in props {
        if !note.is_empty() && name == TAG {
            continue; // a variant's own tag: shown on the enum's row
        }
        let key = format!("{prefix}{name}");
        let target = resolve(root, p);
        let default = p.get("default").or_else(|| defaults.and_then(|d| d.get(name)));
        let about = p.get("description").or_else(|| target.get("description")).and_then(Value::as_str).unwrap_or("");
        // The doc's first paragraph, without rustdoc's link brackets.
        let first = about.split("\n\n").next().unwrap_or("").replace('\n', " ").replace("[`", "`").replace("`]", "`");
        let about = format!("{first}{note}").trim().to_string();
        if target.get("properties").is_some() && !is_tag_only(target) {
            out.push(KeyRow { key: key.clone(), ty: "mapping".into(), default: String::new(), about });
            object_rows(root, target, &format!("{key}."), default, note, out);
            continue;
        }
        if let Some(variants) = tagged_variants(root, target) {
            let tags: Vec<&str> = variants.iter().map(|(t, _)| *t).collect();
            out.push(KeyRow {
                key: key.clone(),
                ty: format!("mapping, {}: {}", TAG, tags.join(" | ")),
                default: default.map(show).unwrap_or_default(),
                about,
            });
            for (tag, v) in variants {
                object_rows(root, v, &format!("{key}."), None, &format!(" ({TAG}: {tag})"), out);
            }
            continue;
        }
        out.push(KeyRow { key, ty: type_of(root, target), default: default.map(show).unwrap_or_default(), about });
    }
}

/// The tag key of internally tagged enums in stage configs (`optimizer: { name: adamw, ... }`).
const TAG: &str = "name";

/// An object whose only property is a constant tag.
fn is_tag_only(s: &Value) -> bool {
    s.get("properties").and_then(Value::as_object).is_some_and(|p| p.len() == 1 && p.contains_key(TAG))
}

/// The variants of an internally tagged enum: (tag value, variant schema).
fn tagged_variants<'a>(root: &'a Value, s: &'a Value) -> Option<Vec<(&'a str, &'a Value)>> {
    let list = s.get("oneOf").or_else(|| s.get("anyOf"))?.as_array()?;
    let mut out = Vec::new();
    for v in list {
        let v = resolve(root, v);
        let tag = v.get("properties")?.get(TAG)?.get("const")?.as_str()?;
        out.push((tag, v));
    }
    Some(out)
}

/// A key's type in words: `number`, `integer or null`, `a | b` for string choices.
fn type_of(root: &Value, s: &Value) -> String {
    let s = resolve(root, s);
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return e.iter().map(show).collect::<Vec<_>>().join(" | ");
    }
    if let Some(c) = s.get("const") {
        return show(c);
    }
    if let Some(list) = s.get("oneOf").or_else(|| s.get("anyOf")).and_then(Value::as_array) {
        let mut parts: Vec<String> = list.iter().map(|v| type_of(root, v)).collect();
        parts.dedup();
        return parts.join(" | ");
    }
    let one = |t: &Value| -> String {
        match t.as_str() {
            Some("array") => {
                format!("list of {}", s.get("items").map(|i| type_of(root, i)).unwrap_or_else(|| "values".into()))
            }
            Some("object") => "mapping".into(),
            Some(t) => t.into(),
            None => "value".into(),
        }
    };
    match s.get("type") {
        Some(Value::Array(ts)) => ts.iter().map(one).collect::<Vec<_>>().join(" or "),
        Some(t) => one(t),
        None => "value".into(),
    }
}

/// A default value as a reader would write it in YAML.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_config_key_says_what_it_is_for() {
        let registry = crate::builtin_registry();
        let mut described = 0;
        for (kind, e) in registry.entries() {
            let Some(schema) = e.stage.config_schema() else { panic!("`{kind}` gives no config schema") };
            for row in config_rows(&schema) {
                assert!(
                    !row.about.is_empty() && !row.about.starts_with('('),
                    "`{kind}`: `{}` has no `///` doc",
                    row.key
                );
                assert!(row.ty != "value", "`{kind}`: `{}` has no type", row.key);
                described += 1;
            }
        }
        assert!(described > 80, "{described} keys");
        let train = registry.entries().find(|(k, _)| *k == "train").unwrap().1.stage.config_schema().unwrap();
        let alpha = config_rows(&train).into_iter().find(|r| r.key == "alpha").unwrap();
        assert_eq!((alpha.ty.as_str(), alpha.default.as_str()), ("number", "1.0"));
        assert!(alpha.about.starts_with("Weight of the classification loss"), "{alpha:?}");
    }

    #[test]
    fn wraps_at_words() {
        assert_eq!(wrap("aa bb cc dddddd e", 5), vec!["aa bb", "cc", "dddddd", "e"]);
        assert!(wrap("", 5).is_empty());
    }

    #[test]
    fn nested_structs_tagged_enums_and_choices_become_rows() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "alpha": {"description": "Weight of A (see [`B`]).", "type": "number", "default": 1.0},
                "limit": {"description": "Keep N.\n\nLonger text.", "type": ["integer", "null"], "default": null},
                "kind": {"$ref": "#/$defs/Kind", "default": "paper"},
                "shape": {"$ref": "#/$defs/Shape", "description": "The shape.", "default": {"dim": 512}},
                "opt": {"$ref": "#/$defs/Opt", "default": {"name": "sgd", "lr": 0.1}}
            },
            "$defs": {
                "Kind": {"oneOf": [{"type": "string", "const": "paper"}, {"type": "string", "const": "hinge"}]},
                "Shape": {"type": "object", "properties": {"dim": {"type": "integer", "description": "Size."}}},
                "Opt": {"oneOf": [
                    {"type": "object", "properties": {"name": {"type": "string", "const": "sgd"}, "lr": {"type": "number", "default": 0.1}}},
                    {"type": "object", "properties": {"name": {"type": "string", "const": "adam"}, "beta": {"type": "number"}}}
                ]}
            }
        });
        let rows = config_rows(&schema);
        let r = |k: &str, t: &str, d: &str, a: &str| KeyRow {
            key: k.into(),
            ty: t.into(),
            default: d.into(),
            about: a.into(),
        };
        assert_eq!(
            rows,
            vec![
                r("alpha", "number", "1.0", "Weight of A (see `B`)."),
                r("kind", "paper | hinge", "paper", ""),
                r("limit", "integer or null", "null", "Keep N."),
                r("opt", "mapping, name: sgd | adam", "{\"lr\":0.1,\"name\":\"sgd\"}", ""),
                r("opt.lr", "number", "0.1", "(name: sgd)"),
                r("opt.beta", "number", "", "(name: adam)"),
                r("shape", "mapping", "", "The shape."),
                r("shape.dim", "integer", "512", "Size."),
            ]
        );
    }
}
