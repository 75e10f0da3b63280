//! Pure decisions of the ManagedSecret reconciler: which version a value is, which stores
//! must be written, whether the native Secret must change. No I/O, so every case is a
//! plain unit test.

use crate::api::{CreationPolicy, VersionRecord};
use crate::backend::VersionStamp;
use crate::crypto::Fingerprint;

/// What the value read for a ManagedSecret is, against its recorded history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionDecision {
    /// Same content as the newest recorded version: nothing new.
    Unchanged(u64),
    /// The source already holds this content stamped with a version the status lacks
    /// (written before a restart): record it, make no new one.
    Adopt(u64),
    /// New content: a new version.
    New(u64),
}

impl VersionDecision {
    pub fn version(self) -> u64 {
        match self {
            VersionDecision::Unchanged(v) | VersionDecision::Adopt(v) | VersionDecision::New(v) => {
                v
            }
        }
    }
}

/// Decides the version of content `fingerprint`, given the newest recorded version and the
/// stamp the source holds beside the value.
pub fn decide_version(
    latest: Option<&VersionRecord>,
    source: Option<&VersionStamp>,
    fingerprint: &Fingerprint,
) -> VersionDecision {
    let latest_version = latest.map_or(0, |r| r.version);
    if let Some(r) = latest
        && r.fingerprint == fingerprint.as_str()
    {
        return VersionDecision::Unchanged(r.version);
    }
    if let Some(s) = source
        && &s.fingerprint == fingerprint
        && s.version > latest_version
    {
        return VersionDecision::Adopt(s.version);
    }
    let source_version = source.map_or(0, |s| s.version);
    VersionDecision::New(latest_version.max(source_version) + 1)
}

/// What a store holds at a path, as observed.
#[derive(Debug, Clone)]
pub struct StoreObservation {
    /// The stamp written beside the current value, if any.
    pub stamp: Option<VersionStamp>,
    /// The fingerprint of the current value as read (not as stamped).
    pub content: Fingerprint,
}

/// What to do to a store so that it holds version `version` with content `fingerprint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreAction {
    InSync,
    /// Absent, behind, or unstamped: write the version.
    Write,
    /// Stamped with the right version but its content was changed by hand: write it back.
    RepairDrift,
}

pub fn store_action(
    observed: Option<&StoreObservation>,
    version: u64,
    fingerprint: &Fingerprint,
) -> StoreAction {
    let Some(obs) = observed else {
        return StoreAction::Write;
    };
    let stamped_version = obs.stamp.as_ref().map(|s| s.version);
    match (
        stamped_version == Some(version),
        &obs.content == fingerprint,
    ) {
        (true, true) => StoreAction::InSync,
        (true, false) => StoreAction::RepairDrift,
        (false, _) => StoreAction::Write,
    }
}

/// Appends `record` to the history, keeping the newest `keep` entries. Existing entries
/// are never rewritten.
pub fn record_version(history: &mut Vec<VersionRecord>, record: VersionRecord, keep: usize) {
    if history.iter().any(|r| r.version == record.version) {
        return;
    }
    history.push(record);
    history.sort_by_key(|r| r.version);
    let excess = history.len().saturating_sub(keep.max(1));
    history.drain(..excess);
}

/// What the native Secret looks like now, as far as the plan cares.
#[derive(Debug, Clone, Default)]
pub struct NativeObservation {
    pub exists: bool,
    /// Carries this ManagedSecret's label: keyhaven made it (or adopted it under Merge).
    pub managed_by_us: bool,
    pub type_: Option<String>,
    pub fingerprint: Option<String>,
    pub version: Option<u64>,
    /// The keys keyhaven renders are present with the rendered values.
    pub data_matches: bool,
    pub owned_by_us: bool,
}

/// What to do to the native Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NativeAction {
    Unchanged,
    Apply,
    /// It cannot be written; the message says why (nothing is changed).
    Refuse {
        reason: &'static str,
        message: String,
    },
}

pub fn native_action(
    observed: &NativeObservation,
    policy: CreationPolicy,
    name: &str,
    desired_type: &str,
    version: u64,
    fingerprint: &Fingerprint,
) -> NativeAction {
    if !observed.exists {
        return match policy {
            CreationPolicy::Merge => NativeAction::Refuse {
                reason: "TargetSecretMissing",
                message: format!(
                    "creationPolicy Merge needs an existing Secret {name}, and there is none"
                ),
            },
            _ => NativeAction::Apply,
        };
    }
    if policy != CreationPolicy::Merge && !observed.managed_by_us {
        return NativeAction::Refuse {
            reason: "TargetSecretExists",
            message: format!(
                "Secret {name} exists and is not managed by this ManagedSecret; use creationPolicy Merge to add keys to it"
            ),
        };
    }
    if policy != CreationPolicy::Merge
        && observed.type_.as_deref().unwrap_or("Opaque") != desired_type
    {
        return NativeAction::Refuse {
            reason: "TargetTypeConflict",
            message: format!(
                "Secret {name} has type {}, but this secret renders as {desired_type}; a Secret's type cannot change: delete it to let keyhaven recreate it",
                observed.type_.as_deref().unwrap_or("Opaque")
            ),
        };
    }
    let up_to_date = observed.data_matches
        && observed.managed_by_us
        && observed.version == Some(version)
        && observed.fingerprint.as_deref() == Some(fingerprint.as_str())
        && (policy != CreationPolicy::Owner || observed.owned_by_us);
    if up_to_date {
        NativeAction::Unchanged
    } else {
        NativeAction::Apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::now;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint::parse(&format!("hmac-sha256:{}", hex::encode([n; 32]))).unwrap()
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
        }
    }

    fn stamp(version: u64, f: &Fingerprint) -> VersionStamp {
        VersionStamp {
            version,
            fingerprint: f.clone(),
        }
    }

    #[test]
    fn first_value_is_version_one() {
        assert_eq!(decide_version(None, None, &fp(1)), VersionDecision::New(1));
    }

    #[test]
    fn unchanged_value_makes_no_version() {
        assert_eq!(
            decide_version(Some(&record(3, &fp(1))), Some(&stamp(3, &fp(1))), &fp(1)),
            VersionDecision::Unchanged(3)
        );
        assert_eq!(
            decide_version(Some(&record(3, &fp(1))), None, &fp(1)),
            VersionDecision::Unchanged(3)
        );
    }

    #[test]
    fn changed_value_makes_next_version() {
        assert_eq!(
            decide_version(Some(&record(3, &fp(1))), Some(&stamp(3, &fp(1))), &fp(2)),
            VersionDecision::New(4)
        );
        // Edited by hand in the source: the stale stamp does not match the content.
        assert_eq!(
            decide_version(Some(&record(3, &fp(1))), Some(&stamp(3, &fp(1))), &fp(9)),
            VersionDecision::New(4)
        );
    }

    #[test]
    fn restart_after_source_write_adopts_instead_of_duplicating() {
        // Version 4 reached the source, then the operator died before recording it.
        assert_eq!(
            decide_version(Some(&record(3, &fp(1))), Some(&stamp(4, &fp(2))), &fp(2)),
            VersionDecision::Adopt(4)
        );
        // Status lost entirely (e.g. the object was recreated): numbering continues.
        assert_eq!(
            decide_version(None, Some(&stamp(7, &fp(2))), &fp(2)),
            VersionDecision::Adopt(7)
        );
        assert_eq!(
            decide_version(None, Some(&stamp(7, &fp(2))), &fp(3)),
            VersionDecision::New(8)
        );
    }

    #[test]
    fn store_actions() {
        let obs = |v: Option<u64>, content: u8| StoreObservation {
            stamp: v.map(|v| stamp(v, &fp(1))),
            content: fp(content),
        };
        assert_eq!(store_action(None, 2, &fp(1)), StoreAction::Write);
        assert_eq!(
            store_action(Some(&obs(Some(2), 1)), 2, &fp(1)),
            StoreAction::InSync
        );
        assert_eq!(
            store_action(Some(&obs(Some(2), 5)), 2, &fp(1)),
            StoreAction::RepairDrift
        );
        assert_eq!(
            store_action(Some(&obs(Some(1), 1)), 2, &fp(1)),
            StoreAction::Write
        );
        assert_eq!(
            store_action(Some(&obs(None, 1)), 2, &fp(1)),
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
        assert_eq!(
            act(
                &NativeObservation {
                    data_matches: false,
                    ..ours.clone()
                },
                CreationPolicy::Owner
            ),
            NativeAction::Apply
        );
        assert_eq!(
            act(
                &NativeObservation {
                    version: Some(1),
                    ..ours.clone()
                },
                CreationPolicy::Owner
            ),
            NativeAction::Apply
        );
        assert_eq!(
            act(
                &NativeObservation {
                    owned_by_us: false,
                    ..ours.clone()
                },
                CreationPolicy::Owner
            ),
            NativeAction::Apply
        );
        assert_eq!(
            act(
                &NativeObservation {
                    owned_by_us: false,
                    ..ours.clone()
                },
                CreationPolicy::Orphan
            ),
            NativeAction::Unchanged
        );
        let foreign = NativeObservation {
            managed_by_us: false,
            ..ours.clone()
        };
        assert!(matches!(
            act(&foreign, CreationPolicy::Owner),
            NativeAction::Refuse {
                reason: "TargetSecretExists",
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
                reason: "TargetTypeConflict",
                ..
            }
        ));
    }
}
