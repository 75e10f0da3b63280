//! The single decisions of [`super::decide`], each tested alone.

use super::decide::*;
use crate::api::now;
use crate::api::{CreationPolicy, Reason, VersionRecord};
use crate::backend::{Owner, VersionStamp};
use crate::crypto::{ContentFingerprint, Fingerprint};
use std::time::Duration;

fn ts(s: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(s).unwrap()
}

#[test]
fn generation_and_rotation() {
    let none = RotationInput::default();
    assert_eq!(
        decide_generate(Stored::Absent, &none, ts(0)),
        GenerateDecision::Generate {
            reason: "generated".into()
        }
    );
    assert_eq!(
        decide_generate(Stored::Valid, &none, ts(0)),
        GenerateDecision::UseStored
    );
    let requested = RotationInput {
        requested: Some("now"),
        ..Default::default()
    };
    assert!(matches!(
        decide_generate(Stored::Valid, &requested, ts(0)),
        GenerateDecision::Generate { reason } if reason.contains("annotation")
    ));
    let handled = RotationInput {
        requested: Some("now"),
        handled: Some("now"),
        ..Default::default()
    };
    assert_eq!(
        decide_generate(Stored::Valid, &handled, ts(0)),
        GenerateDecision::UseStored
    );
    let scheduled = RotationInput {
        interval: Some(Duration::from_secs(3600)),
        latest_created: Some(ts(1000)),
        ..Default::default()
    };
    assert_eq!(next_rotation(&scheduled), Some(ts(4600)));
    assert_eq!(
        decide_generate(Stored::Valid, &scheduled, ts(4599)),
        GenerateDecision::UseStored
    );
    assert!(matches!(
        decide_generate(Stored::Valid, &scheduled, ts(4600)),
        GenerateDecision::Generate { reason } if reason.contains("interval")
    ));
    assert!(matches!(
        decide_generate(Stored::Invalid, &handled, ts(0)),
        GenerateDecision::Generate { reason } if reason.contains("does not fit")
    ));
    // No history yet: nothing is scheduled.
    let fresh = RotationInput {
        interval: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    assert_eq!(next_rotation(&fresh), None);
}

#[test]
fn rollback_reads_where_the_version_was_written() {
    let mut a = record(1, &fp(1));
    a.store = "old-source".into();
    let b = record(2, &fp(2));
    let history = vec![a, b];
    assert_eq!(
        rollback_source(&history, 1, "new-source"),
        ("old-source", Some(fp(1).as_str()))
    );
    assert_eq!(rollback_source(&history, 2, "new-source").0, "s");
    assert_eq!(
        rollback_source(&history, 9, "new-source"),
        ("new-source", None)
    );
}

#[test]
fn restarts_only_when_running_content_changes() {
    use RestartDecision::*;
    assert_eq!(restart_decision(false, true, Some(1), 2), Nothing);
    assert_eq!(restart_decision(true, false, None, 1), Record);
    assert_eq!(restart_decision(true, true, None, 3), Record);
    assert_eq!(restart_decision(true, true, Some(2), 2), Nothing);
    assert_eq!(restart_decision(true, true, Some(1), 2), Restart);
    // The native Secret was deleted and recreated: pods restart on their own terms.
    assert_eq!(restart_decision(true, false, Some(1), 2), Record);
}

#[test]
fn expiry_windows() {
    let day = Duration::from_secs(86400);
    assert_eq!(expiry(ts(100), ts(100), day), Expiry::Expired);
    assert_eq!(expiry(ts(100 + 3600), ts(100), day), Expiry::Expiring);
    assert_eq!(expiry(ts(100 + 2 * 86400), ts(100), day), Expiry::Valid);
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::parse(&format!("hmac-sha256-ns:{}", hex::encode([n; 32]))).unwrap()
}

fn content(n: u8) -> ContentFingerprint {
    ContentFingerprint::of(&fp(n))
}

fn record(version: u64, f: &Fingerprint) -> VersionRecord {
    VersionRecord {
        version,
        fingerprint: f.to_string(),
        store: "s".into(),
        created_at: now(),
        created_by: "keyhaven".into(),
        reason: None,
        store_version: None,
        moved_from: None,
    }
}

fn owner(namespace: &str, name: &str, uid: &str) -> Owner {
    Owner {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid.into(),
    }
}

fn stamp(version: u64, f: &Fingerprint) -> VersionStamp {
    VersionStamp {
        version,
        fingerprint: f.clone(),
        owner: None,
    }
}

#[test]
fn first_value_is_version_one() {
    assert_eq!(
        decide_version(None, None, &content(1)).0,
        VersionDecision::New(1)
    );
}

#[test]
fn unchanged_value_makes_no_version() {
    assert_eq!(
        decide_version(
            Some(&record(3, &fp(1))),
            Some(&stamp(3, &fp(1))),
            &content(1)
        )
        .0,
        VersionDecision::Unchanged(3)
    );
    assert_eq!(
        decide_version(Some(&record(3, &fp(1))), None, &content(1)).0,
        VersionDecision::Unchanged(3)
    );
}

#[test]
fn changed_value_makes_next_version() {
    assert_eq!(
        decide_version(
            Some(&record(3, &fp(1))),
            Some(&stamp(3, &fp(1))),
            &content(2)
        )
        .0,
        VersionDecision::New(4)
    );
    // Edited by hand in the source: the stale stamp does not match the content.
    assert_eq!(
        decide_version(
            Some(&record(3, &fp(1))),
            Some(&stamp(3, &fp(1))),
            &content(9)
        )
        .0,
        VersionDecision::New(4)
    );
}

#[test]
fn restart_after_source_write_adopts_instead_of_duplicating() {
    // Version 4 reached the source, then the operator died before recording it.
    assert_eq!(
        decide_version(
            Some(&record(3, &fp(1))),
            Some(&stamp(4, &fp(2))),
            &content(2)
        )
        .0,
        VersionDecision::Adopt(4)
    );
    // Status lost entirely (e.g. the object was recreated): numbering continues.
    assert_eq!(
        decide_version(None, Some(&stamp(7, &fp(2))), &content(2)).0,
        VersionDecision::Adopt(7)
    );
    assert_eq!(
        decide_version(None, Some(&stamp(7, &fp(2))), &content(3)).0,
        VersionDecision::New(8)
    );
}

#[test]
fn a_version_recorded_under_v1_stays_unchanged_and_a_new_one_is_namespaced() {
    let v1 = Fingerprint::parse(&format!("hmac-sha256:{}", hex::encode([1; 32]))).unwrap();
    let (decision, recorded) = decide_version(Some(&record(3, &v1)), None, &content(1));
    assert_eq!(decision, VersionDecision::Unchanged(3));
    assert_eq!(
        recorded, v1,
        "the version keeps the fingerprint it was recorded with"
    );
    let (decision, recorded) = decide_version(Some(&record(3, &v1)), None, &content(2));
    assert_eq!(decision, VersionDecision::New(4));
    assert_eq!(recorded, fp(2));
    assert!(recorded.as_str().starts_with("hmac-sha256-ns:"));
    // A target holding version 3 under its v1 stamp is in sync.
    let obs = StoreObservation {
        stamp: Some(stamp(3, &v1)),
        content: content(1),
    };
    assert_eq!(store_action(Some(&obs), 3, &v1, None), StoreAction::InSync);
}

#[test]
fn a_writer_claims_a_path_in_sync_that_records_no_owner_or_another() {
    let (me, gone) = (owner("a", "db", "u1"), owner("a", "db", "u0"));
    let obs = |owner: Option<Owner>| StoreObservation {
        stamp: Some(VersionStamp {
            owner,
            ..stamp(2, &fp(1))
        }),
        content: content(1),
    };
    let action = |o| store_action(Some(&obs(o)), 2, &fp(1), Some(&me));
    assert_eq!(action(None), StoreAction::Claim);
    assert_eq!(action(Some(gone.clone())), StoreAction::Claim);
    assert_eq!(action(Some(me.clone())), StoreAction::InSync);
    // A reader claims nothing.
    assert_eq!(
        store_action(Some(&obs(Some(gone))), 2, &fp(1), None),
        StoreAction::InSync
    );
}

#[test]
fn store_actions() {
    let obs = |v: Option<u64>, c: u8| StoreObservation {
        stamp: v.map(|v| stamp(v, &fp(1))),
        content: content(c),
    };
    assert_eq!(store_action(None, 2, &fp(1), None), StoreAction::Write);
    assert_eq!(
        store_action(Some(&obs(Some(2), 1)), 2, &fp(1), None),
        StoreAction::InSync
    );
    assert_eq!(
        store_action(Some(&obs(Some(2), 5)), 2, &fp(1), None),
        StoreAction::RepairDrift
    );
    assert_eq!(
        store_action(Some(&obs(Some(1), 1)), 2, &fp(1), None),
        StoreAction::Write
    );
    assert_eq!(
        store_action(Some(&obs(None, 1)), 2, &fp(1), None),
        StoreAction::Write
    );
}

#[test]
fn history_is_bounded_and_never_rewritten() {
    let mut h = vec![];
    for v in 1..=5 {
        record_version(&mut h, record(v, &fp(v as u8)), 3);
    }
    assert_eq!(
        h.iter().map(|r| r.version).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    record_version(&mut h, record(5, &fp(99)), 3);
    assert_eq!(h.last().unwrap().fingerprint, fp(5).to_string());
}

#[test]
fn native_secret_actions() {
    let ours = NativeObservation {
        exists: true,
        managed_by_us: true,
        type_: Some("Opaque".into()),
        fingerprint: Some(fp(1).to_string()),
        version: Some(2),
        data_matches: true,
        owned_by_us: true,
    };
    let act = |o: &NativeObservation, p| native_action(o, p, "s", "Opaque", 2, &fp(1));
    assert_eq!(act(&ours, CreationPolicy::Owner), NativeAction::Unchanged);
    assert_eq!(
        act(&NativeObservation::default(), CreationPolicy::Owner),
        NativeAction::Apply
    );
    assert!(matches!(
        act(&NativeObservation::default(), CreationPolicy::Merge),
        NativeAction::Refuse { .. }
    ));
    // One field differs from an up-to-date Secret: what happens under each policy.
    let differing = [
        (
            NativeObservation {
                data_matches: false,
                ..ours.clone()
            },
            CreationPolicy::Owner,
            NativeAction::Apply,
        ),
        (
            NativeObservation {
                version: Some(1),
                ..ours.clone()
            },
            CreationPolicy::Owner,
            NativeAction::Apply,
        ),
        (
            NativeObservation {
                owned_by_us: false,
                ..ours.clone()
            },
            CreationPolicy::Owner,
            NativeAction::Apply,
        ),
        (
            NativeObservation {
                owned_by_us: false,
                ..ours.clone()
            },
            CreationPolicy::Orphan,
            NativeAction::Unchanged,
        ),
    ];
    for (observed, policy, expected) in &differing {
        assert_eq!(
            &act(observed, *policy),
            expected,
            "{observed:?} under {policy:?}"
        );
    }
    let foreign = NativeObservation {
        managed_by_us: false,
        ..ours.clone()
    };
    assert!(matches!(
        act(&foreign, CreationPolicy::Owner),
        NativeAction::Refuse {
            reason: Reason::TargetSecretExists,
            ..
        }
    ));
    assert_eq!(act(&foreign, CreationPolicy::Merge), NativeAction::Apply);
    let tls = NativeObservation {
        type_: Some("kubernetes.io/tls".into()),
        ..ours
    };
    assert!(matches!(
        act(&tls, CreationPolicy::Owner),
        NativeAction::Refuse {
            reason: Reason::TargetTypeConflict,
            ..
        }
    ));
}

#[test]
fn versions_a_restart_left_unrecorded_are_found_between_the_history_and_the_decision() {
    let (me, other) = (owner("n", "a", "u1"), owner("n", "a", "u2"));
    let mine = |v: u64| VersionStamp {
        owner: Some(me.clone()),
        ..stamp(v, &fp(v as u8))
    };
    let history = vec![record(2, &fp(2)), record(3, &fp(3))];
    // Version 4 written, the status write lost to a SIGKILL, then new content: 5.
    let held = vec![mine(4)];
    let found: Vec<u64> = unrecorded(&history, &held, Some(&me), 5)
        .iter()
        .map(|s| s.version)
        .collect();
    assert_eq!(found, [4]);
    // Two lost in a row, read back from the source; the decided version is not among them.
    let held = vec![mine(6), mine(4), mine(5)];
    let found: Vec<u64> = unrecorded(&history, &held, Some(&me), 6)
        .iter()
        .map(|s| s.version)
        .collect();
    assert_eq!(found, [4, 5], "ascending, the adopted or new one excluded");
    // Another owner's versions, unstamped ones, recorded ones and older ones are not ours.
    let foreign = VersionStamp {
        owner: Some(other),
        ..stamp(4, &fp(4))
    };
    assert!(unrecorded(&history, &[foreign], Some(&me), 5).is_empty());
    assert!(unrecorded(&history, &[stamp(4, &fp(4))], Some(&me), 5).is_empty());
    assert!(unrecorded(&history, &[mine(3), mine(1)], Some(&me), 5).is_empty());
    // A reader takes no ownership and records nothing it did not write.
    assert!(unrecorded(&history, &[mine(4)], None, 5).is_empty());
    // No history yet: the first version's record was lost.
    let found: Vec<u64> = unrecorded(&[], &[mine(1)], Some(&me), 2)
        .iter()
        .map(|s| s.version)
        .collect();
    assert_eq!(found, [1]);
}
