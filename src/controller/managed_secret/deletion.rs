//! Deleting a ManagedSecret whose profile asks for approval of `delete`: the finalizer holds
//! the deletion until a request for it is approved; meanwhile nothing is deleted (the
//! native Secret stays as it is).

use super::approval::{self, Gate};
use super::gates::{self, Hold};
use crate::api::{ApprovalOperation, ManagedSecret, VaultProfile};
use crate::controller::context::Context;
use crate::labels::DELETION_REQUESTED_BY_ANNOTATION;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use std::sync::Arc;

/// The profile whose approval policy covers deleting `ms`: the one it resolves to, or the
/// one its status records (moving it first is no way around the approval). None: a
/// deletion needs no approval.
pub async fn policy(ms: &ManagedSecret, ctx: &Context) -> Option<Arc<VaultProfile>> {
    let covers = |p: &VaultProfile| {
        p.spec
            .approval
            .as_ref()
            .is_some_and(|a| a.covers(ApprovalOperation::Delete))
    };
    if let Ok((profile, ..)) = super::observe::resolve_profile(ms, ctx).await
        && covers(&profile)
    {
        return Some(profile);
    }
    let recorded = ms.status.as_ref()?.profile.as_deref()?;
    ctx.caches
        .profiles
        .get(&ObjectRef::new(recorded))
        .filter(|p| covers(p))
}

/// The hold of a deletion not (yet) approved; None once it is.
pub async fn gate(ms: &ManagedSecret, ctx: &Context, profile: &VaultProfile) -> Option<Hold> {
    let status = ms.status.clone().unwrap_or_default();
    let facts = super::decisions::facts(ctx, ms, &status, profile).await;
    // Recorded by the admission webhook when it admitted the deletion.
    let requester = ms
        .annotations()
        .get(DELETION_REQUESTED_BY_ANNOTATION)
        .filter(|_| ctx.config.verified_identity)
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    let verified = ctx.config.verified_identity;
    let now = jiff::Timestamp::now();
    match gates::approval(
        ms,
        profile,
        &facts,
        &status,
        &[approval::deletion(ms)],
        (&requester, verified, now),
    ) {
        Gate::Proceed { .. } => None,
        Gate::Hold(held) => Some(gates::held_status(ms, status, &held)),
    }
}
