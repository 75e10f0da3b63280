//! The ManagedSecret reconciler's single decisions: which version a value is, which stores
//! must be written, whether the native Secret must change, whether to generate, roll back
//! or restart. No I/O, so every case is a plain unit test; [`super::plan`] puts them
//! together.

use crate::api::{CreationPolicy, Reason, VersionRecord};
use crate::backend::{Owner, VersionStamp};
use crate::crypto::{ContentFingerprint, Fingerprint};

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

/// Decides the version of `content`, given the newest recorded version and the stamp the
/// source holds beside the value, and the fingerprint the version is recorded with: the
/// recorded one of an unchanged or adopted version (whatever its scheme), the current
/// scheme's for a new one.
pub fn decide_version(
    latest: Option<&VersionRecord>,
    source: Option<&VersionStamp>,
    content: &ContentFingerprint,
) -> (VersionDecision, Fingerprint) {
    let latest_version = latest.map_or(0, |r| r.version);
    if let Some(r) = latest
        && content.matches(&r.fingerprint)
        && let Some(recorded) = Fingerprint::parse(&r.fingerprint)
    {
        return (VersionDecision::Unchanged(r.version), recorded);
    }
    if let Some(s) = source
        && content.matches(s.fingerprint.as_str())
        && s.version > latest_version
    {
        return (VersionDecision::Adopt(s.version), s.fingerprint.clone());
    }
    let source_version = source.map_or(0, |s| s.version);
    // A stamp at u64::MAX (written by hand) cannot be followed: the plan refuses it.
    (
        VersionDecision::New(latest_version.max(source_version).saturating_add(1)),
        content.current().clone(),
    )
}

/// What a store holds at a path, as observed.
#[derive(Debug, Clone)]
pub struct StoreObservation {
    /// The stamp written beside the current value, if any.
    pub stamp: Option<VersionStamp>,
    /// The fingerprints of the current value as read (not as stamped).
    pub content: ContentFingerprint,
}

/// What to do to a store so that it holds version `version` with content `fingerprint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreAction {
    InSync,
    /// Absent, behind, or unstamped: write the version.
    Write,
    /// Stamped with the right version but its content was changed by hand: write it back.
    RepairDrift,
    /// In sync, but the store does not record this ManagedSecret as the path's owner
    /// (written before owners were recorded, or by an owner that is gone): write the stamp.
    Claim,
}

/// What to do to a store; `owner` is the owner the sync's stamp records (None for a reader,
/// which takes no ownership).
pub fn store_action(
    observed: Option<&StoreObservation>,
    version: u64,
    fingerprint: &Fingerprint,
    owner: Option<&Owner>,
) -> StoreAction {
    let Some(obs) = observed else {
        return StoreAction::Write;
    };
    let stamped_version = obs.stamp.as_ref().map(|s| s.version);
    match (
        stamped_version == Some(version),
        obs.content.matches(fingerprint.as_str()),
    ) {
        (true, true) => {
            let recorded = obs.stamp.as_ref().and_then(|s| s.owner.as_ref());
            match owner {
                Some(me) if recorded.is_none_or(|o| o.uid != me.uid) => StoreAction::Claim,
                _ => StoreAction::InSync,
            }
        }
        (true, false) => StoreAction::RepairDrift,
        (false, _) => StoreAction::Write,
    }
}

/// The versions the source holds that this ManagedSecret wrote (its `owner` stamp) and its
/// history lacks, below `decided` and above the newest recorded one: written before a
/// restart that came ahead of the status write, then superseded by newer content. The
/// fault suite found such gaps after SIGKILLs ("history goes from version 3 to 5").
pub fn unrecorded<'a>(
    history: &[VersionRecord],
    held: &'a [VersionStamp],
    me: Option<&Owner>,
    decided: u64,
) -> Vec<&'a VersionStamp> {
    let latest = history.last().map_or(0, |r| r.version);
    let Some(me) = me else {
        return vec![];
    };
    let mut out: Vec<&VersionStamp> = held
        .iter()
        .filter(|s| s.version > latest && s.version < decided)
        .filter(|s| s.owner.as_ref().is_some_and(|o| o.uid == me.uid))
        .filter(|s| !history.iter().any(|r| r.version == s.version))
        .collect();
    out.sort_by_key(|s| s.version);
    out.dedup_by_key(|s| s.version);
    out
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
        reason: Reason,
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
                reason: Reason::TargetSecretMissing,
                message: format!(
                    "creationPolicy Merge needs an existing Secret {name}, and there is none"
                ),
            },
            _ => NativeAction::Apply,
        };
    }
    if policy != CreationPolicy::Merge && !observed.managed_by_us {
        return NativeAction::Refuse {
            reason: Reason::TargetSecretExists,
            message: format!(
                "Secret {name} exists and is not managed by this ManagedSecret; use creationPolicy Merge to add keys to it"
            ),
        };
    }
    if policy != CreationPolicy::Merge
        && observed.type_.as_deref().unwrap_or("Opaque") != desired_type
    {
        return NativeAction::Refuse {
            reason: Reason::TargetTypeConflict,
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

/// The reason recorded with a version a scheduled rotation makes.
pub const SCHEDULED_ROTATION: &str = "rotated (rotation.interval)";

/// Whether a generated secret keeps the value its source store holds or gets a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenerateDecision {
    /// The source holds a value and no rotation is due: keep it.
    UseStored,
    /// Generate a new value; the reason is recorded with the version.
    Generate { reason: String },
}

/// What rotation looks at.
#[derive(Debug, Clone, Default)]
pub struct RotationInput<'a> {
    /// `rotation.interval`, parsed.
    pub interval: Option<std::time::Duration>,
    /// When the newest recorded version was made.
    pub latest_created: Option<jiff::Timestamp>,
    /// The `keyhaven.io/rotate` annotation's value.
    pub requested: Option<&'a str>,
    /// The annotation value already acted on (`status.rotateRequest`).
    pub handled: Option<&'a str>,
}

/// When the next scheduled rotation is due, if any.
pub fn next_rotation(rotation: &RotationInput<'_>) -> Option<jiff::Timestamp> {
    let interval = jiff::SignedDuration::try_from(rotation.interval?).ok()?;
    rotation.latest_created?.checked_add(interval).ok()
}

/// What the source store holds for a generated secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Absent,
    /// A value that fits the type (and the spec's declared length).
    Valid,
    /// A value that does not (the type changed, or it was edited by hand).
    Invalid,
}

/// Decides whether to generate: when the source holds nothing or a value that does not fit,
/// when the rotate annotation has a value not yet acted on, or when the newest version is
/// older than the interval.
pub fn decide_generate(
    stored: Stored,
    rotation: &RotationInput<'_>,
    now: jiff::Timestamp,
) -> GenerateDecision {
    match stored {
        Stored::Absent => {
            return GenerateDecision::Generate {
                reason: "generated".into(),
            };
        }
        Stored::Invalid => {
            return GenerateDecision::Generate {
                reason: "regenerated: the stored value does not fit the type".into(),
            };
        }
        Stored::Valid => {}
    }
    if let Some(requested) = rotation.requested
        && rotation.handled != Some(requested)
    {
        return GenerateDecision::Generate {
            reason: "rotated (keyhaven.io/rotate annotation)".into(),
        };
    }
    if next_rotation(rotation).is_some_and(|due| due <= now) {
        return GenerateDecision::Generate {
            reason: SCHEDULED_ROTATION.into(),
        };
    }
    GenerateDecision::UseStored
}

/// Where version `n` is read from for a rollback: the store it was recorded in (the
/// current source when the history no longer lists it) and its recorded fingerprint.
pub fn rollback_source<'a>(
    history: &'a [VersionRecord],
    n: u64,
    current_source: &'a str,
) -> (&'a str, Option<&'a str>) {
    match history.iter().find(|r| r.version == n) {
        Some(r) => (r.store.as_str(), Some(r.fingerprint.as_str())),
        None => (current_source, None),
    }
}

/// What to do about rolloutRestartTargets after the native Secret was brought to `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    Nothing,
    /// Remember `version` as restarted-for without restarting (first sight: the workloads
    /// start with this content anyway).
    Record,
    /// The content the workloads run with changed: restart them, then record.
    Restart,
}

/// `native_existed`: the native Secret existed before this reconcile; `restarted`: the
/// version the workloads were last restarted (or first seen) for.
pub fn restart_decision(
    has_targets: bool,
    native_existed: bool,
    restarted: Option<u64>,
    version: u64,
) -> RestartDecision {
    if !has_targets {
        return RestartDecision::Nothing;
    }
    match restarted {
        Some(r) if r == version => RestartDecision::Nothing,
        Some(_) if native_existed => RestartDecision::Restart,
        _ => RestartDecision::Record,
    }
}

/// Where an expiring value stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Valid,
    /// Within the warning window.
    Expiring,
    Expired,
}

pub fn expiry(
    expires_at: jiff::Timestamp,
    now: jiff::Timestamp,
    window: std::time::Duration,
) -> Expiry {
    let window = jiff::SignedDuration::try_from(window).unwrap_or(jiff::SignedDuration::MAX);
    if expires_at <= now {
        Expiry::Expired
    } else if now
        .checked_add(window)
        .map_or(true, |limit| expires_at <= limit)
    {
        Expiry::Expiring
    } else {
        Expiry::Valid
    }
}
