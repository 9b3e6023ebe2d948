//! Earliest-deadline-first scheduling, how Envoy spreads picks when weights change between
//! picks (slow start, least request with unequal weights, locality weights): each entry is due
//! `1 / weight` after the last pick; the earliest due entry is picked and scheduled again with
//! the weight it has then. Ties go to the entry scheduled first.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// The smallest weight an entry is scheduled with (a zero weight would never come due).
const MIN_WEIGHT: f64 = 1e-9;

#[derive(Debug)]
struct Entry {
    deadline: f64,
    /// Scheduling order, for ties.
    order: u64,
    index: usize,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed: the heap's greatest entry is the earliest due.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .deadline
            .total_cmp(&self.deadline)
            .then(other.order.cmp(&self.order))
    }
}

/// A schedule of indexes (hosts, localities) by weight.
#[derive(Debug, Default)]
pub struct Edf {
    heap: BinaryHeap<Entry>,
    now: f64,
    order: u64,
}

impl Edf {
    /// Schedules each `(index, weight)`; entries of weight 0 are left out.
    pub fn new(weights: impl IntoIterator<Item = (usize, f64)>) -> Self {
        let mut edf = Edf::default();
        for (index, weight) in weights {
            if weight > 0.0 {
                edf.add(index, weight);
            }
        }
        edf
    }

    fn add(&mut self, index: usize, weight: f64) {
        let deadline = self.now + 1.0 / weight.max(MIN_WEIGHT);
        self.order += 1;
        self.heap.push(Entry {
            deadline,
            order: self.order,
            index,
        });
    }

    /// Picks the earliest due index and schedules it again with `weight(index)` as it is now.
    pub fn pick_and_add(&mut self, weight: impl FnOnce(usize) -> f64) -> Option<usize> {
        let entry = self.heap.pop()?;
        self.now = entry.deadline;
        self.add(entry.index, weight(entry.index));
        Some(entry.index)
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_weights_give_exact_shares() {
        let weights = [1.0, 2.0, 3.0, 4.0];
        let mut edf = Edf::new(weights.iter().copied().enumerate());
        let mut counts = [0; 4];
        for _ in 0..1000 {
            let index = edf.pick_and_add(|i| weights[i]).unwrap();
            counts[index] += 1;
        }
        assert_eq!(counts, [100, 200, 300, 400]);
    }

    #[test]
    fn a_weight_that_changes_applies_from_its_next_turn_and_zero_weights_are_left_out() {
        let mut edf = Edf::new([(0, 1.0), (1, 1.0), (2, 0.0)]);
        let mut counts = [0; 3];
        for _ in 0..300 {
            // Host 1 triples its weight after its first pick.
            let index = edf
                .pick_and_add(|i| if i == 1 { 3.0 } else { 1.0 })
                .unwrap();
            counts[index] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!((220..=230).contains(&counts[1]), "{counts:?}");
        assert!(Edf::new([(0, 0.0)]).is_empty());
    }
}
