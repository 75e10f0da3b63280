//! KEK rotation as status: from what the store's records hold now and what the status
//! said before, what it says next. Pure; the re-wrapping itself is
//! [`Pkcs11Store::rotate`](super::Pkcs11Store::rotate).

use crate::api::{KekRotationPhase, KekRotationStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::collections::{BTreeMap, BTreeSet};

/// The rotation status after observing `remaining`: how many data keys each key other
/// than `current` still wraps. `previous_active` is the key the status last named active,
/// `previous` the rotation it last showed.
///
/// - Data keys under other keys: a rotation to `current` is under way (continued when the
///   previous one already went there, started afresh otherwise).
/// - None: a rotation to `current` is complete, and every key it moved off is unused. A
///   new `current` that no data key was under yet completes at once.
/// - Nothing changed: the previous status stands, so a quiet store writes nothing.
pub fn plan(
    current: &str,
    previous_active: Option<&str>,
    previous: Option<&KekRotationStatus>,
    remaining: &BTreeMap<String, u64>,
    now: &Time,
) -> Option<KekRotationStatus> {
    let left: u64 = remaining.values().sum();
    let ongoing = previous.filter(|p| p.to == current && p.phase == KekRotationPhase::Rotating);
    if let Some(p) = ongoing {
        // Data keys that showed up under an old key meanwhile (written by a reconcile that
        // started before the switch) add to the total, so `rewrapped` never goes back.
        let was_left = p.total.saturating_sub(p.rewrapped);
        let total = p.total + left.saturating_sub(was_left);
        let from: BTreeSet<String> = p
            .from
            .iter()
            .cloned()
            .chain(remaining.keys().cloned())
            .filter(|l| l != current)
            .collect();
        return Some(if left > 0 {
            KekRotationStatus {
                from: from.into_iter().collect(),
                rewrapped: total - left,
                total,
                // Says what the step that observed this found; set by the caller.
                message: None,
                ..p.clone()
            }
        } else {
            KekRotationStatus {
                unused_keys: from.iter().cloned().collect(),
                from: from.into_iter().collect(),
                phase: KekRotationPhase::Complete,
                rewrapped: total,
                total,
                message: None,
                completed_at: Some(now.clone()),
                ..p.clone()
            }
        });
    }
    // Keys moved off: those still wrapping data keys, the key active until now, and the
    // keys of a rotation abandoned for this one.
    let abandoned = previous
        .filter(|p| p.phase == KekRotationPhase::Rotating)
        .map(|p| p.from.iter().chain([&p.to]).cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    let from: BTreeSet<String> = remaining
        .keys()
        .cloned()
        .chain(previous_active.map(str::to_owned))
        .chain(abandoned)
        .filter(|l| l != current)
        .collect();
    if from.is_empty() {
        return previous.cloned();
    }
    Some(KekRotationStatus {
        from: from.iter().cloned().collect(),
        to: current.to_owned(),
        phase: if left > 0 {
            KekRotationPhase::Rotating
        } else {
            KekRotationPhase::Complete
        },
        rewrapped: 0,
        total: left,
        unused_keys: if left > 0 {
            vec![]
        } else {
            from.into_iter().collect()
        },
        message: None,
        started_at: Some(now.clone()),
        completed_at: (left == 0).then(|| now.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::now;

    fn left(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(l, n)| (l.to_string(), *n)).collect()
    }

    #[test]
    fn a_quiet_store_keeps_its_status() {
        let t = now();
        assert_eq!(plan("a", None, None, &left(&[]), &t), None);
        assert_eq!(plan("a", Some("a"), None, &left(&[]), &t), None);
        let done = plan("b", Some("a"), None, &left(&[("a", 3)]), &t);
        let done = plan("b", Some("b"), done.as_ref(), &left(&[]), &t).unwrap();
        assert_eq!(done.phase, KekRotationPhase::Complete);
        assert_eq!(
            plan("b", Some("b"), Some(&done), &left(&[]), &now()),
            Some(done),
            "a completed rotation is not rewritten"
        );
    }

    #[test]
    fn a_new_label_starts_then_continues_then_completes() {
        let t = now();
        let started = plan("b", Some("a"), None, &left(&[("a", 200)]), &t).unwrap();
        assert_eq!(
            (
                started.from.clone(),
                started.to.as_str(),
                started.phase,
                started.rewrapped,
                started.total
            ),
            (
                vec!["a".to_owned()],
                "b",
                KekRotationPhase::Rotating,
                0,
                200
            )
        );
        assert!(started.unused_keys.is_empty());
        // Half-way, as seen after a restart: the records say where it is.
        let half = plan("b", Some("b"), Some(&started), &left(&[("a", 100)]), &t).unwrap();
        assert_eq!((half.rewrapped, half.total), (100, 200));
        assert_eq!(half.started_at, started.started_at);
        // A straggler written under the old key adds to the total; progress never goes back.
        let more = plan("b", Some("b"), Some(&half), &left(&[("a", 101)]), &t).unwrap();
        assert_eq!((more.rewrapped, more.total), (100, 201));
        let done = plan("b", Some("b"), Some(&more), &left(&[]), &t).unwrap();
        assert_eq!(done.phase, KekRotationPhase::Complete);
        assert_eq!((done.rewrapped, done.total), (201, 201));
        assert_eq!(done.unused_keys, vec!["a".to_owned()]);
        assert!(done.completed_at.is_some());
    }

    #[test]
    fn an_empty_store_completes_at_once() {
        let done = plan("b", Some("a"), None, &left(&[]), &now()).unwrap();
        assert_eq!(done.phase, KekRotationPhase::Complete);
        assert_eq!(done.unused_keys, vec!["a".to_owned()]);
        assert_eq!((done.rewrapped, done.total), (0, 0));
    }

    #[test]
    fn a_rotation_redirected_mid_way_moves_everything_to_the_last_label() {
        let t = now();
        let to_b = plan("b", Some("a"), None, &left(&[("a", 10)]), &t).unwrap();
        let to_b = plan("b", Some("b"), Some(&to_b), &left(&[("a", 6)]), &t).unwrap();
        // Now the spec says c: data keys are under a and b.
        let to_c = plan(
            "c",
            Some("b"),
            Some(&to_b),
            &left(&[("a", 6), ("b", 4)]),
            &t,
        )
        .unwrap();
        assert_eq!(to_c.from, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!((to_c.rewrapped, to_c.total), (0, 10));
        let done = plan("c", Some("c"), Some(&to_c), &left(&[]), &t).unwrap();
        assert_eq!(done.unused_keys, vec!["a".to_owned(), "b".to_owned()]);
        // Back to a, which still wraps 6 data keys: only b's 4 move, and only b ends unused.
        let back = plan("a", Some("b"), Some(&to_b), &left(&[("b", 4)]), &t).unwrap();
        assert_eq!(back.from, vec!["b".to_owned()]);
        assert_eq!((back.phase, back.total), (KekRotationPhase::Rotating, 4));
        let back = plan("a", Some("a"), Some(&back), &left(&[]), &t).unwrap();
        assert_eq!(back.phase, KekRotationPhase::Complete);
        assert_eq!(back.unused_keys, vec!["b".to_owned()]);
    }
}
