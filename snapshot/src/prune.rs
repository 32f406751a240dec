//! Pruning a workspace's snapshots by a retention policy. A diff holds only what changed since its
//! parent, so a snapshot the policy would let go stays while a kept snapshot depends on it.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::SnapshotError;
use crate::open::Snapshot;

/// What a prune may delete. With neither limit it deletes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Only snapshots at least this old (by their manifest's creation time).
    pub older_than: Option<Duration>,
    /// Never the newest this many.
    pub keep: Option<usize>,
}

impl Policy {
    /// Whether the policy alone lets `snaps[i]` go at `now` (seconds since the epoch), before
    /// what depends on it is considered. `snaps` is oldest first.
    fn lets_go(&self, snaps: &[Snapshot], i: usize, now: u64) -> bool {
        let newest_kept_from = self
            .keep
            .map_or(snaps.len(), |k| snaps.len().saturating_sub(k));
        let old_enough = match self.older_than {
            Some(d) => snaps[i].manifest.created_unix.saturating_add(d.as_secs()) <= now,
            None => self.keep.is_some(),
        };
        (self.keep.is_none() || i < newest_kept_from) && old_enough
    }
}

/// The snapshots of `snaps` (oldest first, as [`crate::list`] returns them) that `policy` deletes
/// at `now`, children before parents: every parent a kept snapshot depends on, however distant,
/// is kept.
pub fn select<'a>(snaps: &'a [Snapshot], now: u64, policy: &Policy) -> Vec<&'a Snapshot> {
    let mut doomed: Vec<bool> = (0..snaps.len())
        .map(|i| policy.lets_go(snaps, i, now))
        .collect();
    // Diffs name their parent by tag.
    let mut by_tag: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, s) in snaps.iter().enumerate() {
        by_tag.entry(s.manifest.tag.as_str()).or_default().push(i);
    }
    // Each snapshot is spared at most once, so a chain that loops still ends.
    let mut kept: Vec<usize> = (0..snaps.len()).filter(|&i| !doomed[i]).collect();
    while let Some(i) = kept.pop() {
        let Some(parent) = snaps[i].manifest.parent.as_deref() else {
            continue;
        };
        for &p in by_tag.get(parent).into_iter().flatten() {
            if doomed[p] {
                doomed[p] = false;
                kept.push(p);
            }
        }
    }
    let mut chosen: Vec<&Snapshot> = snaps
        .iter()
        .zip(doomed)
        .filter_map(|(s, d)| d.then_some(s))
        .collect();
    chosen.sort_by_key(|s| std::cmp::Reverse(s.manifest.created_ns));
    chosen
}

/// Deletes `chosen` in order (as [`select`] returns them), each renamed aside first so a
/// half-deleted snapshot never looks complete. Stops at the first failure.
pub fn delete(chosen: &[&Snapshot]) -> Result<(), SnapshotError> {
    chosen.iter().try_for_each(|s| (*s).clone().delete())
}

/// The tags of every snapshot in `all` that depends on `tag`: its diffs, theirs, and so on.
pub fn dependents(all: &[Snapshot], tag: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut frontier = vec![tag.to_string()];
    while let Some(t) = frontier.pop() {
        for s in all {
            if s.manifest.parent.as_deref() == Some(t.as_str()) && !out.contains(&s.manifest.tag) {
                out.push(s.manifest.tag.clone());
                frontier.push(s.manifest.tag.clone());
            }
        }
    }
    out
}

/// Two chains and a lone full snapshot, captured from a fake VM, aged by hand: which go, which
/// stay for a kept diff's sake, and that what stays still restores.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Setup;
    use crate::open::list;
    use crate::restore::{plan, RestorePlan};

    const DAY: u64 = 86_400;
    const NOW: u64 = 1_000 * DAY;

    /// Oldest first: `a` <- `a1` <- `a2` (the newest, a recent diff of an old chain),
    /// `b` <- `b1`, and `c`, with their ages in days.
    const SNAPS: [(&str, Option<&str>, u64); 6] = [
        ("a", None, 40),
        ("a1", Some("a"), 35),
        ("b", None, 30),
        ("b1", Some("b"), 25),
        ("c", None, 20),
        ("a2", Some("a1"), 1),
    ];

    fn setup(name: &str) -> (Setup, Vec<Snapshot>) {
        let s = Setup::new(name);
        for (i, (tag, parent, _)) in SNAPS.iter().enumerate() {
            s.capture(tag, *parent, i, 0x10 + i as u8, tag);
        }
        let mut snaps = list(&s.snaps);
        let tags: Vec<&str> = snaps.iter().map(|s| s.manifest.tag.as_str()).collect();
        assert_eq!(tags, SNAPS.map(|(t, _, _)| t), "listed oldest first");
        for (snap, (_, _, age)) in snaps.iter_mut().zip(SNAPS) {
            snap.manifest.created_unix = NOW - age * DAY;
        }
        (s, snaps)
    }

    fn tags(chosen: &[&Snapshot]) -> Vec<String> {
        chosen.iter().map(|s| s.manifest.tag.clone()).collect()
    }

    fn policy(older_than_days: Option<u64>, keep: Option<usize>) -> Policy {
        Policy {
            older_than: older_than_days.map(|d| Duration::from_secs(d * DAY)),
            keep,
        }
    }

    #[test]
    fn a_parent_a_kept_snapshot_needs_stays_and_children_go_first() {
        let (_s, snaps) = setup("prune-select");
        let cases: [(Option<u64>, Option<usize>, &[&str]); 8] = [
            // a and a1 are among the oldest, but the kept a2 is a diff of a1, a1 of a.
            (None, Some(2), &["b1", "b"]),
            (Some(7), None, &["c", "b1", "b"]),
            // c is too young; b1 goes with b.
            (Some(22), Some(1), &["b1", "b"]),
            // b is old enough but its diff b1 is not: both stay.
            (Some(27), Some(1), &[]),
            (None, Some(0), &["a2", "c", "b1", "b", "a1", "a"]),
            (Some(0), None, &["a2", "c", "b1", "b", "a1", "a"]),
            (None, Some(10), &[]),
            // Without a limit nothing goes.
            (None, None, &[]),
        ];
        for (older, keep, want) in cases {
            let got = tags(&select(&snaps, NOW, &policy(older, keep)));
            assert_eq!(got, want, "older than {older:?} days, keep {keep:?}");
        }
    }

    #[test]
    fn a_parent_chain_that_loops_still_ends() {
        let (_s, mut snaps) = setup("prune-loop");
        // a -> a2 -> a1 -> a: keeping a2 keeps the whole loop.
        snaps[0].manifest.parent = Some("a2".into());
        let got = tags(&select(&snaps, NOW, &policy(None, Some(1))));
        assert_eq!(got, ["c", "b1", "b"]);
    }

    #[test]
    fn pruning_deletes_the_chosen_and_what_stays_restores() {
        let (s, snaps) = setup("prune-delete");
        let chosen = select(&snaps, NOW, &policy(Some(7), None));
        delete(&chosen).unwrap();
        // Nothing half-deleted left behind either.
        assert_eq!(s.entries(), ["a", "a1", "a2"]);
        let left = list(&s.snaps);
        assert_eq!(dependents(&left, "a"), ["a1", "a2"]);
        assert!(dependents(&left, "a2").is_empty());

        let a2 = Snapshot::open(&s.snaps.join("a2")).unwrap();
        let p: RestorePlan<String> = plan(&a2, Some(&s.kernel), true).unwrap();
        assert_eq!(p.state, "a2");
        assert!(
            Setup::rebuild(&p) == s.vm.memory(),
            "a2 no longer rebuilds the memory it captured"
        );
        // a1 still rebuilds its own moment: page 0 from a, page 1 its own, nothing later.
        let a1 = Snapshot::open(&s.snaps.join("a1")).unwrap();
        let m = Setup::rebuild(&plan::<String>(&a1, Some(&s.kernel), true).unwrap());
        assert_eq!((m[0], m[4096], m[2 * 4096]), (0x10, 0x11, 0));
    }

    #[test]
    fn dependents_follow_diffs_of_diffs() {
        let (_s, snaps) = setup("prune-dependents");
        assert_eq!(dependents(&snaps, "a"), ["a1", "a2"]);
        assert_eq!(dependents(&snaps, "b"), ["b1"]);
        assert!(dependents(&snaps, "c").is_empty());
    }
}
