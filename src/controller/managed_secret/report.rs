//! After a sync is carried out: the status it leaves, the Events that say what it did, and
//! when to look again. Pure functions of the plan and of what each step returned.

use super::decide::{
    Expiry, RestartDecision, StoreAction, VersionDecision, expiry, record_version,
};
use super::durations::{expiry_warning, refresh_interval, scaled};
use super::plan::{SyncPlan, TargetStep};
use crate::api::{
    ConditionType, ManagedSecret, ManagedSecretPhase, ManagedSecretStatus, Reason, SecretType,
    TargetRole, TargetState, TargetStatus, condition, find_condition, remove_condition,
    set_condition,
};
use crate::controller::events::Note;
use crate::error::Error;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::EventType;
use std::time::Duration;

/// How soon a failed sync target or migration step is tried again.
const RETRY_SOON: Duration = Duration::from_secs(15);

/// What carrying out a [`SyncPlan`] returned, step by step.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The source's own version number of the value (written now, or as it was).
    pub source_version: Option<u64>,
    /// Each sync target's write, in the plan's order; an error is reported, not raised.
    pub targets: Vec<Result<(), Error>>,
    pub native_written: bool,
    /// Workloads restarted (`Kind/name`), those that do not exist, and those the operator's
    /// RBAC forbids it to patch (403).
    pub restarted: Vec<String>,
    pub missing_workloads: Vec<String>,
    pub forbidden_workloads: Vec<String>,
    /// Each store's removal of the versions retention prunes (the error's message).
    pub pruned: Vec<Pruned>,
}

/// One store's part of a prune.
#[derive(Debug)]
pub struct Pruned {
    pub store: String,
    pub result: Result<Vec<u64>, String>,
}

fn note(type_: EventType, reason: Reason, text: impl Into<String>) -> Note {
    match type_ {
        EventType::Normal => Note::normal(reason, text),
        EventType::Warning => Note::warning(reason, text),
    }
}

/// What a carried-out sync leaves.
#[derive(Debug)]
pub struct Report {
    pub status: ManagedSecretStatus,
    pub notes: Vec<Note>,
    /// Some store failed: check the stores' health now.
    pub check_stores: bool,
    pub requeue: Duration,
}

/// The status, Events and next wake-up of a sync of `ms` carried out as `outcome` says.
pub fn report(ms: &ManagedSecret, plan: &SyncPlan, outcome: &Outcome) -> Report {
    let version = plan.decision.version();
    let mut notes = vec![];
    let mut targets = vec![source_status(plan)];
    for (step, result) in plan.targets.iter().zip(&outcome.targets) {
        let (status, drift) = target_status(plan, step, result);
        notes.extend(drift);
        targets.push(status);
    }
    let failed: Vec<&TargetStatus> = targets.iter().filter(|t| failed(t)).collect();
    let mut status = plan.base.clone();
    for record in &plan.unrecorded {
        record_version(&mut status.versions, record.clone(), plan.history_keep);
    }
    if let Some(record) = &plan.record {
        let mut record = record.clone();
        record.store_version = outcome.source_version;
        record_version(&mut status.versions, record, plan.history_keep);
    }
    status.current_version = Some(version);
    status.version_rate = plan.version_rate.clone();
    status.retention = Some(match &plan.prune {
        Some(prune) if outcome.pruned.iter().all(|p| p.result.is_ok()) => prune.after.clone(),
        _ => plan.retention.clone(),
    });
    for p in &outcome.pruned {
        if let Err(e) = &p.result {
            notes.push(Note::warning(
                Reason::StoreError,
                format!(
                    "retention: removing old versions from store {}: {e}",
                    p.store
                ),
            ));
        }
    }
    status.expires_at = plan.expires_at.map(Time);
    if plan.rotate_request.is_some() {
        status.rotate_request = plan.rotate_request.clone();
    }
    if plan.restart != RestartDecision::Nothing {
        status.restarted_version = Some(version);
    }
    match expiring_condition(ms, plan.expires_at, plan.now) {
        Some(c) => set_condition(&mut status.conditions, c),
        None => remove_condition(&mut status.conditions, ConditionType::Expiring),
    }
    status.secret_name = Some(plan.native.name.clone());
    status.profile = Some(plan.profile.clone());
    status.source = Some(plan.source_descriptor.clone());
    super::gates::record_approval(&mut status, plan.approval.as_ref(), ms.metadata.generation);
    super::gates::record_compliance(
        &mut status,
        plan.compliance.as_ref(),
        ms.metadata.generation,
    );
    notes.extend(plan.approval_notes.iter().cloned());
    status.observed_generation = ms.metadata.generation;
    status.phase = Some(if failed.is_empty() {
        ManagedSecretPhase::Synced
    } else {
        ManagedSecretPhase::Degraded
    });
    let generation = ms.metadata.generation;
    set_condition(
        &mut status.conditions,
        condition(
            ConditionType::Ready,
            true,
            Reason::SecretSynced,
            format!(
                "Secret {} holds version {version} (VaultProfile {}, by {})",
                plan.native.name,
                plan.profile,
                plan.via.as_str()
            ),
            generation,
        ),
    );
    let synced = if failed.is_empty() {
        condition(
            ConditionType::Synced,
            true,
            Reason::AllStoresSynced,
            format!("every store holds version {version}"),
            generation,
        )
    } else {
        let names: Vec<&str> = failed.iter().map(|t| t.store.as_str()).collect();
        condition(
            ConditionType::Synced,
            false,
            Reason::TargetSyncFailed,
            format!("stores not at version {version}: {}", names.join(", ")),
            generation,
        )
    };
    set_condition(&mut status.conditions, synced);
    notes.extend(sync_notes(plan, outcome, &status));
    for t in &failed {
        let text = format!(
            "store {}: {}",
            t.store,
            t.message.as_deref().unwrap_or("not synced")
        );
        notes.push(note(EventType::Warning, Reason::TargetSyncFailed, text));
    }
    let retry = !failed.is_empty() || plan.migration_failed;
    let requeue = if retry {
        RETRY_SOON
    } else {
        wake_after(ms, plan)
    };
    status.targets = targets;
    Report {
        status,
        notes,
        check_stores: retry,
        requeue,
    }
}

/// The Events of what the sync did: the version recorded and, when it was written too, the
/// Secret that holds it (one Event); restarts; an expiry that began.
fn sync_notes(plan: &SyncPlan, outcome: &Outcome, status: &ManagedSecretStatus) -> Vec<Note> {
    let version = plan.decision.version();
    let mut notes = vec![];
    let holds = if outcome.native_written {
        format!("; Secret {} holds it", plan.native.name)
    } else {
        String::new()
    };
    match plan.decision {
        VersionDecision::New(v) => notes.push(note(
            EventType::Normal,
            Reason::VersionCreated,
            format!("version {v} recorded ({}){holds}", short(plan)),
        )),
        VersionDecision::Adopt(v) => notes.push(note(
            EventType::Normal,
            Reason::VersionRecorded,
            format!("version {v}, written before a restart, recorded{holds}"),
        )),
        VersionDecision::Unchanged(_) if outcome.native_written => notes.push(note(
            EventType::Normal,
            Reason::SecretSynced,
            format!("Secret {} holds version {version}", plan.native.name),
        )),
        VersionDecision::Unchanged(_) => {}
    }
    if !outcome.restarted.is_empty() {
        notes.push(note(
            EventType::Normal,
            Reason::RolloutRestarted,
            format!(
                "restarted {} for version {version}",
                outcome.restarted.join(", ")
            ),
        ));
    }
    for w in &outcome.missing_workloads {
        notes.push(note(
            EventType::Warning,
            Reason::RolloutTargetNotFound,
            format!("rolloutRestartTargets: {w} does not exist"),
        ));
    }
    for w in &outcome.forbidden_workloads {
        notes.push(note(
            EventType::Warning,
            Reason::RolloutRestartForbidden,
            format!(
                "rolloutRestartTargets: {w} not restarted for version {version}: RBAC forbids the operator to patch it (grant it patch on that kind in this namespace)"
            ),
        ));
    }
    if let Some(c) = find_condition(&status.conditions, ConditionType::Expiring)
        && c.status == "True"
    {
        let before = find_condition(&plan.base.conditions, ConditionType::Expiring);
        if before.is_none_or(|b| b.status != "True" || b.reason != c.reason) {
            let reason = if c.reason == Reason::Expired.as_str() {
                Reason::Expired
            } else {
                Reason::ExpiresSoon
            };
            notes.push(note(EventType::Warning, reason, c.message.clone()));
        }
    }
    notes
}

/// "fingerprint 1a2b…, store s" of the version recorded.
fn short(plan: &SyncPlan) -> String {
    plan.record.as_ref().map_or_else(String::new, |r| {
        let fp = crate::crypto::Fingerprint::digest(&r.fingerprint);
        format!(
            "fingerprint {}…, store {}",
            &fp[..fp.len().min(12)],
            r.store
        )
    })
}

/// Whether a store failed to take the current version.
fn failed(t: &TargetStatus) -> bool {
    t.state == TargetState::Error
}

fn source_status(plan: &SyncPlan) -> TargetStatus {
    let version = plan.decision.version();
    let source = &plan.source;
    match &source.kept_in {
        None => TargetStatus {
            store: source.store.clone(),
            role: TargetRole::Source,
            version: Some(version),
            state: TargetState::Synced,
            synced_at: synced_at(plan, &source.store, source.write),
            message: None,
        },
        Some(previous) => TargetStatus {
            store: source.store.clone(),
            role: TargetRole::Source,
            version: None,
            state: TargetState::Pending,
            synced_at: None,
            message: Some(format!(
                "version {version} stays in store {previous} (written before the source changed); the next version is written here, or migrateFrom: {previous} moves them"
            )),
        },
    }
}

/// A sync target's status after its step, and the Event of a drift repaired.
fn target_status(
    plan: &SyncPlan,
    step: &TargetStep,
    result: &Result<(), Error>,
) -> (TargetStatus, Option<Note>) {
    let store = step.store();
    let version = plan.stamp.version;
    let failure = match (step, result) {
        (TargetStep::Unreadable { error, .. }, _) => Some(error.to_string()),
        (_, Err(e)) => Some(e.to_string()),
        _ => None,
    };
    if let Some(message) = failure {
        let previous = plan.base.targets.iter().find(|t| t.store == store);
        let status = TargetStatus {
            store: store.to_owned(),
            role: TargetRole::SyncTarget,
            version: previous.and_then(|t| t.version),
            state: TargetState::Error,
            synced_at: previous.and_then(|t| t.synced_at.clone()),
            message: Some(message),
        };
        return (status, None);
    }
    let written = matches!(step, TargetStep::Write { .. });
    let drift = matches!(
        step,
        TargetStep::Write {
            action: StoreAction::RepairDrift,
            ..
        }
    )
    .then(|| {
        let path_note = format!(
            "store {store} held content other than version {version} at {}: rewritten",
            plan.path
        );
        note(EventType::Warning, Reason::DriftRepaired, path_note)
    });
    let status = TargetStatus {
        store: store.to_owned(),
        role: TargetRole::SyncTarget,
        version: Some(version),
        state: TargetState::Synced,
        synced_at: synced_at(plan, store, written),
        message: None,
    };
    (status, drift)
}

/// `syncedAt` moves only when a store was written, so an idle resync changes no status.
fn synced_at(plan: &SyncPlan, store: &str, written: bool) -> Option<Time> {
    let previous = plan
        .base
        .targets
        .iter()
        .find(|t| t.store == store)
        .and_then(|t| t.synced_at.clone());
    if written || previous.is_none() {
        Some(Time(plan.now))
    } else {
        previous
    }
}

/// When to reconcile again: the refresh interval (jittered), or sooner when a rotation is
/// due or the value enters its expiry warning window.
pub fn wake_after(ms: &ManagedSecret, plan: &SyncPlan) -> Duration {
    let mut wake = scaled(refresh_interval(ms), plan.jitter);
    let now = plan.now;
    let until = |t: jiff::Timestamp| {
        Duration::try_from(t.duration_since(now))
            .unwrap_or(Duration::ZERO)
            .saturating_add(Duration::from_secs(1))
    };
    for due in [plan.next_rotation, plan.next_compliance_check]
        .into_iter()
        .flatten()
    {
        wake = wake.min(until(due));
    }
    if let Some(expires) = plan.expires_at {
        let window = jiff::SignedDuration::try_from(expiry_warning(ms)).unwrap_or_default();
        for t in [expires.checked_sub(window).ok(), Some(expires)]
            .into_iter()
            .flatten()
        {
            if t > now {
                wake = wake.min(until(t));
            }
        }
    }
    wake
}

/// The `Expiring` condition of `ms`'s value expiring at `expires_at`, for the types that
/// can expire.
pub fn expiring_condition(
    ms: &ManagedSecret,
    expires_at: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
) -> Option<Condition> {
    if !matches!(
        ms.spec.type_,
        SecretType::ApiKey | SecretType::Certificate | SecretType::Jwt
    ) {
        return None;
    }
    let generation = ms.metadata.generation;
    let expiring = |ok, reason, message: String| {
        condition(ConditionType::Expiring, ok, reason, message, generation)
    };
    let Some(at) = expires_at else {
        return Some(expiring(
            false,
            Reason::NoExpiry,
            "the value has no expiry".into(),
        ));
    };
    let at_text = at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    Some(match expiry(at, now, expiry_warning(ms)) {
        Expiry::Expired => expiring(
            true,
            Reason::Expired,
            format!("the value expired at {at_text}"),
        ),
        Expiry::Expiring => expiring(
            true,
            Reason::ExpiresSoon,
            format!(
                "the value expires at {at_text}, within the {} warning window",
                ms.spec.expiry_warning.as_deref().unwrap_or("720h")
            ),
        ),
        Expiry::Valid => expiring(
            false,
            Reason::NotExpiring,
            format!("the value expires at {at_text}"),
        ),
    })
}
