//! Approvals (pure): which change of a ManagedSecret waits for approval under its profile's
//! `approval` policy, the request that records it (`status.approval`), and how the
//! decisions (`SecretApproval`s) answer it. A request is bound to exactly what it asks for
//! (the pending content's fingerprint, a digest of the generate parameters, of the new
//! source, or of the deletion): any further change is a new request, and decisions answer
//! one request only.

use crate::api::{
    ApprovalOperation, ApprovalPolicy, ApprovalRequest, Decision, DecisionRecord, ManagedSecret,
    ManagedSecretPhase, ManagedSecretStatus, Reason, RequestState,
};
use crate::controller::events::Note;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

/// A change that may need approval: what it is, what exactly it asks for, and a one-line
/// description (never a value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub op: ApprovalOperation,
    pub binding: String,
    pub summary: String,
}

/// A SecretApproval answering one of this ManagedSecret's requests, as observed.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    pub name: String,
    pub request: String,
    pub decision: Decision,
    /// The decider the admission webhook recorded (None: not recorded; never counted).
    pub by: Option<String>,
    pub at: jiff::Timestamp,
    pub comment: Option<String>,
    /// A SubjectAccessReview allows `by` the verb `approve` on this ManagedSecret.
    pub may_approve: bool,
}

/// What the gate is decided with besides the policy, the request and the decisions.
#[derive(Debug, Clone)]
pub struct GateInput<'a> {
    pub uid: &'a str,
    pub generation: Option<i64>,
    /// Who asks for the change.
    pub requester: &'a str,
    pub now: jiff::Timestamp,
    /// The decider annotations come from this operator's admission webhook; without it no
    /// decision can be trusted, so none counts.
    pub verified: bool,
    /// The version in force (for messages).
    pub current_version: Option<u64>,
}

/// The gate's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// Go ahead (no approval needed, or approved); `status.approval` becomes `record`.
    Proceed {
        record: Option<ApprovalRequest>,
        notes: Vec<Note>,
    },
    /// Wait: nothing is written anywhere; the status records `record`.
    Hold(Box<Held>),
}

/// A change held for approval.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub record: ApprovalRequest,
    pub phase: ManagedSecretPhase,
    /// The reason of condition `Approved` (False).
    pub reason: Reason,
    pub message: String,
    pub notes: Vec<Note>,
    /// Check again then (the request's expiry, while pending).
    pub recheck_at: Option<jiff::Timestamp>,
}

/// The content source of `ms` as `status.source` records it.
pub fn source_descriptor(ms: &ManagedSecret) -> String {
    let c = &ms.spec.content;
    match (&c.from_store, &c.from_secret, &c.generate) {
        (Some(_), ..) => "fromStore".into(),
        (_, Some(s), _) => format!("fromSecret/{}", s.name),
        (_, _, Some(_)) => "generate".into(),
        _ => "none".into(),
    }
}

fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// What a request to generate binds to: the type, the generate parameters, the rotate
/// request and the version it replaces (so the next rotation is a new request).
pub fn generate_binding(ms: &ManagedSecret, status: &ManagedSecretStatus) -> String {
    let params = serde_json::to_string(&ms.spec.content.generate).unwrap_or_default();
    let rotate = ms.rotate_request().unwrap_or_default();
    let last = status
        .versions
        .last()
        .map(|v| v.version.to_string())
        .unwrap_or_default();
    format!(
        "generate:{}",
        digest(&[ms.spec.type_.as_str(), &params, &rotate, &last])
    )
}

/// The changes a sync would make, most specific first: `create` (no version yet),
/// `changeSource` (the profile or content source differs from the current version's),
/// `update` (a new version a user asked for; not a scheduled rotation).
pub fn changes(
    ms: &ManagedSecret,
    status: &ManagedSecretStatus,
    profile: &str,
    new_version: bool,
    scheduled: bool,
    content_binding: &str,
    summary: &str,
) -> Vec<Change> {
    let change = |op, binding: String, summary: String| Change {
        op,
        binding,
        summary,
    };
    if status.versions.is_empty() {
        return vec![change(
            ApprovalOperation::Create,
            content_binding.to_owned(),
            format!("create: {summary}"),
        )];
    }
    let mut out = Vec::new();
    let source = source_descriptor(ms);
    let moved_profile = status.profile.as_deref().is_some_and(|p| p != profile);
    let moved_source = status.source.as_deref().is_some_and(|s| s != source);
    if moved_profile || moved_source {
        let from = format!(
            "{}/{}",
            status.profile.as_deref().unwrap_or("?"),
            status.source.as_deref().unwrap_or("?")
        );
        out.push(change(
            ApprovalOperation::ChangeSource,
            format!(
                "source:{}",
                digest(&[profile, &source, content_binding, &from])
            ),
            format!("change source from {from} to {profile}/{source}"),
        ));
    }
    if new_version && !scheduled {
        out.push(change(
            ApprovalOperation::Update,
            content_binding.to_owned(),
            format!("update: {summary}"),
        ));
    }
    out
}

/// The deletion of `ms` as a change.
pub fn deletion(ms: &ManagedSecret) -> Change {
    Change {
        op: ApprovalOperation::Delete,
        binding: format!("delete:{}", ms.uid().unwrap_or_default()),
        summary: "delete the ManagedSecret".into(),
    }
}

/// The policy of a change: the profile's, joined with the previous profile's when the
/// secret moves out of one that asks for approval (leaving it is not a way around it).
pub fn effective_policy(
    current: Option<&ApprovalPolicy>,
    previous: Option<&ApprovalPolicy>,
) -> Option<ApprovalPolicy> {
    match (current, previous) {
        (None, None) => None,
        (Some(p), None) | (None, Some(p)) => Some(p.clone()),
        (Some(a), Some(b)) => {
            let mut operations = a.operations.clone();
            for op in &b.operations {
                if !operations.contains(op) {
                    operations.push(*op);
                }
            }
            Some(ApprovalPolicy {
                operations,
                required_approvals: Some(a.required().max(b.required())),
                expiry: Some(format!("{}s", a.expiry().min(b.expiry()).as_secs().max(1))),
            })
        }
    }
}

fn request_id(uid: &str, change: &Change, at: jiff::Timestamp, generation: Option<i64>) -> String {
    let nanos = at.as_nanosecond().to_string();
    let generation = generation.unwrap_or_default().to_string();
    format!(
        "r{}",
        &digest(&[
            uid,
            change.op.as_str(),
            &change.binding,
            &nanos,
            &generation
        ])[..15]
    )
}

/// Decides whether the first of `changes` the policy covers may go ahead.
pub fn gate(
    policy: Option<&ApprovalPolicy>,
    stored: Option<&ApprovalRequest>,
    changes: &[Change],
    decisions: &[Decided],
    input: &GateInput<'_>,
) -> Gate {
    let Some(policy) = policy else {
        return Gate::Proceed {
            record: None,
            notes: vec![],
        };
    };
    let Some(change) = changes.iter().find(|c| policy.covers(c.op)) else {
        // Nothing waits: a request no longer needed is dropped, a decided one is kept.
        return Gate::Proceed {
            record: stored.filter(|r| r.state != RequestState::Pending).cloned(),
            notes: vec![],
        };
    };
    let matching = stored.filter(|r| r.operation == change.op && r.binding == change.binding);
    let request = match matching {
        Some(r) if r.state == RequestState::Approved => {
            return Gate::Proceed {
                record: Some(r.clone()),
                notes: vec![],
            };
        }
        Some(r) if r.state == RequestState::Pending => r.clone(),
        // Rejected or expired: it stays so until the spec changes.
        Some(r) if r.generation == input.generation => {
            return Gate::Hold(Box::new(held(r.clone(), vec![], input)));
        }
        _ => {
            let expires = input
                .now
                .checked_add(jiff::SignedDuration::try_from(policy.expiry()).unwrap_or_default())
                .unwrap_or(jiff::Timestamp::MAX);
            let record = ApprovalRequest {
                id: request_id(input.uid, change, input.now, input.generation),
                operation: change.op,
                binding: change.binding.clone(),
                summary: change.summary.clone(),
                requested_by: input.requester.to_owned(),
                requested_at: Time(input.now),
                expires_at: Time(expires),
                generation: input.generation,
                required: policy.required(),
                state: RequestState::Pending,
                decisions: vec![],
            };
            let note = Note::normal(
                Reason::Pending,
                format!(
                    "{} waits for approval: request {} by {} needs {} approval(s) by {}",
                    change.op.as_str(),
                    record.id,
                    record.requested_by,
                    record.required,
                    expires
                ),
            );
            return record_tally(record, decisions, input, vec![note]);
        }
    };
    tally(request, decisions, input)
}

/// Counts the decisions on a pending request.
fn tally(request: ApprovalRequest, decisions: &[Decided], input: &GateInput<'_>) -> Gate {
    record_tally(request, decisions, input, vec![])
}

fn record_tally(
    mut request: ApprovalRequest,
    decisions: &[Decided],
    input: &GateInput<'_>,
    mut notes: Vec<Note>,
) -> Gate {
    let expires = request.expires_at.0;
    let mut counted: Vec<DecisionRecord> = Vec::new();
    let mut ignored = Vec::new();
    let mut ordered: Vec<&Decided> = decisions
        .iter()
        .filter(|d| d.request == request.id)
        .collect();
    ordered.sort_by(|a, b| a.at.cmp(&b.at).then(a.name.cmp(&b.name)));
    for d in ordered {
        let why_not = match &d.by {
            _ if !input.verified => Some("the admission webhook does not run in this operator"),
            None => Some("it records no decider"),
            Some(by) if *by == request.requested_by => Some("its decider is the requester"),
            Some(_) if !d.may_approve => Some("its decider may not approve"),
            Some(by) if counted.iter().any(|c| c.by == *by) => Some("its decider decided already"),
            Some(_) if d.at > expires => Some("it came after the request expired"),
            Some(_) => None,
        };
        match why_not {
            Some(why) => ignored.push(format!("SecretApproval {} ignored: {why}", d.name)),
            None => counted.push(DecisionRecord {
                name: d.name.clone(),
                decision: d.decision,
                by: d.by.clone().unwrap_or_default(),
                at: Time(d.at),
                comment: d.comment.clone(),
            }),
        }
    }
    counted.truncate(10);
    for c in &counted {
        if !request.decisions.iter().any(|s| s.name == c.name) {
            let (reason, verb) = match c.decision {
                Decision::Approve => (Reason::Approved, "approved"),
                Decision::Reject => (Reason::Rejected, "rejected"),
            };
            notes.push(Note::normal(
                reason,
                format!(
                    "{} {verb} request {} ({}){}",
                    c.by,
                    request.id,
                    request.operation.as_str(),
                    c.comment
                        .as_deref()
                        .map(|t| format!(": {t}"))
                        .unwrap_or_default()
                ),
            ));
        }
    }
    let newly_ignored: Vec<String> = ignored
        .into_iter()
        .filter(|_| request.state == RequestState::Pending)
        .collect();
    let approvals = counted
        .iter()
        .filter(|c| c.decision == Decision::Approve)
        .count() as u32;
    let rejected = counted.iter().any(|c| c.decision == Decision::Reject);
    request.decisions = counted;
    request.state = if rejected {
        RequestState::Rejected
    } else if approvals >= request.required {
        RequestState::Approved
    } else if input.now >= expires {
        RequestState::Expired
    } else {
        RequestState::Pending
    };
    if request.state == RequestState::Expired {
        notes.push(Note::warning(
            Reason::ApprovalExpired,
            format!(
                "request {} ({}) expired with {approvals} of {} approval(s)",
                request.id,
                request.operation.as_str(),
                request.required
            ),
        ));
    }
    if request.state == RequestState::Approved {
        return Gate::Proceed {
            record: Some(request),
            notes,
        };
    }
    let mut held = held(request, notes, input);
    if !newly_ignored.is_empty() && held.phase == ManagedSecretPhase::PendingApproval {
        held.message = format!("{}; {}", held.message, newly_ignored.join("; "));
    }
    Gate::Hold(Box::new(held))
}

fn held(record: ApprovalRequest, notes: Vec<Note>, input: &GateInput<'_>) -> Held {
    let op = record.operation.as_str();
    let approvals = record
        .decisions
        .iter()
        .filter(|d| d.decision == Decision::Approve)
        .count();
    let in_force = match (record.operation, input.current_version) {
        (ApprovalOperation::Create, _) | (_, None) => "nothing was written".to_owned(),
        (ApprovalOperation::Delete, _) => "the ManagedSecret stays".to_owned(),
        (_, Some(v)) => format!("version {v} stays in force in the native Secret and every store"),
    };
    let (phase, reason, message, recheck_at) = match record.state {
        RequestState::Rejected => {
            let by = record
                .decisions
                .iter()
                .find(|d| d.decision == Decision::Reject)
                .map(|d| d.by.clone())
                .unwrap_or_default();
            (
                ManagedSecretPhase::Rejected,
                Reason::Rejected,
                format!(
                    "{op} rejected by {by} (request {}): {in_force}; change the spec to ask again",
                    record.id
                ),
                None,
            )
        }
        RequestState::Expired => (
            ManagedSecretPhase::ApprovalExpired,
            Reason::ApprovalExpired,
            format!(
                "{op} request {} expired at {} with {approvals} of {} approval(s): {in_force}; change the spec to ask again",
                record.id, record.expires_at.0, record.required
            ),
            None,
        ),
        _ => (
            ManagedSecretPhase::PendingApproval,
            Reason::Pending,
            format!(
                "{} waits for approval: request {} by {}, {approvals} of {} approval(s), expires {}; {in_force}",
                record.summary,
                record.id,
                record.requested_by,
                record.required,
                record.expires_at.0
            ),
            Some(record.expires_at.0),
        ),
    };
    Held {
        record,
        phase,
        reason,
        message,
        notes,
        recheck_at,
    }
}
