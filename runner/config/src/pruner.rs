//! A `search:`'s pruner (`pruner: { kind: asha, min_epochs: 4, max_epochs: 40, reduction: 3 }`):
//! asynchronous successive halving (ASHA, Li et al. 2018) with epochs as the resource. Rungs
//! sit at `min_epochs * reduction^k` epochs (below `max_epochs`); a trial reaching a rung goes
//! on only if it is in the top `1 / reduction` of the trials that have reached that rung so
//! far (at least the best one), judged at once, with no waiting for a batch: the rule of
//! Optuna's successive-halving pruner. With several objectives the order is by non-dominated
//! front, then crowding distance (MO-ASHA, Schmucker et al. 2021), the ranking the TPE sampler
//! uses ([`crate::sampler`]).

use crate::sampler::ranks;

/// ASHA's settings, as compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Asha {
    /// The first rung, in epochs (steps).
    pub min_epochs: i64,
    /// No rung at or beyond this epoch (None: rungs go on).
    pub max_epochs: Option<i64>,
    /// Each rung keeps the top 1/reduction; the next rung is `reduction` times further.
    pub reduction: i64,
}

impl Asha {
    /// Whether `step` (an epoch) is a rung.
    pub fn is_rung(&self, step: i64) -> bool {
        let mut r = self.min_epochs;
        while r <= step && self.max_epochs.is_none_or(|m| r < m) {
            if r == step {
                return true;
            }
            r = r.saturating_mul(self.reduction);
        }
        false
    }
}

/// Whether the trial `me` among `all` (every trial's objectives at one rung, `me`'s included)
/// is in the rung's top `len / reduction` (at least 1): fewer than that many rank above it.
pub fn promotable(all: &[Vec<f64>], me: usize, maximize: &[bool], reduction: i64) -> bool {
    let keep = (all.len() / reduction.max(1) as usize).max(1);
    let r = ranks(all, maximize);
    r.iter().filter(|&&x| x < r[me]).count() < keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rungs_sit_at_min_times_powers_of_the_reduction_below_max() {
        let a = Asha { min_epochs: 2, max_epochs: Some(20), reduction: 3 };
        let rungs: Vec<i64> = (0..=30).filter(|&s| a.is_rung(s)).collect();
        assert_eq!(rungs, [2, 6, 18]);
        let a = Asha { min_epochs: 1, max_epochs: None, reduction: 2 };
        assert_eq!((0..=20).filter(|&s| a.is_rung(s)).collect::<Vec<_>>(), [1, 2, 4, 8, 16]);
        // The last epoch is never a rung: a trial that got there ends anyway.
        assert!(!Asha { min_epochs: 3, max_epochs: Some(9), reduction: 3 }.is_rung(9));
    }

    #[test]
    fn asha_keeps_the_top_third_as_results_arrive() {
        // Minimise; reduction 3. Worked by hand, one arrival at a time:
        // 5: alone -> go on. 3: keep 1 of 2, best -> on. 4: keep 1 of 3, 3 is better -> stop.
        // 1: keep 1 of 4, best -> on. 2: keep 1 of 5, 1 is better -> stop.
        // 0.5: keep 2 of 6, best -> on. 2.5: keep 2 of 7, 0.5/1/2 better -> stop.
        // 0.8: keep 2 of 8, only 0.5 better -> on. 1 (tie): keep 3 of 9, 0.5 and 0.8 better -> on.
        let arrivals = [5.0, 3.0, 4.0, 1.0, 2.0, 0.5, 2.5, 0.8, 1.0];
        let expected = [true, true, false, true, false, true, false, true, true];
        let mut seen: Vec<Vec<f64>> = Vec::new();
        for (v, want) in arrivals.iter().zip(expected) {
            seen.push(vec![*v]);
            assert_eq!(promotable(&seen, seen.len() - 1, &[false], 3), want, "{v} after {seen:?}");
        }
        // Maximising flips the order.
        assert!(!promotable(&[vec![5.0], vec![3.0]], 1, &[true], 2));
        // Two objectives (both max): a trial on the first front goes on, a dominated one not.
        let rung = vec![vec![0.9, 0.1], vec![0.1, 0.9], vec![0.5, 0.5], vec![0.4, 0.4]];
        assert!(promotable(&rung, 0, &[true, true], 2));
        assert!(!promotable(&rung, 3, &[true, true], 2));
    }
}
