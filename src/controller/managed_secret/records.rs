//! The audit records of a sync (pure): what the plan did and how each step ended, what a
//! held or refused change decided, what a failure refused. Refusals are recorded when they
//! are first decided (the Ready condition changes), not on every retry.

use super::plan::{SyncPlan, TargetStep};
use super::report::Outcome;
use super::who::SYSTEM_AUTHOR;
use crate::api::{
    ApprovalRequest, ComplianceState, ComplianceStatus, ConditionType, Decision, ManagedSecret,
    ManagedSecretStatus, Reason, RequestState, find_condition,
};
use crate::audit::{Action, Outcome as Ended, Record};
use crate::backend::VersionStamp;
use kube::ResourceExt;

fn base(ms: &ManagedSecret, action: Action, actor: &str) -> Record {
    Record::new(
        action,
        actor,
        &ms.namespace().unwrap_or_default(),
        &ms.name_any(),
    )
    .path(&ms.store_path())
}

fn of_version(record: Record, stamp: &VersionStamp) -> Record {
    let fingerprint = stamp.fingerprint.to_string();
    record.version(stamp.version, Some(&fingerprint))
}

/// The records of a carried-out sync.
pub fn sync_records(ms: &ManagedSecret, plan: &SyncPlan, outcome: &Outcome) -> Vec<Record> {
    let mut records = approval_records(ms, plan.base.approval.as_ref(), plan.approval.as_ref());
    let new = plan.record.as_ref();
    // Who the work is done for: the version's author, else keyhaven (a repair).
    let actor = new.map_or(SYSTEM_AUTHOR, |r| r.created_by.as_str());
    let last_store = plan.base.versions.last().map(|v| v.store.as_str());
    if let (Some(record), Some(last)) = (new, last_store)
        && last != plan.source.store
    {
        records.push(
            base(ms, Action::Switch, actor)
                .store(&plan.source.store)
                .reason(format!("source store {last} -> {}", plan.source.store)),
        );
        let _ = record;
    }
    for lost in &plan.unrecorded {
        records.push(
            base(ms, Action::Version, SYSTEM_AUTHOR)
                .version(lost.version, Some(&lost.fingerprint))
                .store(&lost.store)
                .reason(super::plan::UNRECORDED_REASON),
        );
    }
    if let Some(record) = new {
        let action = match plan.base.versions.is_empty() && plan.base.current_version.is_none() {
            true => Action::Create,
            false => Action::Version,
        };
        let mut r = of_version(base(ms, action, actor), &plan.stamp).store(&plan.source.store);
        if let Some(reason) = &record.reason {
            r = r.reason(reason.clone());
        }
        records.push(r);
    }
    for (step, result) in plan.targets.iter().zip(&outcome.targets) {
        if let TargetStep::Write { store, .. } = step {
            let r = of_version(base(ms, Action::Sync, actor), &plan.stamp).store(store);
            records.push(match result {
                Ok(()) => r,
                Err(e) => r.outcome(Ended::Failure).reason(e.to_string()),
            });
        }
    }
    if outcome.native_written {
        if let Some(from) = &plan.read_from {
            records.push(of_version(base(ms, Action::Read, actor), &plan.stamp).store(from));
        }
        records.push(
            of_version(base(ms, Action::SecretWritten, actor), &plan.stamp)
                .reason(format!("Secret {}", plan.native.name)),
        );
    }
    records.extend(compliance_record(
        ms,
        plan.base.compliance.as_ref(),
        plan.compliance.as_ref(),
    ));
    for pruned in &outcome.pruned {
        let r = base(ms, Action::Prune, SYSTEM_AUTHOR).store(&pruned.store);
        records.push(match &pruned.result {
            Ok(versions) if versions.is_empty() => continue,
            Ok(versions) => r.reason(format!("retention: versions {} removed", list(versions))),
            Err(e) => r.outcome(Ended::Failure).reason(e.clone()),
        });
    }
    records
}

/// `1, 2, 5-9`.
pub fn list(versions: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < versions.len() {
        let start = versions[i];
        let mut end = start;
        while i + 1 < versions.len() && versions[i + 1] == end + 1 {
            i += 1;
            end = versions[i];
        }
        parts.push(match start == end {
            true => start.to_string(),
            false => format!("{start}-{end}"),
        });
        i += 1;
    }
    parts.join(", ")
}

/// What changed in the approval request between `before` and `after`: a new request, each
/// decision counted, an expiry.
pub fn approval_records(
    ms: &ManagedSecret,
    before: Option<&ApprovalRequest>,
    after: Option<&ApprovalRequest>,
) -> Vec<Record> {
    let Some(after) = after else {
        return vec![];
    };
    let same = before.filter(|b| b.id == after.id);
    let mut records = vec![];
    if same.is_none() {
        records.push(
            base(ms, Action::ApprovalRequested, &after.requested_by).reason(format!(
                "{}: {} (request {})",
                after.operation.as_str(),
                after.summary,
                after.id
            )),
        );
    }
    let known = |name: &str| same.is_some_and(|b| b.decisions.iter().any(|d| d.name == name));
    for d in after.decisions.iter().filter(|d| !known(&d.name)) {
        let (ended, word) = match d.decision {
            Decision::Approve => (Ended::Success, "approved"),
            Decision::Reject => (Ended::Denied, "rejected"),
        };
        records.push(
            base(ms, Action::ApprovalDecided, &d.by)
                .outcome(ended)
                .reason(format!(
                    "{word} request {} by SecretApproval {}",
                    after.id, d.name
                )),
        );
    }
    let was_expired = same.is_some_and(|b| b.state == RequestState::Expired);
    if after.state == RequestState::Expired && !was_expired {
        records.push(
            base(ms, Action::ApprovalDecided, SYSTEM_AUTHOR)
                .outcome(Ended::Denied)
                .reason(format!("request {} expired undecided", after.id)),
        );
    }
    records
}

/// A record when the compliance verdict changes (or is first made non-compliant).
pub fn compliance_record(
    ms: &ManagedSecret,
    before: Option<&ComplianceStatus>,
    after: Option<&ComplianceStatus>,
) -> Option<Record> {
    let after = after?;
    let changed = match before {
        None => after.state == ComplianceState::NonCompliant,
        Some(b) => b.state != after.state || b.failing != after.failing,
    };
    changed.then(|| {
        let reason = match after.state {
            ComplianceState::Compliant => "compliant".to_owned(),
            ComplianceState::NonCompliant => {
                format!("non-compliant: {}", after.failing.join(", "))
            }
        };
        base(ms, Action::ComplianceChanged, SYSTEM_AUTHOR).reason(reason)
    })
}

/// Whether `status`'s Ready condition says something `before`'s did not.
fn newly(before: &ManagedSecretStatus, after: &ManagedSecretStatus) -> bool {
    let ready = |s: &ManagedSecretStatus| {
        find_condition(&s.conditions, ConditionType::Ready)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    ready(before) != ready(after)
}

/// The records of a held or refused change (status `after`, from `before`).
pub fn hold_records(
    ms: &ManagedSecret,
    before: &ManagedSecretStatus,
    after: &ManagedSecretStatus,
    actor: &str,
) -> Vec<Record> {
    let mut records = approval_records(ms, before.approval.as_ref(), after.approval.as_ref());
    records.extend(compliance_record(
        ms,
        before.compliance.as_ref(),
        after.compliance.as_ref(),
    ));
    let ready = find_condition(&after.conditions, ConditionType::Ready);
    let refused =
        ready.is_some_and(|c| c.status == "False" && is_refusal(&c.reason) && newly(before, after));
    if let Some(c) = ready.filter(|_| refused) {
        records.push(
            base(ms, Action::Refused, actor)
                .outcome(Ended::Denied)
                .reason(format!("{}: {}", c.reason, c.message)),
        );
    }
    records
}

/// Whether a Ready reason is a refusal (tenancy, compliance, quota, content), as opposed to
/// a store or API failure.
fn is_refusal(reason: &str) -> bool {
    [
        Reason::NonCompliant,
        Reason::QuotaExceeded,
        Reason::ProfileNotAllowed,
        Reason::PathNotInNamespace,
        Reason::PathReadOnly,
        Reason::PathReserved,
        Reason::PathOwnedElsewhere,
        Reason::StoreNamespaceNotAllowed,
        Reason::IntermediateCANotAllowed,
        Reason::InvalidContent,
    ]
    .iter()
    .any(|r| r.as_str() == reason)
}

/// The records of a failed sync: a refusal, once.
pub fn failure_records(
    ms: &ManagedSecret,
    before: &ManagedSecretStatus,
    after: &ManagedSecretStatus,
    actor: &str,
) -> Vec<Record> {
    hold_records(ms, before, after, actor)
}
