//! Smooth weighted round-robin (the nginx algorithm) and the failover order.
//!
//! Each worker thread keeps its own `Wrr` per pool (plain `Cell`s, no atomics and no
//! locks): within one worker, weights 5,1,1 interleave as `a a b a c a a` and every cycle
//! of `sum(weights)` picks gives each node exactly its weight. Nodes that cannot be used
//! (down, drained, already tried by this request) are skipped without disturbing the
//! others' shares. Backup members are considered only when no primary can be used.

use std::cell::Cell;

use crate::topology::{Member, NodeId};

#[derive(Debug)]
pub struct Wrr {
    current: Box<[Cell<i64>]>,
}

impl Wrr {
    pub fn new(members: usize) -> Self {
        Wrr {
            current: (0..members).map(|_| Cell::new(0)).collect(),
        }
    }

    /// A balancer `skip` picks into its cycle, so that workers do not all start on the
    /// same member (worker `i` of a process skips `i`): after a reload, the first requests
    /// of every worker spread instead of all going to the first node.
    pub fn starting_at(members: &[Member], skip: usize) -> Self {
        let wrr = Wrr::new(members.len());
        for _ in 0..skip {
            wrr.pick(members, |_| true);
        }
        wrr
    }

    /// Picks a member index. `usable(node)` says whether a node may take the request.
    #[inline]
    pub fn pick(&self, members: &[Member], usable: impl Fn(NodeId) -> bool) -> Option<usize> {
        debug_assert_eq!(members.len(), self.current.len());
        self.pick_among(members, false, &usable)
            .or_else(|| self.pick_among(members, true, &usable))
    }

    /// Picks among primary members only (panic mode: backups are never in it).
    #[inline]
    pub fn pick_primary(
        &self,
        members: &[Member],
        usable: impl Fn(NodeId) -> bool,
    ) -> Option<usize> {
        debug_assert_eq!(members.len(), self.current.len());
        self.pick_among(members, false, &usable)
    }

    #[inline]
    fn pick_among(
        &self,
        members: &[Member],
        backup: bool,
        usable: &impl Fn(NodeId) -> bool,
    ) -> Option<usize> {
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        let mut best_weight = i64::MIN;
        for (i, m) in members.iter().enumerate() {
            if m.backup != backup || !usable(m.node) {
                continue;
            }
            let w = m.weight as i64;
            let c = self.current[i].get() + w;
            self.current[i].set(c);
            total += w;
            if c > best_weight {
                best_weight = c;
                best = Some(i);
            }
        }
        let b = best?;
        self.current[b].set(best_weight - total);
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(weights: &[(u32, bool)]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &(weight, backup))| Member {
                node: i,
                weight,
                backup,
            })
            .collect()
    }

    #[test]
    fn smooth_sequence_5_1_1() {
        let m = members(&[(5, false), (1, false), (1, false)]);
        let wrr = Wrr::new(m.len());
        let seq: String = (0..14)
            .map(|_| (b'a' + wrr.pick(&m, |_| true).unwrap() as u8) as char)
            .collect();
        assert_eq!(seq, "aabacaaaabacaa");
    }

    #[test]
    fn exact_distribution_over_a_cycle() {
        let m = members(&[(3, false), (2, false), (7, false), (1, false)]);
        let wrr = Wrr::new(m.len());
        let mut counts = [0; 4];
        for _ in 0..13 * 10 {
            counts[wrr.pick(&m, |_| true).unwrap()] += 1;
        }
        assert_eq!(counts, [30, 20, 70, 10]);
    }

    #[test]
    fn a_start_point_shifts_the_cycle() {
        let m = members(&[(1, false), (1, false), (1, false)]);
        let firsts: Vec<usize> = (0..3)
            .map(|k| Wrr::starting_at(&m, k).pick(&m, |_| true).unwrap())
            .collect();
        assert_eq!(firsts, [0, 1, 2]);
        // The shares over a cycle stay exact.
        let wrr = Wrr::starting_at(&m, 2);
        let mut counts = [0; 3];
        for _ in 0..30 {
            counts[wrr.pick(&m, |_| true).unwrap()] += 1;
        }
        assert_eq!(counts, [10, 10, 10]);
    }

    #[test]
    fn skips_unusable_and_uses_backup_last() {
        let m = members(&[(2, false), (1, false), (1, true)]);
        let wrr = Wrr::new(m.len());
        for _ in 0..6 {
            assert_eq!(wrr.pick(&m, |n| n != 0), Some(1));
        }
        assert_eq!(wrr.pick(&m, |n| n == 2), Some(2));
        assert_eq!(wrr.pick(&m, |_| false), None);
    }
}
