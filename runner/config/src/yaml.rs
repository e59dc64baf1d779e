//! A YAML tree that remembers where every key and value came from.
//!
//! serde-saphyr parses the file; every node keeps its [`Origin`] (file line/column, or
//! the command-line argument that set it), so any later error — an unknown key, a
//! wrong type found by a stage's own validation, a bad sweep value — can point at the
//! exact place. The tree converts to JSON for stages and for cache keys.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Where a node came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// Line and column (1-based) in the experiment file.
    File {
        /// Line (1-based).
        line: u32,
        /// Column (1-based).
        column: u32,
    },
    /// A command-line argument such as `--set train.alpha=0.3`.
    Arg(String),
    /// Made by the runner (defaults).
    Default,
}

/// A YAML value with its origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The value.
    pub value: Value,
    /// Where it came from.
    pub origin: Origin,
}

/// A mapping key with its origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// The key's text.
    pub name: String,
    /// Where it came from.
    pub origin: Origin,
}

/// YAML values (mappings keep their order).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null` or `~`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
    /// A list.
    Seq(Vec<Node>),
    /// A mapping, in the file's order.
    Map(Vec<(Key, Node)>),
}

impl Value {
    /// The YAML type name used in error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A YAML syntax error with its position.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    /// Line (1-based).
    pub line: u32,
    /// Column (1-based).
    pub column: u32,
    /// What is wrong.
    pub message: String,
}

impl Node {
    /// A node of `value` from `origin`.
    pub fn new(value: Value, origin: Origin) -> Self {
        Node { value, origin }
    }

    /// Parses a YAML document. An empty document is an empty mapping.
    pub fn parse(text: &str) -> Result<Node, SyntaxError> {
        if text.trim().is_empty() {
            return Ok(Node::new(Value::Map(Vec::new()), Origin::File { line: 1, column: 1 }));
        }
        let parsed: Result<Spanned<Raw>, _> = serde_saphyr::from_str(text);
        match parsed {
            Ok(s) => Ok(s.into()),
            Err(e) => {
                let (line, column) = e.location().map(|l| (l.line() as u32, l.column() as u32)).unwrap_or((1, 1));
                // The first line of serde-saphyr's rendering is the message; the rest is a snippet.
                let full = e.to_string();
                let first = full.lines().next().unwrap_or("");
                let first = first.strip_prefix("error: ").unwrap_or(first);
                let message = first
                    .split_once(": ")
                    .filter(|(head, _)| head.starts_with("line "))
                    .map(|(_, rest)| rest.to_string())
                    .unwrap_or_else(|| first.to_string());
                Err(SyntaxError { line, column, message })
            }
        }
    }

    /// Parses a command-line value (`--set k=v`) as a YAML scalar or flow collection.
    pub fn parse_arg(text: &str, arg: &str) -> Result<Node, String> {
        let node = Node::parse(text).map_err(|e| e.message)?;
        let mut node = node;
        node.set_origin(&Origin::Arg(arg.to_string()));
        Ok(node)
    }

    fn set_origin(&mut self, o: &Origin) {
        self.origin = o.clone();
        match &mut self.value {
            Value::Seq(v) => v.iter_mut().for_each(|n| n.set_origin(o)),
            Value::Map(m) => m.iter_mut().for_each(|(k, n)| {
                k.origin = o.clone();
                n.set_origin(o)
            }),
            _ => {}
        }
    }

    /// The entries of a mapping, or None.
    pub fn as_map(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The value under `key` in a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?.iter().find(|(k, _)| k.name == key).map(|(_, v)| v)
    }

    /// The key entry named `key` in a mapping.
    pub fn key(&self, key: &str) -> Option<&Key> {
        self.as_map()?.iter().find(|(k, _)| k.name == key).map(|(k, _)| k)
    }

    /// The node at a path of mapping keys / list indices.
    pub fn at(&self, path: &[String]) -> Option<&Node> {
        let mut cur = self;
        for seg in path {
            cur = match &cur.value {
                Value::Map(_) => cur.get(seg)?,
                Value::Seq(v) => v.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// The origin of the key at the end of `path` (for "unknown key" errors), else as [`Node::origin_of`].
    pub fn key_origin_of(&self, path: &[String]) -> Origin {
        if let Some((last, parent)) = path.split_last()
            && let Some(k) = self.at(parent).and_then(|p| p.key(last))
        {
            return k.origin.clone();
        }
        self.origin_of(path)
    }

    /// The best origin for an error at `path`: the deepest existing node, or the key itself.
    pub fn origin_of(&self, path: &[String]) -> Origin {
        let mut cur = self;
        let mut best = self.origin.clone();
        for seg in path {
            let next = match &cur.value {
                Value::Map(m) => m.iter().find(|(k, _)| &k.name == seg).map(|(k, v)| {
                    // Point at the key for mappings and lists of the file, at the value for
                    // scalars and for anything the command line set.
                    let o = match v.value {
                        Value::Map(_) | Value::Seq(_) if !matches!(v.origin, Origin::Arg(_)) => k.origin.clone(),
                        _ => v.origin.clone(),
                    };
                    (v, o)
                }),
                Value::Seq(v) => seg.parse::<usize>().ok().and_then(|i| v.get(i)).map(|n| (n, n.origin.clone())),
                _ => None,
            };
            match next {
                Some((n, o)) => {
                    cur = n;
                    best = o;
                }
                None => break,
            }
        }
        best
    }

    /// Sets the value at `path`, creating mappings on the way. Fails if a non-mapping is in the way.
    pub fn set(&mut self, path: &[String], value: Node) -> Result<(), String> {
        let Some((first, rest)) = path.split_first() else {
            *self = value;
            return Ok(());
        };
        if matches!(self.value, Value::Null) {
            self.value = Value::Map(Vec::new());
        }
        match &mut self.value {
            Value::Map(m) => {
                if let Some((_, child)) = m.iter_mut().find(|(k, _)| &k.name == first) {
                    return child.set(rest, value);
                }
                let origin = value.origin.clone();
                let mut child = Node::new(Value::Null, origin.clone());
                child.set(rest, value)?;
                m.push((Key { name: first.clone(), origin }, child));
                Ok(())
            }
            Value::Seq(v) => {
                let i: usize = first.parse().map_err(|_| format!("`{first}` is not a list index"))?;
                let n = v.get_mut(i).ok_or_else(|| format!("list index {i} is out of range"))?;
                n.set(rest, value)
            }
            other => Err(format!("`{first}` cannot be set inside {}", other.type_name())),
        }
    }

    /// Replaces `${VAR}` and `${VAR:-default}` in every string; `$$` is a literal `$`; a
    /// dotted reference (`${params.epochs}`) is left for the stage to fill in at run time.
    /// Returns the errors (unset variables, bad syntax) with the paths where they occurred.
    pub fn interpolate(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
        path: &mut Vec<String>,
        errs: &mut Vec<(Vec<String>, Origin, String)>,
    ) {
        match &mut self.value {
            Value::Str(s) => match interpolate_str(s, env) {
                Ok(new) => *s = new,
                Err(e) => errs.push((path.clone(), self.origin.clone(), e)),
            },
            Value::Seq(v) => {
                for (i, n) in v.iter_mut().enumerate() {
                    path.push(i.to_string());
                    n.interpolate(env, path, errs);
                    path.pop();
                }
            }
            Value::Map(m) => {
                for (k, n) in m.iter_mut() {
                    path.push(k.name.clone());
                    n.interpolate(env, path, errs);
                    path.pop();
                }
            }
            _ => {}
        }
    }

    /// The JSON form (mappings become JSON objects with sorted keys: canonical for hashing).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map(J::Number).unwrap_or(J::Null),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(v) => J::Array(v.iter().map(Node::to_json).collect()),
            Value::Map(m) => J::Object(m.iter().map(|(k, v)| (k.name.clone(), v.to_json())).collect()),
        }
    }

    /// Flattens the leaves into `(dotted.path, value)` pairs; lists are leaves.
    pub fn flatten(&self, prefix: &str, out: &mut Vec<(String, serde_json::Value)>) {
        match &self.value {
            Value::Map(m) if !m.is_empty() => {
                for (k, v) in m {
                    let p = if prefix.is_empty() { k.name.clone() } else { format!("{prefix}.{}", k.name) };
                    v.flatten(&p, out);
                }
            }
            _ => out.push((prefix.to_string(), self.to_json())),
        }
    }
}

/// `a.b` (words of letters, digits, `_` and `-`, joined by dots): a reference a stage
/// fills in at run time, which the loader leaves as it is.
fn is_run_time_reference(inner: &str) -> bool {
    inner.contains('.')
        && inner
            .split('.')
            .all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
}

fn interpolate_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !s.contains('$') {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix("$$") {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("${") {
            let end = r.find('}').ok_or_else(|| format!("unclosed `${{` in \"{s}\""))?;
            let inner = &r[..end];
            if is_run_time_reference(inner) {
                // `${params.epochs}`, `${stage.threads}`: no environment variable has a dot;
                // the stage fills these in when it runs.
                out.push_str(&rest[..end + 3]);
                rest = &r[end + 1..];
                continue;
            }
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("`${{{inner}}}` is not a valid variable reference"));
            }
            match env(name).filter(|v| !v.is_empty()).or(default.map(String::from)) {
                Some(v) => out.push_str(&v),
                None => {
                    return Err(format!(
                        "environment variable `{name}` is not set (set it, or write `${{{name}:-default}}`)"
                    ));
                }
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Value::Str(s) => f.write_str(s),
            _ => write!(f, "{}", self.to_json()),
        }
    }
}

/// What serde-saphyr deserializes into; converted to [`Node`].
enum Raw {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<String>, Spanned<Raw>)>),
}

fn origin(loc: &serde_saphyr::Location) -> Origin {
    Origin::File { line: loc.line() as u32, column: loc.column() as u32 }
}

impl From<Spanned<Raw>> for Node {
    fn from(s: Spanned<Raw>) -> Node {
        let o = origin(&s.referenced);
        let value = match s.value {
            Raw::Null => Value::Null,
            Raw::Bool(b) => Value::Bool(b),
            Raw::Int(i) => Value::Int(i),
            Raw::Float(f) => Value::Float(f),
            Raw::Str(x) => Value::Str(x),
            Raw::Seq(v) => Value::Seq(v.into_iter().map(Node::from).collect()),
            Raw::Map(m) => Value::Map(
                m.into_iter()
                    .map(|(k, v)| (Key { name: k.value, origin: origin(&k.referenced) }, Node::from(v)))
                    .collect(),
            ),
        };
        Node::new(value, o)
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Raw;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E>(self) -> Result<Raw, E> {
                Ok(Raw::Null)
            }
            fn visit_none<E>(self) -> Result<Raw, E> {
                Ok(Raw::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
                Ok(Raw::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
                Ok(Raw::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
                Ok(i64::try_from(v).map(Raw::Int).unwrap_or(Raw::Float(v as f64)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
                Ok(Raw::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw::Str(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Raw, E> {
                Ok(Raw::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x)
                }
                Ok(Raw::Seq(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
                let mut v = Vec::new();
                while let Some(k) = a.next_key::<Spanned<String>>()? {
                    let val = a.next_value()?;
                    v.push((k, val))
                }
                Ok(Raw::Map(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split('.').map(String::from).collect()
    }

    #[test]
    fn keeps_positions() {
        let n = Node::parse("a: 1\nb:\n  c: [x, 2.5]\n").unwrap();
        assert_eq!(n.origin_of(&p("b.c.1")), Origin::File { line: 3, column: 10 });
        assert_eq!(n.origin_of(&p("b.c")), Origin::File { line: 3, column: 3 });
        assert_eq!(n.at(&p("b.c.1")).unwrap().value, Value::Float(2.5));
        assert_eq!(n.origin_of(&p("a")), Origin::File { line: 1, column: 4 });
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = Node::parse("a: [1\nb: 2\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 2));
        let e = Node::parse("a: 1\na: 2\n").unwrap_err();
        assert!(e.message.contains("duplicate"), "{}", e.message);
    }

    #[test]
    fn interpolation() {
        let env = |k: &str| (k == "HOME_X").then(|| "/h".to_string());
        assert_eq!(interpolate_str("${HOME_X}/d", &env).unwrap(), "/h/d");
        assert_eq!(interpolate_str("${NOPE:-x}/d", &env).unwrap(), "x/d");
        assert_eq!(interpolate_str("$$5 $x", &env).unwrap(), "$5 $x");
        assert!(interpolate_str("${NOPE}", &env).unwrap_err().contains("`NOPE` is not set"));
        assert!(interpolate_str("${A", &env).is_err());
        assert_eq!(
            interpolate_str("--epochs=${params.epochs} ${stage.threads} ${HOME_X}", &env).unwrap(),
            "--epochs=${params.epochs} ${stage.threads} /h"
        );
        assert!(interpolate_str("${.x}", &env).is_err());
    }

    #[test]
    fn set_creates_and_replaces() {
        let mut n = Node::parse("s: {t: {with: {a: 1}}}").unwrap();
        n.set(&p("s.t.with.a"), Node::parse_arg("0.3", "--set").unwrap()).unwrap();
        n.set(&p("s.t.with.b.c"), Node::parse_arg("true", "--set").unwrap()).unwrap();
        assert_eq!(n.to_json(), serde_json::json!({"s": {"t": {"with": {"a": 0.3, "b": {"c": true}}}}}));
        assert!(n.set(&p("s.t.with.a.x"), Node::parse_arg("1", "--set").unwrap()).is_err());
    }
}
