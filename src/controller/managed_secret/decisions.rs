//! What the approval gate reads (I/O): the SecretApprovals answering a ManagedSecret (from
//! the cache), whether their deciders may approve (a SubjectAccessReview each, for the
//! open request only), and the approval policy of the profile a secret moves out of.

use super::approval::Decided;
use super::gates::ApprovalFacts;
use crate::access_review::may_approve;
use crate::api::{ManagedSecret, ManagedSecretStatus, RequestState, VaultProfile};
use crate::controller::context::Context;
use crate::labels::{DECIDED_BY_ANNOTATION, DECIDED_GROUPS_ANNOTATION};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

/// The groups recorded with a decision or a request.
pub fn groups_of(annotation: Option<&String>) -> Vec<String> {
    annotation
        .map(|g| {
            g.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The approval facts of `ms` under `profile` (nothing when neither its profile nor the
/// one it moves out of asks for approval).
pub async fn facts(
    ctx: &Context,
    ms: &ManagedSecret,
    status: &ManagedSecretStatus,
    profile: &VaultProfile,
) -> ApprovalFacts {
    let name = profile.name_any();
    let previous = status
        .profile
        .as_deref()
        .filter(|p| *p != name)
        .and_then(|p| ctx.caches.profiles.get(&ObjectRef::new(p)))
        .and_then(|p| p.spec.approval.clone());
    if profile.spec.approval.is_none() && previous.is_none() {
        return ApprovalFacts::default();
    }
    ApprovalFacts {
        decisions: decisions(ctx, ms, status).await,
        previous,
    }
}

/// The SecretApprovals naming `ms`; those answering its open request are checked against
/// RBAC.
pub async fn decisions(
    ctx: &Context,
    ms: &ManagedSecret,
    status: &ManagedSecretStatus,
) -> Vec<Decided> {
    let namespace = ms.namespace().unwrap_or_default();
    let name = ms.name_any();
    let open = status
        .approval
        .as_ref()
        .filter(|r| r.state == RequestState::Pending)
        .map(|r| r.id.clone());
    let mut out = Vec::new();
    for a in ctx.caches.approvals.state() {
        if a.namespace().as_deref() != Some(namespace.as_str()) || a.spec.secret_ref.name != name {
            continue;
        }
        let by = a.annotations().get(DECIDED_BY_ANNOTATION).cloned();
        let may = match (&by, &open) {
            (Some(user), Some(id)) if *id == a.spec.request => {
                let groups = groups_of(a.annotations().get(DECIDED_GROUPS_ANNOTATION));
                may_approve(&ctx.client, user, &groups, &namespace, &name).await
            }
            _ => false,
        };
        out.push(Decided {
            name: a.name_any(),
            request: a.spec.request.clone(),
            decision: a.spec.decision,
            by,
            at: a
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or_else(jiff::Timestamp::now, |t| t.0),
            comment: a.spec.comment.clone(),
            may_approve: may,
        });
    }
    out
}
