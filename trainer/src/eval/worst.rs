//! The N worst-scored targets of each set, kept while an evaluation runs: one bounded max-heap
//! per set, so memory holds N items per set whatever the tree's size, and the (costly) item of a
//! target is only made when the target gets in.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use anyhow::Result;

struct Kept<T> {
    dice: f64,
    /// Order of arrival: on equal Dice the earlier target is kept, so the result does not depend
    /// on the heap's internals.
    arrival: u64,
    item: T,
}

impl<T> Kept<T> {
    /// Larger = less bad = evicted first.
    fn key(&self) -> (f64, u64) {
        (self.dice, self.arrival)
    }
}

impl<T> PartialEq for Kept<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<T> Eq for Kept<T> {}
impl<T> PartialOrd for Kept<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Kept<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        let ((a, i), (b, j)) = (self.key(), other.key());
        a.total_cmp(&b).then(i.cmp(&j))
    }
}

/// Keeps, per set, the `keep` targets with the lowest Dice seen so far.
pub struct WorstTargets<T> {
    keep: usize,
    arrivals: u64,
    sets: HashMap<String, BinaryHeap<Kept<T>>>,
}

impl<T> WorstTargets<T> {
    pub fn new(keep: usize) -> Self {
        WorstTargets {
            keep,
            arrivals: 0,
            sets: HashMap::new(),
        }
    }

    /// Would a target of `set` scoring `dice` be kept now?
    pub fn admits(&self, set: &str, dice: f64) -> bool {
        if self.keep == 0 {
            return false;
        }
        match self
            .sets
            .get(set)
            .and_then(|h| h.peek().map(|top| (h.len(), top.dice)))
        {
            Some((len, least_bad)) if len >= self.keep => dice.total_cmp(&least_bad).is_lt(),
            _ => true,
        }
    }

    /// Offers a target; `make` builds its item (e.g. an overlay) only if it is kept.
    pub fn offer(&mut self, set: &str, dice: f64, make: impl FnOnce() -> Result<T>) -> Result<()> {
        let arrival = self.arrivals;
        self.arrivals += 1;
        if !self.admits(set, dice) {
            return Ok(());
        }
        let heap = self.sets.entry(set.to_string()).or_default();
        heap.push(Kept {
            dice,
            arrival,
            item: make()?,
        });
        if heap.len() > self.keep {
            heap.pop();
        }
        Ok(())
    }

    /// Each set's kept targets, worst first (lowest Dice; earlier first on ties).
    pub fn into_worst_first(self) -> HashMap<String, Vec<(f64, T)>> {
        self.sets
            .into_iter()
            .map(|(set, heap)| {
                let list = heap
                    .into_sorted_vec()
                    .into_iter()
                    .map(|k| (k.dice, k.item))
                    .collect();
                (set, list)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_lowest_per_set_and_makes_only_what_it_keeps() {
        let mut w = WorstTargets::new(3);
        let mut made = 0;
        // A deterministic shuffle of 0..50 in two sets.
        let scores: Vec<(usize, f64)> = (0..100)
            .map(|i| (i % 2, ((i * 37) % 100) as f64 / 100.0))
            .collect();
        for (i, (set, dice)) in scores.iter().enumerate() {
            let set = ["a", "b"][*set];
            w.offer(set, *dice, || {
                made += 1;
                Ok(i)
            })
            .unwrap();
        }
        assert!(made < 40, "{made} items made for 100 offers of 3-of-50");
        let kept = w.into_worst_first();
        for (set, parity) in [("a", 0), ("b", 1)] {
            let mut all: Vec<f64> = scores
                .iter()
                .filter(|(s, _)| *s == parity)
                .map(|(_, d)| *d)
                .collect();
            all.sort_by(f64::total_cmp);
            let got: Vec<f64> = kept[set].iter().map(|(d, _)| *d).collect();
            assert_eq!(got, all[..3], "set {set}");
            for (d, i) in &kept[set] {
                assert_eq!(scores[*i].1, *d, "the item belongs to its score");
            }
        }
    }

    #[test]
    fn ties_keep_the_earliest_and_zero_keeps_nothing() {
        let mut w = WorstTargets::new(2);
        let mut made = 0;
        for i in 0..5 {
            w.offer("s", 0.5, || {
                made += 1;
                Ok(i)
            })
            .unwrap();
        }
        assert_eq!(made, 2, "a tie with the least bad kept is not drawn");
        let kept: Vec<usize> = w.into_worst_first()["s"].iter().map(|(_, i)| *i).collect();
        assert_eq!(kept, vec![0, 1]);
        let mut none = WorstTargets::new(0);
        none.offer("s", 0.0, || -> Result<()> { panic!("made with keep 0") })
            .unwrap();
        assert!(none.into_worst_first().is_empty());
    }

    #[test]
    fn an_error_making_the_item_is_returned() {
        let mut w = WorstTargets::<()>::new(1);
        assert!(w.offer("s", 0.1, || anyhow::bail!("cannot draw")).is_err());
    }
}
