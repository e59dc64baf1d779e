//! Property test of the compiler: random experiment trees (built from the words an
//! experiment uses, plus odd values) and random `--set` lists never panic; they compile,
//! or fail with positioned diagnostics. Bounded (a fixed number of cases) so it runs in CI.

use std::sync::Arc;

use huse_config::{Overrides, compile_str};
use huse_registry::Registry;
use proptest::prelude::*;
use serde_json::{Map, Value};

fn registry() -> Registry {
    let mut r = Registry::default();
    for s in huse_stage_toy::stages() {
        r.add(Arc::from(s), "builtin");
    }
    r
}

const KEYS: &[&str] = &[
    "name",
    "seed",
    "device",
    "repeat",
    "stages",
    "sweep",
    "plugins",
    "description",
    "uses",
    "needs",
    "with",
    "source",
    "mid",
    "total",
    "factor",
    "offset",
    "count",
    "seconds",
    "metrics",
    "fail",
    "points",
    "grid",
    "mid.factor",
    "source.count",
    "seed",
    "stages.mid.with.factor",
    "x",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop_oneof![Just(0i64), Just(1), Just(-1), Just(4294967296), Just(i64::MAX)].prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        prop_oneof![
            Just("toy-source"),
            Just("toy-scale"),
            Just("toy-sum"),
            Just("source"),
            Just("mid"),
            Just("cpu"),
            Just("cuda:9"),
            Just("${HUSE_FUZZ_UNSET}"),
            Just("${X:-d}"),
            Just("$$"),
            Just("${"),
            Just(""),
            Just("a b")
        ]
        .prop_map(|s| Value::from(s.to_string())),
    ]
}

fn tree() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Map<_, _>>())),
        ]
    })
}

/// A mostly-valid experiment with random parts swapped in, so the later passes are reached.
fn experiment() -> impl Strategy<Value = Value> {
    (tree(), tree(), tree(), prop::option::of(tree()), any::<u8>()).prop_map(|(a, b, c, sweep, pick)| {
        let mut stages = Map::new();
        stages.insert("source".into(), serde_json::json!({"uses": "toy-source", "with": {"count": 3}}));
        stages.insert("mid".into(), serde_json::json!({"uses": "toy-scale", "needs": ["source"], "with": a}));
        stages.insert(
            "total".into(),
            if pick % 3 == 0 { b } else { serde_json::json!({"uses": "toy-sum", "needs": ["mid"]}) },
        );
        let mut top = Map::new();
        top.insert("name".into(), serde_json::json!("f"));
        top.insert("stages".into(), Value::Object(stages));
        if pick % 2 == 0 {
            top.insert("repeat".into(), c);
        }
        if let Some(s) = sweep {
            top.insert("sweep".into(), s);
        }
        Value::Object(top)
    })
}

fn check(text: &str, set: Vec<String>) {
    let o = Overrides { set, ..Default::default() };
    if let Err(d) = compile_str(text, "f.yaml", &o, &registry(), &|k| (k == "X").then(|| "x".into())) {
        assert!(!d.0.is_empty(), "an error without diagnostics");
        for diag in &d.0 {
            assert!(diag.to_string().starts_with("f.yaml"), "unpositioned: {diag}");
            assert!(!diag.message.is_empty());
        }
    }
}

fn sets() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        (
            prop::sample::select(KEYS),
            prop_oneof![Just("1"), Just("[1, 2]"), Just("{a: 1}"), Just("x"), Just(""), Just("]")],
        )
            .prop_map(|(k, v)| format!("{k}={v}")),
        0..3,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_never_panic(t in tree(), set in sets()) {
        let text = serde_saphyr::to_string(&t).unwrap_or_default();
        check(&text, set);
    }

    #[test]
    fn random_experiments_never_panic(e in experiment(), set in sets()) {
        let text = serde_saphyr::to_string(&e).unwrap();
        check(&text, set);
    }

    #[test]
    fn random_text_never_panics(text in "[a-z:{}\\[\\],\\- \n$&*!|>'\"0-9]{0,200}") {
        check(&text, Vec::new());
    }
}
