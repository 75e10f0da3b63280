//! The two gates a new value passes before anything is written (pure): the profile's
//! compliance rules (`Deny` refuses a value that breaks one, `Warn` flags it) and its
//! approval policy (the change waits for approval). What they decide becomes status
//! (`status.approval`, `status.compliance`, conditions `Approved` and `Compliant`) and
//! Events; a held change writes nothing to any store or to the native Secret.

use super::approval::{self, Change, Decided, Gate, GateInput, Held};
use super::observe::Read;
use crate::api::{
    ApprovalPolicy, ApprovalRequest, ComplianceState, ComplianceStatus, ConditionType, Enforcement,
    ManagedSecret, ManagedSecretPhase, ManagedSecretStatus, Reason, RequestState, VaultProfile,
    condition, remove_condition, set_condition,
};
use crate::controller::events::Note;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use std::time::Duration;

/// What the approval gate looks at besides the change: the decisions, the previous
/// profile's policy, who asks.
#[derive(Debug, Clone, Default)]
pub struct ApprovalFacts {
    pub decisions: Vec<Decided>,
    /// The approval policy of the profile the secret's current version is under, when that
    /// is another profile than the one it resolves to now.
    pub previous: Option<ApprovalPolicy>,
}

/// A sync that stops before writing: the status to record, its Events, and when to look
/// again.
#[derive(Debug)]
pub struct Hold {
    /// The status the sync started from.
    pub before: ManagedSecretStatus,
    pub status: ManagedSecretStatus,
    pub notes: Vec<Note>,
    pub requeue: Duration,
}

/// The longest a held change waits before it is looked at again (a decision's watch
/// event wakes it sooner).
const RECHECK: Duration = Duration::from_secs(300);

/// Runs the approval gate on `changes` for `ms`.
pub fn approval(
    ms: &ManagedSecret,
    profile: &VaultProfile,
    facts: &ApprovalFacts,
    status: &ManagedSecretStatus,
    changes: &[Change],
    (requester, verified, now): (&str, bool, jiff::Timestamp),
) -> Gate {
    let policy =
        approval::effective_policy(profile.spec.approval.as_ref(), facts.previous.as_ref());
    let uid = ms.uid().unwrap_or_default();
    let input = GateInput {
        uid: &uid,
        generation: ms.metadata.generation,
        requester,
        now,
        verified,
        current_version: status.current_version,
    };
    approval::gate(
        policy.as_ref(),
        status.approval.as_ref(),
        changes,
        &facts.decisions,
        &input,
    )
}

/// The status of a change held for approval, from the status the sync started from.
pub fn held_status(ms: &ManagedSecret, mut status: ManagedSecretStatus, held: &Held) -> Hold {
    let before = status.clone();
    let generation = ms.metadata.generation;
    status.phase = Some(held.phase);
    status.observed_generation = generation;
    status.approval = Some(held.record.clone());
    set_condition(
        &mut status.conditions,
        condition(
            ConditionType::Approved,
            false,
            held.reason,
            held.message.clone(),
            generation,
        ),
    );
    set_condition(
        &mut status.conditions,
        condition(
            ConditionType::Ready,
            false,
            held.reason,
            held.message.clone(),
            generation,
        ),
    );
    let requeue = held
        .recheck_at
        .map(|t| {
            Duration::try_from(t.duration_since(jiff::Timestamp::now()))
                .unwrap_or(Duration::ZERO)
                .saturating_add(Duration::from_secs(1))
        })
        .unwrap_or(RECHECK)
        .min(RECHECK);
    Hold {
        before,
        status,
        notes: held.notes.clone(),
        requeue,
    }
}

/// Records `record` as `status.approval` and its condition `Approved`.
pub fn record_approval(
    status: &mut ManagedSecretStatus,
    record: Option<&ApprovalRequest>,
    generation: Option<i64>,
) {
    status.approval = record.cloned();
    match record {
        None => remove_condition(&mut status.conditions, ConditionType::Approved),
        Some(r) => {
            let (ok, reason, text) = match r.state {
                RequestState::Approved => (
                    true,
                    Reason::Approved,
                    format!(
                        "{} approved (request {}) by {}",
                        r.operation.as_str(),
                        r.id,
                        r.decisions
                            .iter()
                            .map(|d| d.by.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
                RequestState::Rejected => (
                    false,
                    Reason::Rejected,
                    format!("{} rejected (request {})", r.operation.as_str(), r.id),
                ),
                RequestState::Expired => (
                    false,
                    Reason::ApprovalExpired,
                    format!("{} request {} expired", r.operation.as_str(), r.id),
                ),
                RequestState::Pending => (
                    false,
                    Reason::Pending,
                    format!("{} waits (request {})", r.operation.as_str(), r.id),
                ),
            };
            set_condition(
                &mut status.conditions,
                condition(ConditionType::Approved, ok, reason, text, generation),
            );
        }
    }
}

/// What the compliance check of a value found, and whether it refuses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub status: Option<ComplianceStatus>,
    /// `Deny` and the (new) value breaks a rule: the message of the refusal.
    pub refused: Option<String>,
    /// When `max-version-age` is next due.
    pub next_check: Option<jiff::Timestamp>,
}

/// Checks `data` (the value the sync brings every store to) against the profile's rules.
/// `new_version`: the value is not yet written (a refusal under `Deny` stops it);
/// `current_created`: when the version in force was made (for `max-version-age`).
pub fn compliance(
    ms: &ManagedSecret,
    profile: &VaultProfile,
    data: &crate::secret_data::SecretData,
    new_version: bool,
    current_created: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
) -> Checked {
    let Some(policy) = &profile.spec.compliance else {
        return Checked {
            status: None,
            refused: None,
            next_check: None,
        };
    };
    let mut failing: Vec<String> = crate::compliance::evaluate(
        ms.spec.type_,
        data,
        policy,
        profile.spec.password_policy.as_ref(),
    )
    .into_iter()
    .map(str::to_owned)
    .collect();
    let created = if new_version {
        Some(now)
    } else {
        current_created
    };
    if crate::compliance::age_breaks(policy, created, now) {
        failing.push(crate::compliance::MAX_VERSION_AGE.to_owned());
    }
    failing.sort();
    failing.dedup();
    let state = match failing.is_empty() {
        true => ComplianceState::Compliant,
        false => ComplianceState::NonCompliant,
    };
    let refused = (new_version
        && policy.enforcement == Enforcement::Deny
        && failing
            .iter()
            .any(|r| r != crate::compliance::MAX_VERSION_AGE))
    .then(|| {
        format!(
            "the new value breaks the compliance rules of VaultProfile {}: {} (enforcement Deny); nothing was written{}",
            profile.name_any(),
            failing.join(", "),
            match ms.status.as_ref().and_then(|s| s.current_version) {
                Some(v) => format!("; version {v} stays in force"),
                None => String::new(),
            }
        )
    });
    Checked {
        status: Some(ComplianceStatus {
            state,
            failing,
            enforcement: policy.enforcement,
            profile_generation: profile.metadata.generation,
            checked_at: Time(now),
        }),
        refused,
        next_check: crate::compliance::next_age_check(policy, created, now),
    }
}

/// Records a compliance check in `status` (condition `Compliant`).
pub fn record_compliance(
    status: &mut ManagedSecretStatus,
    checked: Option<&ComplianceStatus>,
    generation: Option<i64>,
) {
    status.compliance = checked.cloned();
    match checked {
        None => remove_condition(&mut status.conditions, ConditionType::Compliant),
        Some(c) => {
            let (ok, reason, text) = match c.state {
                ComplianceState::Compliant => (
                    true,
                    Reason::Compliant,
                    "the value meets every compliance rule of its profile".to_owned(),
                ),
                ComplianceState::NonCompliant => (
                    false,
                    Reason::NonCompliant,
                    format!(
                        "the value breaks: {} (enforcement {:?})",
                        c.failing.join(", "),
                        c.enforcement
                    ),
                ),
            };
            set_condition(
                &mut status.conditions,
                condition(ConditionType::Compliant, ok, reason, text, generation),
            );
        }
    }
}

/// The status of a new value refused by the compliance rules (nothing written).
pub fn refused_status(
    ms: &ManagedSecret,
    mut status: ManagedSecretStatus,
    checked: &Checked,
    message: &str,
) -> Hold {
    let before = status.clone();
    let generation = ms.metadata.generation;
    status.phase = Some(ManagedSecretPhase::NonCompliant);
    status.observed_generation = generation;
    record_compliance(&mut status, checked.status.as_ref(), generation);
    set_condition(
        &mut status.conditions,
        condition(
            ConditionType::Ready,
            false,
            Reason::NonCompliant,
            message.to_owned(),
            generation,
        ),
    );
    Hold {
        before,
        status,
        notes: vec![Note::warning(Reason::NonCompliant, message.to_owned())],
        requeue: RECHECK,
    }
}

/// The status of a new version the profile's quota refuses: nothing is written; the native
/// Secret keeps the current version.
pub fn quota_status(ms: &ManagedSecret, mut status: ManagedSecretStatus, message: &str) -> Hold {
    let before = status.clone();
    let generation = ms.metadata.generation;
    status.phase = Some(ManagedSecretPhase::QuotaExceeded);
    status.observed_generation = generation;
    set_condition(
        &mut status.conditions,
        condition(
            ConditionType::Ready,
            false,
            Reason::QuotaExceeded,
            message.to_owned(),
            generation,
        ),
    );
    Hold {
        before,
        status,
        notes: vec![Note::warning(Reason::QuotaExceeded, message.to_owned())],
        requeue: Duration::from_secs(60),
    }
}

/// Whether a generated value's new version is a scheduled rotation (made by keyhaven on
/// the schedule the spec set: it needs no approval).
pub fn is_scheduled(reason: &str) -> bool {
    reason == super::decide::SCHEDULED_ROTATION
}

/// The value a sync chose, for the gates.
pub fn content_binding(value: &Read) -> String {
    value.fingerprint.current().to_string()
}

/// Why a sync writes nothing.
pub(super) enum Stop {
    Fail(crate::error::Error),
    /// The change waits for approval (or was rejected, or expired).
    Held(Box<Held>),
    /// The new value breaks the profile's compliance rules (`Deny`).
    Refused(Box<Checked>, String),
    /// A new version would exceed the profile's quota.
    Quota(String),
}

impl From<crate::error::Error> for Stop {
    fn from(e: crate::error::Error) -> Self {
        Stop::Fail(e)
    }
}

impl From<crate::content::ContentError> for Stop {
    fn from(e: crate::content::ContentError) -> Self {
        Stop::Fail(e.into())
    }
}

/// The approval gate of the generation `ms` asks for now (before anything is generated:
/// while it holds, nothing is): None when the stored value is kept.
pub fn generate_gate(
    ms: &ManagedSecret,
    (profile, facts, verified): (&VaultProfile, &ApprovalFacts, bool),
    status: &ManagedSecretStatus,
    current: Option<&Read>,
    now: jiff::Timestamp,
) -> Option<Gate> {
    let super::decide::GenerateDecision::Generate { reason } =
        super::plan::generate_decision(ms, profile, status, current, now)
    else {
        return None;
    };
    let changes = approval::changes(
        ms,
        status,
        &profile.name_any(),
        true,
        is_scheduled(&reason),
        &approval::generate_binding(ms, status),
        &reason,
    );
    let requester = super::plan::author(ms, status, verified);
    Some(approval(
        ms,
        profile,
        facts,
        status,
        &changes,
        (&requester, verified, now),
    ))
}
