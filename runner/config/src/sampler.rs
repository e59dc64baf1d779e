//! The adaptive sampler of a `search:` (`sampler: { kind: tpe }`): the next trial's point from
//! the trials that have finished, by the Tree-structured Parzen Estimator (Bergstra et al.
//! 2011) as Optuna runs it by default — random points until `startup` trials have finished,
//! then, for each parameter on its own, 24 candidates drawn from the density of the best 10%
//! of the trials, keeping the one whose density ratio good/bad is largest. The estimators are
//! those of the `tpe` crate (Parzen windows for numbers, a histogram for choices). With
//! several objectives a trial's rank is its non-dominated front (crowding distance breaking
//! ties within a front), so "the best 10%" are the trials of the first fronts, as in Optuna's
//! MOTPE split. A point depends only on the seed, the trial's index and the finished trials:
//! the same history gives the same point.
//!
//! The runner records each trial's runs; [`History`] is what it tells the sampler of them.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};

use crate::search::Dist;
use crate::sweep::Assignment;
use crate::yaml::{Key, Node, Origin, Value};

/// What the runner asks a `search:` for when it compiles the experiment.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchRequest {
    /// The next trial of an adaptive search, given what has happened so far.
    Next(History),
    /// One trial again, as recorded (a trial whose runs were interrupted): its point label
    /// and each searched parameter's value as the database holds it (text).
    Point {
        /// The trial's label (`trial=3,train.beta=0.5`).
        label: String,
        /// Searched key -> recorded value.
        values: BTreeMap<String, String>,
    },
}

/// A study's trials so far, as the runner read them from the results database.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// How many trials have begun (the next trial's index).
    pub begun: u64,
    /// The finished trials.
    pub told: Vec<Told>,
}

/// A finished trial: its searched parameters' recorded values and its objectives (the mean
/// over its seeds, in the order of the search's objectives), or the epoch at which it was
/// pruned.
#[derive(Debug, Clone, PartialEq)]
pub struct Told {
    /// Searched key -> recorded value (text, as the database holds params).
    pub values: BTreeMap<String, String>,
    /// One value per objective (empty for a pruned trial).
    pub objectives: Vec<f64>,
    /// The epoch at which the pruner stopped it (None: it ran to the end).
    pub pruned_at: Option<i64>,
}

/// A parameter of the search: its key as written, its tree path and where it comes from.
pub(crate) type Param = (Key, Vec<String>, Dist);

/// A value as the database records a param (strings bare, the rest as JSON).
pub(crate) fn recorded_text(n: &Node) -> String {
    match n.to_json() {
        serde_json::Value::String(s) => s,
        v => v.to_string(),
    }
}

/// A float as a short YAML number (six significant digits).
pub(crate) fn float_node(v: f64, origin: &Origin) -> Node {
    let v: f64 = format!("{v:.5e}").parse().unwrap_or(v);
    Node::new(Value::Float(v), origin.clone())
}

/// A value drawn uniformly from `d` (log-uniformly for `log_uniform`).
pub(crate) fn draw(d: &Dist, rng: &mut impl Rng, origin: &Origin) -> Node {
    match d {
        Dist::Uniform(a, b) => float_node(rng.random_range(*a..*b), origin),
        Dist::LogUniform(a, b) => float_node(rng.random_range(a.ln()..b.ln()).exp(), origin),
        Dist::Int(a, b) => Node::new(Value::Int(rng.random_range(*a..=*b)), origin.clone()),
        Dist::Choice(v) => v[rng.random_range(0..v.len())].clone(),
    }
}

/// The interval TPE works in for `d`: the log for `log_uniform`, `[a, b + 1)` for integers,
/// the index for a choice.
fn tpe_range(d: &Dist) -> tpe::range::Range {
    let r = match d {
        Dist::Uniform(a, b) => tpe::range(*a, *b),
        Dist::LogUniform(a, b) => tpe::range(a.ln(), b.ln()),
        Dist::Int(a, b) => tpe::range(*a as f64, *b as f64 + 1.0),
        Dist::Choice(v) => tpe::categorical_range(v.len()),
    };
    r.expect("ranges are checked when the search compiles")
}

/// A recorded value in TPE's interval; None when it is not a value of `d` (the file changed).
fn encode(d: &Dist, text: &str) -> Option<f64> {
    let x = || text.trim().parse::<f64>().ok().filter(|x| x.is_finite());
    let below = |x: f64, b: f64| if x >= b { b - (b.abs().max(1.0) * 1e-12) } else { x };
    match d {
        Dist::Uniform(a, b) => x().filter(|x| (a..=b).contains(&x)).map(|x| below(x, *b)),
        Dist::LogUniform(a, b) => x().filter(|x| (a..=b).contains(&x)).map(|x| below(x.ln(), b.ln())),
        Dist::Int(a, b) => x().filter(|x| x.fract() == 0.0 && (*a as f64..=*b as f64).contains(x)).map(|x| x + 0.5),
        Dist::Choice(v) => v.iter().position(|c| recorded_text(c) == text).map(|i| i as f64),
    }
}

/// TPE's value back as a parameter value.
fn decode(d: &Dist, x: f64, origin: &Origin) -> Node {
    match d {
        Dist::Uniform(a, b) => float_node(x.clamp(*a, *b), origin),
        Dist::LogUniform(a, b) => float_node(x.exp().clamp(*a, *b), origin),
        Dist::Int(a, b) => Node::new(Value::Int((x.floor() as i64).clamp(*a, *b)), origin.clone()),
        Dist::Choice(v) => v[(x as usize).min(v.len() - 1)].clone(),
    }
}

/// Whether `a` beats `b`: at least as good on every objective, better on one.
pub fn dominates(a: &[f64], b: &[f64], maximize: &[bool]) -> bool {
    let better = |x: f64, y: f64, max: bool| if max { x > y } else { x < y };
    a.iter().zip(b).zip(maximize).all(|((x, y), m)| !better(*y, *x, *m))
        && a.iter().zip(b).zip(maximize).any(|((x, y), m)| better(*x, *y, *m))
}

/// The indices of the non-dominated vectors (the Pareto front), in order.
pub fn pareto_front(values: &[Vec<f64>], maximize: &[bool]) -> Vec<usize> {
    (0..values.len())
        .filter(|&i| !(0..values.len()).any(|j| j != i && dominates(&values[j], &values[i], maximize)))
        .collect()
}

/// Each vector's rank as one number, lower is better: with one objective the value itself
/// (negated for `max`); with several, the index of its non-dominated front plus, within a
/// front, a share below 0.5 that is smaller the larger its crowding distance.
pub(crate) fn ranks(values: &[Vec<f64>], maximize: &[bool]) -> Vec<f64> {
    if maximize.len() == 1 {
        return values.iter().map(|v| if maximize[0] { -v[0] } else { v[0] }).collect();
    }
    let mut rank = vec![0.0; values.len()];
    let mut left: Vec<usize> = (0..values.len()).collect();
    let mut front_no = 0.0;
    while !left.is_empty() {
        let sub: Vec<Vec<f64>> = left.iter().map(|&i| values[i].clone()).collect();
        let front: Vec<usize> = pareto_front(&sub, maximize).into_iter().map(|k| left[k]).collect();
        // Crowding distance (Deb et al. 2002): per objective, the gap between neighbours.
        let mut crowd = vec![0.0f64; front.len()];
        for (m, _) in maximize.iter().enumerate() {
            let mut order: Vec<usize> = (0..front.len()).collect();
            order.sort_by(|&x, &y| values[front[x]][m].total_cmp(&values[front[y]][m]));
            let (lo, hi) = (values[front[order[0]]][m], values[front[order[order.len() - 1]]][m]);
            crowd[order[0]] = f64::INFINITY;
            crowd[order[order.len() - 1]] = f64::INFINITY;
            if hi > lo {
                for w in 1..order.len().saturating_sub(1) {
                    crowd[order[w]] += (values[front[order[w + 1]]][m] - values[front[order[w - 1]]][m]) / (hi - lo);
                }
            }
        }
        for (k, &i) in front.iter().enumerate() {
            // Infinite crowding -> 0, none -> just under 0.5.
            rank[i] = front_no + 0.5 / (1.0 + crowd[k]);
        }
        left.retain(|i| !front.contains(i));
        front_no += 1.0;
    }
    rank
}

/// What TPE is told of each trial, lower is better: a complete trial's rank ([`ranks`]); a
/// pruned trial below every complete one, the later its epoch the better (as Optuna ranks
/// pruned trials), so a study that prunes most of its trials still learns from them.
fn tell_values(told: &[&Told], maximize: &[bool]) -> Vec<f64> {
    let complete: Vec<Vec<f64>> = told.iter().filter(|t| t.pruned_at.is_none()).map(|t| t.objectives.clone()).collect();
    let complete_ranks = ranks(&complete, maximize);
    let floor = complete_ranks.iter().copied().fold(0.0f64, f64::max).abs() + 1.0;
    let mut r = complete_ranks.into_iter();
    told.iter()
        .map(|t| match t.pruned_at {
            None => r.next().expect("one rank per complete trial"),
            Some(step) => floor + 1.0 / (1.0 + step.max(0) as f64),
        })
        .collect()
}

/// The point of trial `index` of a TPE search over `params`, given the finished trials:
/// uniform draws until `startup` trials have finished, then TPE for each parameter.
pub(crate) fn tpe_point(
    params: &[Param],
    told: &[Told],
    maximize: &[bool],
    seed: u64,
    startup: usize,
    index: u64,
) -> Vec<Assignment> {
    // One random stream per trial: the same trial index draws the same values.
    let stream = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index;
    // Trials whose every searched value still lies in the space (the file may have changed).
    let usable: Vec<(Vec<f64>, &Told)> = told
        .iter()
        .filter(|t| {
            t.pruned_at.is_some()
                || (t.objectives.len() == maximize.len() && t.objectives.iter().all(|o| o.is_finite()))
        })
        .filter_map(|t| {
            let xs: Option<Vec<f64>> =
                params.iter().map(|(k, _, d)| t.values.get(&k.name).and_then(|s| encode(d, s))).collect();
            xs.map(|xs| (xs, t))
        })
        .collect();
    if usable.len() < startup.max(1) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(stream);
        return params
            .iter()
            .map(|(k, path, d)| (k.name.clone(), path.clone(), draw(d, &mut rng, &k.origin)))
            .collect();
    }
    let value = tell_values(&usable.iter().map(|(_, t)| *t).collect::<Vec<_>>(), maximize);
    let mut rng = <rand_chacha03::ChaCha8Rng as rand_chacha03::rand_core::SeedableRng>::seed_from_u64(stream);
    params
        .iter()
        .enumerate()
        .map(|(p, (k, path, d))| {
            let estimator =
                if matches!(d, Dist::Choice(_)) { tpe::histogram_estimator() } else { tpe::parzen_estimator() };
            let mut optim = tpe::TpeOptimizer::new(estimator, tpe_range(d));
            for ((xs, _), v) in usable.iter().zip(&value) {
                optim.tell(xs[p], *v).expect("encoded values lie in the range, ranks are finite");
            }
            let x = match optim.ask(&mut rng) {
                Ok(x) => x,
                Err(never) => match never {},
            };
            (k.name.clone(), path.clone(), decode(d, x, &k.origin))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        Key { name: name.into(), origin: Origin::Default }
    }

    /// A toy study: minimise (x - 0.3)^2 + (y - 0.7)^2 over [0, 1]^2 by asking and telling.
    fn regret(sampler_startup: usize, seed: u64, trials: u64) -> f64 {
        let params = vec![
            (key("x"), vec!["x".to_string()], Dist::Uniform(0.0, 1.0)),
            (key("y"), vec!["y".to_string()], Dist::Uniform(0.0, 1.0)),
        ];
        let mut told: Vec<Told> = Vec::new();
        let mut best = f64::INFINITY;
        for i in 0..trials {
            let point = tpe_point(&params, &told, &[false], seed, sampler_startup, i);
            let v: BTreeMap<String, String> = point.iter().map(|(k, _, n)| (k.clone(), recorded_text(n))).collect();
            let (x, y): (f64, f64) = (v["x"].parse().unwrap(), v["y"].parse().unwrap());
            let f = (x - 0.3).powi(2) + (y - 0.7).powi(2);
            best = best.min(f);
            told.push(Told { values: v, objectives: vec![f], pruned_at: None });
        }
        best
    }

    fn median(mut xs: Vec<f64>) -> f64 {
        xs.sort_by(f64::total_cmp);
        (xs[xs.len() / 2 - 1] + xs[xs.len() / 2]) / 2.0
    }

    #[test]
    fn tpe_beats_random_search_on_a_quadratic_and_is_deterministic_for_a_seed() {
        // Random search: startup larger than the budget. TPE: Optuna's 10 random trials first.
        let random = median((0..10).map(|s| regret(1000, s, 40)).collect());
        let tpe = median((0..10).map(|s| regret(10, s, 40)).collect());
        eprintln!("median regret after 40 trials over 10 seeds: TPE {tpe:.2e}, random {random:.2e}");
        assert!(tpe < random / 2.0, "median regret after 40 trials: TPE {tpe:.2e}, random {random:.2e}");
        assert_eq!(regret(10, 7, 30), regret(10, 7, 30));
        assert_ne!(regret(10, 7, 30), regret(10, 8, 30));
    }

    #[test]
    fn values_round_trip_through_tpe_space() {
        let o = Origin::Default;
        let cases = [
            (Dist::Uniform(0.0, 1.0), "0.25"),
            (Dist::LogUniform(1e-4, 1e-2), "0.001"),
            (Dist::Int(3, 5), "5"),
            (
                Dist::Choice(vec![
                    Node::new(Value::Str("graph".into()), o.clone()),
                    Node::new(Value::Float(0.5), o.clone()),
                ]),
                "0.5",
            ),
        ];
        for (d, text) in &cases {
            let x = encode(d, text).unwrap_or_else(|| panic!("{text} in {d:?}"));
            assert!(tpe_range(d).contains(x), "{text} -> {x}");
            assert_eq!(recorded_text(&decode(d, x, &o)).parse::<f64>().unwrap(), text.parse::<f64>().unwrap());
        }
        // The upper end of a float range is in the space; a value outside is not.
        assert!(encode(&Dist::Uniform(0.0, 1.0), "1").is_some_and(|x| tpe_range(&Dist::Uniform(0.0, 1.0)).contains(x)));
        assert_eq!(encode(&Dist::Uniform(0.0, 1.0), "1.5"), None);
        assert_eq!(encode(&Dist::Int(3, 5), "4.5"), None);
        assert_eq!(encode(&cases[3].0, "graph-tree"), None);
    }

    #[test]
    fn the_front_keeps_the_vectors_no_other_beats_on_every_objective() {
        // (accuracy up, loss down): b beats a on both; c trades; d equals b (neither beats).
        let v = vec![vec![0.5, 2.0], vec![0.8, 1.0], vec![0.9, 3.0], vec![0.8, 1.0]];
        assert_eq!(pareto_front(&v, &[true, false]), [1, 2, 3]);
        // One objective: the best only (and its ties).
        assert_eq!(pareto_front(&[vec![1.0], vec![3.0], vec![2.0]], &[true]), [1]);
        assert_eq!(pareto_front(&[vec![1.0], vec![3.0], vec![2.0]], &[false]), [0]);
    }

    #[test]
    fn pruned_trials_rank_below_complete_ones_later_epochs_first() {
        let t = |objectives: Vec<f64>, pruned_at: Option<i64>| Told { values: BTreeMap::new(), objectives, pruned_at };
        let told = [t(vec![0.9], None), t(vec![], Some(3)), t(vec![0.5], None), t(vec![], Some(9))];
        let v = tell_values(&told.iter().collect::<Vec<_>>(), &[true]);
        // Maximise: 0.9 best, then 0.5, then the trial pruned at 9, then the one pruned at 3.
        assert!(v[0] < v[2] && v[2] < v[3] && v[3] < v[1], "{v:?}");
        // With a minimised objective whose values are negative ranks, pruned ones still come last.
        let told = [t(vec![-5.0], None), t(vec![], Some(1)), t(vec![-7.0], None)];
        let v = tell_values(&told.iter().collect::<Vec<_>>(), &[false]);
        assert!(v[2] < v[0] && v[0] < v[1], "{v:?}");
    }

    #[test]
    fn multi_objective_ranks_follow_fronts_then_crowding() {
        // Maximise both: a, b, c form the first front (b in the middle, least crowded ends win);
        // d is dominated by b only; e by everything.
        let v = vec![vec![1.0, 0.0], vec![0.6, 0.6], vec![0.0, 1.0], vec![0.5, 0.5], vec![0.0, 0.0]];
        let r = ranks(&v, &[true, true]);
        assert!(r[0] < 0.5 && r[1] < 0.5 && r[2] < 0.5, "{r:?}");
        assert_eq!((r[0], r[2]), (0.0, 0.0), "the front's ends are the least crowded");
        assert!(r[1] > 0.0);
        assert!((1.0..1.5).contains(&r[3]) && (2.0..2.5).contains(&r[4]), "{r:?}");
        // One objective: the value, oriented so that lower is better.
        assert_eq!(ranks(&[vec![2.0], vec![3.0]], &[true]), [-2.0, -3.0]);
        assert_eq!(ranks(&[vec![2.0], vec![3.0]], &[false]), [2.0, 3.0]);
    }
}
