//! The runs search language: `test.acc.both > 0.95 and (train.beta in (0, 0.5) or state = failed)`.
//!
//! ```text
//! expr    := or
//! or      := and ("or" and)*
//! and     := not ("and" not)*
//! not     := "not" not | atom
//! atom    := "(" expr ")" | NAME OP value | NAME ["not"] "in" "(" value ("," value)* ")"
//! OP      := "=" | "==" | "!=" | "<" | "<=" | ">" | ">="
//! value   := NUMBER | 'text' | "text" | WORD
//! ```
//!
//! Keywords are case-insensitive; `and` binds tighter than `or`. A NAME is a param or final
//! metric key (`train.beta`, `test.t2i.r1`) or a field of the run (`id`, `name`, `state`,
//! `experiment`, `seed`, `device`). Strings take `\'`/`\"` and `\\` escapes. Numbers compare
//! as numbers; a value that is not a number compares as text (`=`/`!=` only, or in order).
//! A comparison with a value a run does not have is false (`not` of it is true). Errors carry
//! the 1-based column where they were found: [`ParseError::caret`] draws it under the query.

use std::collections::BTreeSet;
use std::fmt;

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// Both hold.
    And(Box<Expr>, Box<Expr>),
    /// Either holds.
    Or(Box<Expr>, Box<Expr>),
    /// It does not hold.
    Not(Box<Expr>),
    /// `name op value`.
    Cmp {
        /// The key or field.
        name: String,
        /// The comparison.
        op: Op,
        /// The value compared with.
        value: Value,
        /// Column (1-based) of the name in the query.
        at: usize,
    },
    /// `name in (values)`.
    In {
        /// The key or field.
        name: String,
        /// The values.
        values: Vec<Value>,
        /// Column (1-based) of the name in the query.
        at: usize,
    },
}

pub use crate::query::Op;

/// A value in a query, or of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A number.
    Num(f64),
    /// Text.
    Text(String),
}

impl Value {
    /// A run's value as the query sees it: a number when the text is one.
    pub fn of(text: &str) -> Value {
        match text.trim().parse::<f64>() {
            Ok(n) => Value::Num(n),
            Err(_) => Value::Text(text.to_string()),
        }
    }
}

/// The fields of a run a query can name beside its params and final metrics.
pub const RUN_FIELDS: [&str; 7] = ["id", "name", "state", "status", "experiment", "seed", "device"];

/// A run's value of `name`: a field ([`RUN_FIELDS`]), a param, or a final metric (NaN when
/// it was not finite); None when the run has none.
pub fn value_of(r: &crate::RunRow, name: &str) -> Option<Value> {
    match name {
        "id" => Some(Value::Num(r.id as f64)),
        "name" => Some(Value::Text(r.name.clone())),
        "state" | "status" => Some(Value::Text(r.status.to_string())),
        "experiment" => Some(Value::Text(r.experiment.clone())),
        "seed" => Some(Value::Num(r.seed as f64)),
        "device" => Some(Value::Text(r.device.clone())),
        _ => r
            .params
            .get(name)
            .map(|v| Value::of(v))
            .or_else(|| r.metrics.get(name).map(|v| Value::Num(v.unwrap_or(f64::NAN)))),
    }
}

/// Every name a query over `runs` may use: the run fields, their params and metrics.
pub fn known_names<'a>(runs: impl IntoIterator<Item = &'a crate::RunRow>) -> BTreeSet<String> {
    let mut known: BTreeSet<String> = RUN_FIELDS.iter().map(|s| s.to_string()).collect();
    for r in runs {
        known.extend(r.params.keys().cloned());
        known.extend(r.metrics.keys().cloned());
    }
    known
}

/// What is wrong with a query, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// Column (1-based, in characters).
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at column {}: {}", self.column, self.message)
    }
}

impl std::error::Error for ParseError {}

impl ParseError {
    /// The query with a caret under the column, for a terminal.
    pub fn caret(&self, query: &str) -> String {
        format!("{query}\n{}^ {}", " ".repeat(self.column.saturating_sub(1)), self.message)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Num(f64),
    Op(Op),
    LParen,
    RParen,
    Comma,
    End,
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Word(w) => format!("`{w}`"),
        Tok::Str(s) => format!("the text '{s}'"),
        Tok::Num(n) => format!("the number {n}"),
        Tok::Op(_) => "an operator".into(),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::Comma => "`,`".into(),
        Tok::End => "the end of the query".into(),
    }
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |column: usize, message: String| ParseError { column, message };
    while i < chars.len() {
        let c = chars[i];
        let at = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        match c {
            '(' => out.push((Tok::LParen, at)),
            ')' => out.push((Tok::RParen, at)),
            ',' => out.push((Tok::Comma, at)),
            '=' | '!' | '<' | '>' => {
                let next = chars.get(i + 1).copied();
                let (op, len) = match (c, next) {
                    ('=', Some('=')) => (Op::Eq, 2),
                    ('=', _) => (Op::Eq, 1),
                    ('!', Some('=')) => (Op::Ne, 2),
                    ('<', Some('=')) => (Op::Le, 2),
                    ('<', _) => (Op::Lt, 1),
                    ('>', Some('=')) => (Op::Ge, 2),
                    ('>', _) => (Op::Gt, 1),
                    _ => return Err(err(at, "`!` must be followed by `=`, or write `not`".into())),
                };
                out.push((Tok::Op(op), at));
                i += len;
                continue;
            }
            '\'' | '"' => {
                let mut s = String::new();
                let mut j = i + 1;
                loop {
                    match chars.get(j) {
                        None => return Err(err(at, format!("this {c}-quoted text is never closed"))),
                        Some('\\') => {
                            match chars.get(j + 1) {
                                Some(e @ ('\\' | '\'' | '"')) => s.push(*e),
                                Some(e) => {
                                    return Err(err(j + 1, format!("unknown escape `\\{e}` (use \\\\, \\' or \\\")")));
                                }
                                None => return Err(err(at, format!("this {c}-quoted text is never closed"))),
                            }
                            j += 2;
                        }
                        Some(q) if *q == c => {
                            j += 1;
                            break;
                        }
                        Some(o) => {
                            s.push(*o);
                            j += 1;
                        }
                    }
                }
                out.push((Tok::Str(s), at));
                i = j;
                continue;
            }
            _ => {
                let start = i;
                while i < chars.len()
                    && !chars[i].is_whitespace()
                    && !matches!(chars[i], '(' | ')' | ',' | '=' | '!' | '<' | '>' | '\'' | '"')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let looks_numeric = word.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+' || c == '.');
                match word.parse::<f64>() {
                    Ok(n) if looks_numeric && n.is_finite() => out.push((Tok::Num(n), at)),
                    _ => out.push((Tok::Word(word), at)),
                }
                continue;
            }
        }
        i += 1;
    }
    out.push((Tok::End, chars.len() + 1));
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

fn keyword(t: &Tok, k: &str) -> bool {
    matches!(t, Tok::Word(w) if w.eq_ignore_ascii_case(k))
}

impl Parser {
    fn peek(&self) -> &(Tok, usize) {
        &self.toks[self.pos]
    }
    fn next(&mut self) -> (Tok, usize) {
        let t = self.toks[self.pos].clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }
    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.and()?;
        while keyword(&self.peek().0, "or") {
            self.next();
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }
    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut e = self.not()?;
        while keyword(&self.peek().0, "and") {
            self.next();
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Ok(e)
    }
    fn not(&mut self) -> Result<Expr, ParseError> {
        if keyword(&self.peek().0, "not") {
            self.next();
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.atom()
    }
    fn value(&mut self) -> Result<Value, ParseError> {
        match self.next() {
            (Tok::Num(n), _) => Ok(Value::Num(n)),
            (Tok::Str(s), _) => Ok(Value::Text(s)),
            (Tok::Word(w), at) if ["and", "or", "not", "in"].iter().any(|k| w.eq_ignore_ascii_case(k)) => {
                Err(ParseError {
                    column: at,
                    message: format!("expected a value, found the keyword `{w}` (quote it: '{w}')"),
                })
            }
            (Tok::Word(w), _) => Ok(Value::Text(w)),
            (t, at) => Err(ParseError { column: at, message: format!("expected a value, found {}", describe(&t)) }),
        }
    }
    fn atom(&mut self) -> Result<Expr, ParseError> {
        let (t, at) = self.next();
        match t {
            Tok::LParen => {
                let e = self.or()?;
                match self.next() {
                    (Tok::RParen, _) => Ok(e),
                    (t, c) => Err(ParseError {
                        column: c,
                        message: format!("expected `)` to close the `(` at column {at}, found {}", describe(&t)),
                    }),
                }
            }
            Tok::Word(name) if !["and", "or", "not", "in"].iter().any(|k| name.eq_ignore_ascii_case(k)) => {
                let negated = keyword(&self.peek().0, "not");
                if negated {
                    self.next();
                }
                if keyword(&self.peek().0, "in") {
                    self.next();
                    let (open, oc) = self.next();
                    if open != Tok::LParen {
                        return Err(ParseError {
                            column: oc,
                            message: format!("expected `(` after `in`, found {}", describe(&open)),
                        });
                    }
                    let mut values = vec![self.value()?];
                    loop {
                        match self.next() {
                            (Tok::Comma, _) => values.push(self.value()?),
                            (Tok::RParen, _) => break,
                            (t, c) => {
                                return Err(ParseError {
                                    column: c,
                                    message: format!("expected `,` or `)` in the list, found {}", describe(&t)),
                                });
                            }
                        }
                    }
                    let e = Expr::In { name, values, at };
                    return Ok(if negated { Expr::Not(Box::new(e)) } else { e });
                }
                if negated {
                    let (t, c) = self.next();
                    return Err(ParseError {
                        column: c,
                        message: format!("expected `in` after `not`, found {}", describe(&t)),
                    });
                }
                match self.next() {
                    (Tok::Op(op), _) => Ok(Expr::Cmp { name, op, value: self.value()?, at }),
                    (t, c) => Err(ParseError {
                        column: c,
                        message: format!(
                            "expected an operator (= != < <= > >=) or `in` after `{name}`, found {}",
                            describe(&t)
                        ),
                    }),
                }
            }
            t => Err(ParseError { column: at, message: format!("expected a name or `(`, found {}", describe(&t)) }),
        }
    }
}

/// Parses a query.
pub fn parse(src: &str) -> Result<Expr, ParseError> {
    let mut p = Parser { toks: lex(src)?, pos: 0 };
    if matches!(p.peek().0, Tok::End) {
        return Err(ParseError { column: 1, message: "the query is empty".into() });
    }
    let e = p.or()?;
    match p.next() {
        (Tok::End, _) => Ok(e),
        (t, c) => {
            Err(ParseError { column: c, message: format!("expected `and`, `or` or the end, found {}", describe(&t)) })
        }
    }
}

impl Expr {
    /// Every name the query uses, with its column.
    pub fn names(&self) -> Vec<(&str, usize)> {
        match self {
            Expr::And(a, b) | Expr::Or(a, b) => {
                let mut v = a.names();
                v.extend(b.names());
                v
            }
            Expr::Not(a) => a.names(),
            Expr::Cmp { name, at, .. } | Expr::In { name, at, .. } => vec![(name.as_str(), *at)],
        }
    }

    /// An error for the first name that is not in `known`, with the nearest known one.
    pub fn check_names(&self, known: &BTreeSet<String>) -> Result<(), ParseError> {
        for (n, at) in self.names() {
            if !known.contains(n) {
                let near = known.iter().min_by_key(|k| strsim::levenshtein(n, k));
                let hint = near
                    .filter(|k| strsim::levenshtein(n, k) <= n.len().max(3) / 2)
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                return Err(ParseError { column: at, message: format!("no param, metric or field `{n}`{hint}") });
            }
        }
        Ok(())
    }

    /// Whether a run passes, given its value of each name (None: it has none).
    pub fn eval(&self, value_of: &dyn Fn(&str) -> Option<Value>) -> bool {
        match self {
            Expr::And(a, b) => a.eval(value_of) && b.eval(value_of),
            Expr::Or(a, b) => a.eval(value_of) || b.eval(value_of),
            Expr::Not(a) => !a.eval(value_of),
            Expr::Cmp { name, op, value, .. } => value_of(name).is_some_and(|v| compare(&v, *op, value)),
            Expr::In { name, values, .. } => {
                value_of(name).is_some_and(|v| values.iter().any(|x| compare(&v, Op::Eq, x)))
            }
        }
    }
}

fn compare(have: &Value, op: Op, want: &Value) -> bool {
    use std::cmp::Ordering;
    let ord = match (have, want) {
        (Value::Num(a), Value::Num(b)) => a.partial_cmp(b),
        (Value::Text(a), Value::Text(b)) => Some(a.cmp(b)),
        // A number against text: compare as text (`seed = '3'` still matches seed 3).
        (Value::Num(a), Value::Text(b)) => Some(fmt_num(*a).cmp(b)),
        (Value::Text(a), Value::Num(b)) => Some(a.as_str().cmp(&fmt_num(*b))),
    };
    let Some(ord) = ord else { return false };
    match op {
        Op::Eq => ord == Ordering::Equal,
        Op::Ne => ord != Ordering::Equal,
        Op::Lt => ord == Ordering::Less,
        Op::Le => ord != Ordering::Greater,
        Op::Gt => ord == Ordering::Greater,
        Op::Ge => ord != Ordering::Less,
    }
}

fn fmt_num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 { format!("{v:.0}") } else { v.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(name: &str, op: Op, value: Value, at: usize) -> Expr {
        Expr::Cmp { name: name.into(), op, value, at }
    }

    #[test]
    fn and_binds_tighter_than_or_and_parentheses_regroup() {
        let e = parse("a = 1 or b = 2 and c = 3").unwrap();
        assert_eq!(
            e,
            Expr::Or(
                Box::new(cmp("a", Op::Eq, Value::Num(1.0), 1)),
                Box::new(Expr::And(
                    Box::new(cmp("b", Op::Eq, Value::Num(2.0), 10)),
                    Box::new(cmp("c", Op::Eq, Value::Num(3.0), 20))
                ))
            )
        );
        let e = parse("(a = 1 OR b = 2) AND NOT c >= -0.5").unwrap();
        assert_eq!(
            e,
            Expr::And(
                Box::new(Expr::Or(
                    Box::new(cmp("a", Op::Eq, Value::Num(1.0), 2)),
                    Box::new(cmp("b", Op::Eq, Value::Num(2.0), 11))
                )),
                Box::new(Expr::Not(Box::new(cmp("c", Op::Ge, Value::Num(-0.5), 26))))
            )
        );
    }

    #[test]
    fn the_issues_example_parses_and_evaluates() {
        let q = "test.acc.both > 0.95 and (train.beta in (0, 0.5) or state = failed)";
        let e = parse(q).unwrap();
        let run = |acc: f64, beta: f64, state: &str| {
            let state = state.to_string();
            move |n: &str| match n {
                "test.acc.both" => Some(Value::Num(acc)),
                "train.beta" => Some(Value::Num(beta)),
                "state" => Some(Value::Text(state.clone())),
                _ => None,
            }
        };
        assert!(e.eval(&run(0.96, 0.5, "succeeded")));
        assert!(e.eval(&run(0.96, 1.0, "failed")));
        assert!(!e.eval(&run(0.96, 1.0, "succeeded")));
        assert!(!e.eval(&run(0.90, 0.0, "succeeded")));
        let names: Vec<&str> = e.names().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["test.acc.both", "train.beta", "state"]);
    }

    #[test]
    fn in_lists_take_numbers_words_and_quoted_text() {
        let e = parse(r#"graph.uses not in (graph, 'graph-tree', "x y", 'it\'s') or seed in (1,2)"#).unwrap();
        let Expr::Or(a, b) = &e else { panic!("{e:?}") };
        assert_eq!(
            **a,
            Expr::Not(Box::new(Expr::In {
                name: "graph.uses".into(),
                values: vec![
                    Value::Text("graph".into()),
                    Value::Text("graph-tree".into()),
                    Value::Text("x y".into()),
                    Value::Text("it's".into())
                ],
                at: 1
            }))
        );
        assert_eq!(**b, Expr::In { name: "seed".into(), values: vec![Value::Num(1.0), Value::Num(2.0)], at: 60 });
        let v = |u: &'static str| move |n: &str| (n == "graph.uses").then(|| Value::Text(u.to_string()));
        assert!(!e.eval(&v("graph-tree")));
        assert!(e.eval(&v("hinge")));
        // A missing value: `in` is false, `not in` true.
        assert!(e.eval(&|_| None));
    }

    #[test]
    fn strings_keep_quotes_and_backslashes() {
        let e = parse(r#"name = "a \"quoted\" \\ name""#).unwrap();
        assert_eq!(e, cmp("name", Op::Eq, Value::Text(r#"a "quoted" \ name"#.into()), 1));
        let e = parse("name != 'x' and id <= 3").unwrap();
        assert!(e.eval(&|n| match n {
            "name" => Some(Value::Text("y".into())),
            "id" => Some(Value::Num(3.0)),
            _ => None,
        }));
    }

    #[test]
    fn errors_point_at_the_column() {
        let err = |q: &str| parse(q).unwrap_err();
        assert_eq!(
            err("a > "),
            ParseError { column: 5, message: "expected a value, found the end of the query".into() }
        );
        assert_eq!(
            err("(a = 1"),
            ParseError {
                column: 7,
                message: "expected `)` to close the `(` at column 1, found the end of the query".into()
            }
        );
        assert_eq!(err("a = 'open").column, 5);
        assert!(err("a = 'open").message.contains("never closed"));
        assert_eq!(err("a in 1, 2").column, 6);
        assert_eq!(err("a in (1 2)").column, 9);
        assert_eq!(err("a = 1 b = 2").column, 7);
        assert_eq!(err("a b").message, "expected an operator (= != < <= > >=) or `in` after `a`, found `b`");
        assert_eq!(err("and a = 1").column, 1);
        assert_eq!(err("a = and").message, "expected a value, found the keyword `and` (quote it: 'and')");
        assert_eq!(err("a ! 1").column, 3);
        assert_eq!(err("   ").message, "the query is empty");
        assert_eq!(err(r"a = 'x\q'").column, 7);
        let e = err("x.acc.both >");
        assert_eq!(e.caret("x.acc.both >"), "x.acc.both >\n            ^ expected a value, found the end of the query");
    }

    #[test]
    fn unknown_names_are_errors_at_their_column_with_the_nearest() {
        let known: BTreeSet<String> = ["test.acc.both", "train.beta", "state"].iter().map(|s| s.to_string()).collect();
        let e = parse("state = failed or test.acc.bth > 0.5").unwrap();
        assert_eq!(
            e.check_names(&known).unwrap_err(),
            ParseError {
                column: 19,
                message: "no param, metric or field `test.acc.bth` (did you mean `test.acc.both`?)".into()
            }
        );
        assert!(parse("zzz = 1").unwrap().check_names(&known).unwrap_err().message.ends_with("`zzz`"));
        assert!(parse("train.beta = 1").unwrap().check_names(&known).is_ok());
    }

    #[test]
    fn numbers_and_text_compare_sensibly() {
        let e = parse("v < 10").unwrap();
        assert!(e.eval(&|_| Some(Value::of("9"))), "numbers compare as numbers, not text");
        assert!(!e.eval(&|_| Some(Value::of("abc"))));
        assert!(parse("seed = '3'").unwrap().eval(&|_| Some(Value::Num(3.0))));
        assert!(!parse("v > 1").unwrap().eval(&|_| Some(Value::Num(f64::NAN))), "NaN passes no comparison");
    }
}
