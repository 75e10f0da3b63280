//! Retention and quotas (pure): which versions of a secret the stores keep after a new
//! one, which to remove, and whether a new version is within the profile's quota.
//!
//! What the stores keep is recorded as a window `oldest..=newest` plus a few older
//! `pinned` versions (the current one or `rollbackTo`'s, when older than the window), so
//! that deciding needs no listing of any store.

use super::records::list;
use crate::api::{MAX_PINNED, RetentionStatus, VersionQuota, VersionRate};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// The most versions removed in one sync (a secret from before retention catches up over
/// several).
pub const MAX_PRUNE: usize = 500;

/// Versions to remove from every store, and what is kept once they are.
#[derive(Debug, Clone, PartialEq)]
pub struct Prune {
    pub versions: Vec<u64>,
    pub stores: Vec<String>,
    pub after: RetentionStatus,
}

/// What the stores keep now (a secret from before retention: every version from 1).
pub fn kept(status: Option<&RetentionStatus>) -> RetentionStatus {
    status.cloned().unwrap_or(RetentionStatus {
        oldest: 1,
        pinned: vec![],
        kept: String::new(),
        pruned: 0,
    })
}

/// `kept` described for the status.
pub fn describe(state: &RetentionStatus, newest: u64) -> String {
    let mut versions: Vec<u64> = state.pinned.clone();
    let window = match state.oldest.min(newest) {
        o if o == newest => newest.to_string(),
        o => format!("{o}-{newest}"),
    };
    versions.sort_unstable();
    let pinned = list(&versions);
    match pinned.is_empty() {
        true => window,
        false => format!("{pinned}, {window}"),
    }
}

/// The state after removing what `keep` leaves out of `state` once `newest` exists; the
/// versions removed (at most [`MAX_PRUNE`]). `pins` are never removed.
pub fn decide(
    keep: u32,
    newest: u64,
    pins: &[u64],
    state: &RetentionStatus,
) -> (Vec<u64>, RetentionStatus) {
    let start = newest.saturating_sub(u64::from(keep.max(1)) - 1).max(1);
    let pinned = |v: u64| pins.contains(&v);
    // Kept now and older than the window: the pinned ones, then the old window's start.
    let mut old: Vec<u64> = state
        .pinned
        .iter()
        .copied()
        .filter(|v| *v < start)
        .collect();
    let mut v = state.oldest.max(1);
    while v < start && old.len() < MAX_PRUNE + MAX_PINNED {
        if !old.contains(&v) {
            old.push(v);
        }
        v += 1;
    }
    old.sort_unstable();
    let mut removed: Vec<u64> = old.iter().copied().filter(|v| !pinned(*v)).collect();
    removed.truncate(MAX_PRUNE);
    // The window starts where removal stopped (all of it removed: at `start`).
    let capped = v < start || removed.len() == MAX_PRUNE;
    let window = match (capped, removed.last()) {
        (true, Some(last)) => (last + 1).min(start),
        _ => start,
    };
    let mut kept_pins: Vec<u64> = old
        .iter()
        .copied()
        .filter(|v| *v < window && !removed.contains(v))
        .collect();
    kept_pins.truncate(MAX_PINNED);
    let mut after = RetentionStatus {
        oldest: window.max(state.oldest.min(window)),
        pinned: kept_pins,
        kept: String::new(),
        pruned: state.pruned + removed.len() as u64,
    };
    after.kept = describe(&after, newest);
    (removed, after)
}

/// How many versions the stores keep.
pub fn count(state: &RetentionStatus, newest: u64) -> u64 {
    let window = newest.saturating_sub(state.oldest.max(1)) + 1;
    window.min(newest) + state.pinned.len() as u64
}

/// Why a new version `newest` (made `now`) is refused by `quota`, if it is.
pub fn over_quota(
    quota: Option<&VersionQuota>,
    (keep, pins, state): (u32, &[u64], &RetentionStatus),
    newest: u64,
    rate: Option<&VersionRate>,
    now: jiff::Timestamp,
) -> Option<String> {
    let quota = quota?;
    if let Some(limit) = quota.versions {
        let (_, after) = decide(keep, newest, pins, state);
        let kept = count(&after, newest);
        if kept > u64::from(limit) {
            return Some(format!(
                "quota.versions: version {newest} would make {kept} versions kept, above the profile's limit of {limit}"
            ));
        }
    }
    if let Some(limit) = quota.versions_per_hour
        && let Some(rate) = rate.filter(|r| in_hour(r, now))
        && rate.versions >= limit
    {
        let until = rate.since.0 + jiff::SignedDuration::from_hours(1);
        return Some(format!(
            "quota.versionsPerHour: {} new versions since {}, the profile's limit is {limit} per hour; the next is allowed after {until}",
            rate.versions, rate.since.0
        ));
    }
    None
}

fn in_hour(rate: &VersionRate, now: jiff::Timestamp) -> bool {
    now < rate.since.0 + jiff::SignedDuration::from_hours(1)
}

/// The rate after a new version made `now`.
pub fn counted(rate: Option<&VersionRate>, now: jiff::Timestamp) -> VersionRate {
    match rate.filter(|r| in_hour(r, now)) {
        Some(r) => VersionRate {
            since: r.since.clone(),
            versions: r.versions.saturating_add(1),
        },
        None => VersionRate {
            since: Time(now),
            versions: 1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(oldest: u64, pinned: &[u64]) -> RetentionStatus {
        RetentionStatus {
            oldest,
            pinned: pinned.to_vec(),
            kept: String::new(),
            pruned: 0,
        }
    }

    #[test]
    fn a_new_version_beyond_the_window_removes_the_oldest() {
        let (removed, after) = decide(20, 21, &[21], &state(1, &[]));
        assert_eq!(removed, vec![1]);
        assert_eq!(
            (after.oldest, after.kept.as_str(), after.pruned),
            (2, "2-21", 1)
        );
        assert_eq!(count(&after, 21), 20);
        // Within the window: nothing.
        let (removed, after) = decide(20, 5, &[5], &state(1, &[]));
        assert!(removed.is_empty());
        assert_eq!((after.oldest, after.kept.as_str()), (1, "1-5"));
    }

    #[test]
    fn pinned_versions_stay_and_are_removed_once_unpinned() {
        // rollbackTo 3 while version 30 is made: 3 stays.
        let (removed, after) = decide(20, 30, &[30, 3], &state(1, &[]));
        assert_eq!(removed, vec![1, 2, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(after.pinned, vec![3]);
        assert_eq!(after.kept, "3, 11-30");
        assert_eq!(count(&after, 30), 21);
        // rollbackTo cleared: 3 goes with the next version.
        let (removed, after) = decide(20, 31, &[31], &after);
        assert_eq!(removed, vec![3, 11]);
        assert!(after.pinned.is_empty());
        assert_eq!((after.oldest, after.kept.as_str()), (12, "12-31"));
    }

    #[test]
    fn a_long_history_is_removed_in_bounded_steps() {
        let (removed, after) = decide(20, 5000, &[5000], &state(1, &[]));
        assert_eq!(removed.len(), MAX_PRUNE);
        assert_eq!(after.oldest, MAX_PRUNE as u64 + 1);
        let (removed, after) = decide(20, 5000, &[5000], &after);
        assert_eq!(removed.first(), Some(&(MAX_PRUNE as u64 + 1)));
        assert_eq!(after.oldest, 2 * MAX_PRUNE as u64 + 1);
    }

    #[test]
    fn quotas_refuse_beyond_their_limits() {
        let now = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let quota = VersionQuota {
            versions: Some(5),
            versions_per_hour: Some(3),
        };
        let s = state(1, &[]);
        assert!(over_quota(Some(&quota), (20, &[5], &s), 5, None, now).is_none());
        let refused = over_quota(Some(&quota), (20, &[6], &s), 6, None, now).unwrap();
        assert!(refused.contains("quota.versions"), "{refused}");
        // With retention at 5 the sixth version is kept within the limit.
        assert!(over_quota(Some(&quota), (5, &[6], &s), 6, None, now).is_none());
        let mut rate = counted(None, now);
        rate = counted(Some(&rate), now + jiff::SignedDuration::from_mins(1));
        rate = counted(Some(&rate), now + jiff::SignedDuration::from_mins(2));
        assert_eq!(rate.versions, 3);
        let later = now + jiff::SignedDuration::from_mins(3);
        let refused = over_quota(Some(&quota), (5, &[2], &s), 2, Some(&rate), later).unwrap();
        assert!(refused.contains("versionsPerHour"), "{refused}");
        let next_hour = now + jiff::SignedDuration::from_mins(61);
        assert!(over_quota(Some(&quota), (5, &[2], &s), 2, Some(&rate), next_hour).is_none());
        assert_eq!(counted(Some(&rate), next_hour).versions, 1);
        assert!(over_quota(None, (5, &[2], &s), 2, Some(&rate), later).is_none());
    }
}
