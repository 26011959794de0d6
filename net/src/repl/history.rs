//! Epoch history and divergence: where a returning or lagging node's journal stops agreeing
//! with the primary's, so it can discard its unconfirmed tail and resync from there.
//!
//! Every node persists, per volume, the list of epochs it knows with the sequence number at
//! which each began (design-fencing.md, "Actors and durable state"). A promotion to epoch
//! `e` appends `{ e, start_seq: durable_seq + 1, primary }` on the promoted node; a standby
//! adopts the primary's entries when it joins. Two nodes that hold the same entry for an
//! epoch wrote the same records in it up to the point where the later epoch began, because
//! one epoch has one primary and a standby only stores what that primary sent it.
//!
//! [`compare`] turns two histories into one of three answers; the rules, with the reason
//! for each, are on [`Divergence`] and in docs/replication.md ("Divergence").

use serde::{Deserialize, Serialize};

/// The start of one epoch in a node's history.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EpochStart {
    /// The epoch (raised by every promotion).
    pub epoch: u64,
    /// The first sequence number written in this epoch (the promoted node's
    /// `durable_seq + 1` when it was promoted; nothing need have been written yet).
    pub start_seq: u64,
    /// The node that was primary in this epoch.
    pub primary: String,
}

/// A node's epoch history, sorted by epoch, at most one entry per epoch.
///
/// # Invariants
///
/// - Entries are strictly increasing by `epoch`.
/// - `start_seq` is non-decreasing (an epoch starts after everything of the one before it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct History(Vec<EpochStart>);

impl History {
    /// A history from its entries; refuses entries that break the invariants.
    pub fn new(entries: Vec<EpochStart>) -> Result<Self, String> {
        for pair in entries.windows(2) {
            let [earlier, later] = pair else { continue };
            if later.epoch <= earlier.epoch {
                return Err(format!("epoch history not sorted: epoch {} follows epoch {}", later.epoch, earlier.epoch));
            }
            if later.start_seq < earlier.start_seq {
                return Err(format!(
                    "epoch history: epoch {} starts at seq {}, before epoch {} (seq {})",
                    later.epoch, later.start_seq, earlier.epoch, earlier.start_seq
                ));
            }
        }
        Ok(Self(entries))
    }

    /// Appends the start of a newer epoch (a promotion); refuses one that breaks the
    /// invariants.
    pub fn push(&mut self, entry: EpochStart) -> Result<(), String> {
        if let Some(last) = self.0.last() {
            if entry.epoch <= last.epoch || entry.start_seq < last.start_seq {
                return Err(format!(
                    "epoch {} starting at seq {} cannot follow epoch {} starting at seq {}",
                    entry.epoch, entry.start_seq, last.epoch, last.start_seq
                ));
            }
        }
        self.0.push(entry);
        Ok(())
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> &[EpochStart] {
        &self.0
    }

    /// The newest epoch, if any.
    pub fn last_epoch(&self) -> Option<u64> {
        self.0.last().map(|entry| entry.epoch)
    }

    /// The entry for `epoch`, if this history has it.
    pub fn get(&self, epoch: u64) -> Option<&EpochStart> {
        self.0.binary_search_by_key(&epoch, |entry| entry.epoch).ok().and_then(|index| self.0.get(index))
    }
}

impl From<Vec<EpochStart>> for History {
    /// A history from persisted or received entries, sorted by epoch (a later duplicate of
    /// an epoch is dropped). [`compare`] reports any disagreement that remains.
    fn from(mut entries: Vec<EpochStart>) -> Self {
        entries.sort_by_key(|entry| entry.epoch);
        entries.dedup_by_key(|entry| entry.epoch);
        Self(entries)
    }
}

/// How a node's journal relates to the authority's (the current primary's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Divergence {
    /// The histories agree and both journals end at the same sequence number: nothing to do.
    Same,
    /// The other node agrees with the authority up to and including `resync_from`. It must
    /// discard everything it has after `resync_from` (its unconfirmed tail: never
    /// acknowledged by any FLUSH, see [`compare`]) and resync the regions changed on either
    /// side since then. When the other node simply lags, it has nothing after
    /// `resync_from` and only catches up.
    Behind {
        /// The last sequence number both journals hold identically.
        resync_from: u64,
    },
    /// The histories disagree about an epoch the authority did not create after the other
    /// node's: two primaries wrote in parallel (a bug, or an operator's forced promotion).
    /// Replication must not proceed; no automatic merge (design-fencing.md, last case).
    SplitBrain {
        /// The first epoch on which they disagree.
        epoch: u64,
        /// What disagrees, for the operator.
        detail: String,
    },
}

/// Compares the other node's history with the authority's.
///
/// `authority` is the current primary (its newest epoch is at least the other's); the
/// `*_last_seq` arguments are the last durable sequence numbers of each journal. Rules,
/// checked in this order:
///
/// 1. Every epoch the other node has must be in the authority's history with the same
///    primary and the same start; otherwise [`Divergence::SplitBrain`] at the first such
///    epoch (the other node wrote in an epoch the authority never heard of, or the two
///    disagree about who wrote an epoch or where it began).
/// 2. If the authority has epochs the other lacks, let `b` be the start of the first of
///    them: the other node's records from `b` on were written in an epoch the authority
///    superseded (the other was the deposed primary, or a standby that received records the
///    old primary never got acknowledged). The point is `min(other_last_seq, b − 1)`.
/// 3. Otherwise both end in the same epoch. The point is
///    `min(authority_last_seq, other_last_seq)`: a standby that is *ahead* of the primary in
///    the same epoch holds records the primary never had durable (it restarted and lost
///    them), and a FLUSH is acknowledged only once durable on the primary too, so those
///    records were never acknowledged and are discarded. [`Divergence::Same`] when the two
///    last sequence numbers are equal.
///
/// The point never exceeds `authority_last_seq`.
pub fn compare(authority: &History, authority_last_seq: u64, other: &History, other_last_seq: u64) -> Divergence {
    // Rule 1: the other's epochs must all be the authority's.
    for theirs in other.entries() {
        match authority.get(theirs.epoch) {
            None => {
                return Divergence::SplitBrain {
                    epoch: theirs.epoch,
                    detail: format!(
                        "epoch {} (primary {:?}, from seq {}) is unknown to the current primary, whose newest \
                         epoch is {}",
                        theirs.epoch,
                        theirs.primary,
                        theirs.start_seq,
                        authority.last_epoch().map_or_else(|| "none".to_owned(), |epoch| epoch.to_string())
                    ),
                };
            }
            Some(ours) if ours.primary != theirs.primary || ours.start_seq != theirs.start_seq => {
                return Divergence::SplitBrain {
                    epoch: theirs.epoch,
                    detail: format!(
                        "epoch {}: the current primary records primary {:?} from seq {}, the other node \
                         primary {:?} from seq {}",
                        theirs.epoch, ours.primary, ours.start_seq, theirs.primary, theirs.start_seq
                    ),
                };
            }
            Some(_) => {}
        }
    }
    // Rule 2: the first epoch the other lacks ends what it can share with the authority.
    let other_last_epoch = other.last_epoch();
    let first_missing = authority.entries().iter().find(|entry| other_last_epoch.is_none_or(|last| entry.epoch > last));
    let point = match first_missing {
        Some(entry) => other_last_seq.min(entry.start_seq.saturating_sub(1)),
        // Rule 3: same last epoch.
        None if other_last_seq == authority_last_seq => return Divergence::Same,
        None => other_last_seq.min(authority_last_seq),
    };
    Divergence::Behind { resync_from: point.min(authority_last_seq) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(entries: &[(u64, u64, &str)]) -> History {
        History::new(
            entries
                .iter()
                .map(|&(epoch, start_seq, primary)| EpochStart { epoch, start_seq, primary: primary.to_owned() })
                .collect(),
        )
        .unwrap()
    }

    /// One row of the divergence table: (name, authority, authority last, other, other last, expected).
    type Row = (&'static str, Vec<(u64, u64, &'static str)>, u64, Vec<(u64, u64, &'static str)>, u64, Expect);

    #[derive(Debug)]
    enum Expect {
        Same,
        Behind(u64),
        SplitBrain(u64),
    }

    #[test]
    fn divergence_table() {
        let rows: Vec<Row> = vec![
            ("identical", vec![(1, 1, "a")], 10, vec![(1, 1, "a")], 10, Expect::Same),
            ("both empty", vec![], 0, vec![], 0, Expect::Same),
            ("standby lags in the same epoch", vec![(1, 1, "a")], 10, vec![(1, 1, "a")], 7, Expect::Behind(7)),
            (
                "standby ahead in the same epoch (primary lost its unflushed tail): rewinds",
                vec![(1, 1, "a")],
                7,
                vec![(1, 1, "a")],
                10,
                Expect::Behind(7),
            ),
            (
                "old primary returns after failover: tail after the new epoch's start is discarded",
                vec![(1, 1, "a"), (2, 8, "b")],
                20,
                vec![(1, 1, "a")],
                12,
                Expect::Behind(7),
            ),
            (
                "old primary had nothing beyond the promoted standby",
                vec![(1, 1, "a"), (2, 8, "b")],
                20,
                vec![(1, 1, "a")],
                7,
                Expect::Behind(7),
            ),
            (
                "lagging standby missed a promotion it was not part of",
                vec![(1, 1, "a"), (2, 8, "b"), (3, 15, "a")],
                20,
                vec![(1, 1, "a"), (2, 8, "b")],
                9,
                Expect::Behind(9),
            ),
            (
                "node missed two epochs and has a tail in the older one",
                vec![(1, 1, "a"), (2, 8, "b"), (3, 15, "a")],
                20,
                vec![(1, 1, "a")],
                11,
                Expect::Behind(7),
            ),
            ("fresh node with no history", vec![(1, 1, "a"), (2, 8, "b")], 20, vec![], 0, Expect::Behind(0)),
            (
                "epoch started but nothing written yet: point capped at the authority's last seq",
                vec![(1, 1, "a"), (2, 8, "b")],
                7,
                vec![(1, 1, "a")],
                7,
                Expect::Behind(7),
            ),
            (
                "same epoch, different primary",
                vec![(1, 1, "a"), (2, 8, "b")],
                20,
                vec![(1, 1, "a"), (2, 8, "a")],
                20,
                Expect::SplitBrain(2),
            ),
            (
                "same epoch, different start",
                vec![(1, 1, "a"), (2, 8, "b")],
                20,
                vec![(1, 1, "a"), (2, 9, "b")],
                20,
                Expect::SplitBrain(2),
            ),
            (
                "other has an epoch the authority lacks (forced promotion skipped it)",
                vec![(1, 1, "a"), (3, 10, "a")],
                20,
                vec![(1, 1, "a"), (2, 8, "b")],
                12,
                Expect::SplitBrain(2),
            ),
            (
                "authority is behind the other (caller error) is reported, not trusted",
                vec![(1, 1, "a")],
                20,
                vec![(1, 1, "a"), (2, 8, "b")],
                12,
                Expect::SplitBrain(2),
            ),
            ("authority has no history but the other has", vec![], 0, vec![(1, 1, "a")], 3, Expect::SplitBrain(1)),
        ];
        for (name, authority, authority_last, other, other_last, expected) in rows {
            let got = compare(&history(&authority), authority_last, &history(&other), other_last);
            let ok = match (&expected, &got) {
                (Expect::Same, Divergence::Same) => true,
                (Expect::Behind(want), Divergence::Behind { resync_from }) => want == resync_from,
                (Expect::SplitBrain(want), Divergence::SplitBrain { epoch, .. }) => want == epoch,
                _ => false,
            };
            assert!(ok, "{name}: expected {expected:?}, got {got:?}");
        }
    }

    #[test]
    fn history_rejects_unsorted_entries() {
        let entries = |list: &[(u64, u64)]| {
            list.iter()
                .map(|&(epoch, start_seq)| EpochStart { epoch, start_seq, primary: "a".to_owned() })
                .collect::<Vec<_>>()
        };
        assert!(History::new(entries(&[(1, 1), (1, 5)])).is_err());
        assert!(History::new(entries(&[(2, 1), (1, 5)])).is_err());
        assert!(History::new(entries(&[(1, 5), (2, 3)])).is_err());
        let mut history = History::new(entries(&[(1, 1), (2, 5)])).unwrap();
        assert!(history.push(EpochStart { epoch: 2, start_seq: 9, primary: "b".to_owned() }).is_err());
        assert!(history.push(EpochStart { epoch: 3, start_seq: 4, primary: "b".to_owned() }).is_err());
        history.push(EpochStart { epoch: 3, start_seq: 5, primary: "b".to_owned() }).unwrap();
        assert_eq!(history.get(3).map(|entry| entry.primary.as_str()), Some("b"));
        assert_eq!(history.get(4), None);
    }
}
