//! The ManagedSecret reconciler: read the value (source store or a Secret), decide its
//! version, bring the source and every sync target to that version, materialize the native
//! Secret, record status. Three stages: [`observe`] reads everything once, [`plan`]
//! decides (pure), [`apply`] carries the plan out; [`report`] turns what it did into status
//! and Events. A failure changes no native Secret: it makes a condition, an Event and a
//! retry.

mod apply;
pub mod approval;
#[cfg(test)]
mod approval_tests;
mod choose;
pub mod decide;
#[cfg(test)]
mod decide_tests;
mod decisions;
mod deletion;
mod durations;
pub mod gates;
mod native;
mod observe;
mod plan;
#[cfg(test)]
mod plan_tests;
mod records;
mod report;
mod retention;
mod who;
#[cfg(test)]
mod who_tests;

pub use crate::labels::CLEANUP_FINALIZER as FINALIZER;

use super::context::Context;
use crate::api::{
    ConditionType, ManagedSecret, ManagedSecretStatus, Reason, condition, remove_condition,
    set_condition,
};
use crate::error::{Error, Result, Verb};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, ResourceExt};
use native::Cleanup;
use observe::StatusSeen;
use plan::Plan;
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, warn};

/// How long a refresh steps aside while new or changed ManagedSecrets wait.
const YIELD: Duration = Duration::from_secs(5);

/// Reconciles one ManagedSecret, in a span naming it.
pub async fn reconcile(ms: Arc<ManagedSecret>, ctx: Arc<Context>) -> Result<Action> {
    let span = tracing::info_span!("reconcile", kind = "ManagedSecret", namespace = %ms.namespace().unwrap_or_default(), name = %ms.name_any());
    async move {
        // Without a cleanup to do (the default: the garbage collector deletes the Secret
        // the ManagedSecret owns) or a deletion to approve, no finalizer: it would cost a
        // write and a reconcile on every creation and deletion. One already there is
        // honoured.
        let deletion = deletion::policy(&ms, &ctx).await;
        let has_finalizer = ms.finalizers().iter().any(|f| f == FINALIZER);
        if native::cleanup(&ms).is_none() && deletion.is_none() && !has_finalizer {
            if ms.metadata.deletion_timestamp.is_some() {
                ctx.status_writes.forget(&ms);
                return Ok(Action::await_change());
            }
            return sync(&ms, &ctx).await;
        }
        // A deletion that needs approval waits (the finalizer holds it) until approved.
        if ms.metadata.deletion_timestamp.is_some()
            && has_finalizer
            && let Some(profile) = deletion
            && let Some(hold) = deletion::gate(&ms, &ctx, &profile).await
        {
            let mut hold = hold;
            let actor = ms
                .annotations()
                .get(crate::labels::DELETION_REQUESTED_BY_ANNOTATION)
                .cloned()
                .unwrap_or_else(|| who::SYSTEM_AUTHOR.to_owned());
            let records = records::hold_records(&ms, &hold.before, &hold.status, &actor);
            audited(&ctx, &ms, records, &mut hold.status, &mut hold.notes).await;
            ctx.events.publish_all(ms.as_ref(), &hold.notes).await;
            write_status(&ctx, &ms, &hold.status).await?;
            return Ok(Action::requeue(hold.requeue));
        }
        let namespace = ms.namespace().unwrap_or_default();
        let api: Api<ManagedSecret> = Api::namespaced(ctx.client.clone(), &namespace);
        finalizer(&api, FINALIZER, ms, |event| async {
            match event {
                FinalizerEvent::Apply(ms) => sync(&ms, &ctx).await,
                FinalizerEvent::Cleanup(ms) => cleanup(&ms, &ctx).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(other.to_string()),
        })
    }
    .instrument(span)
    .await
}

/// One sync: observe, plan, apply. A migration step is applied on its own and the secret
/// observed once more, so that the sync decides on where its versions are now.
async fn sync(ms: &ManagedSecret, ctx: &Context) -> Result<Action> {
    if plan::defers(ms, || ctx.backlog()) {
        ctx.metrics.refresh_deferred();
        return Ok(Action::requeue(
            YIELD.mul_f64(0.9 + rand::random::<f64>() * 0.2),
        ));
    }
    let observed = first_plan(ms, ctx).await?;
    let observed = match observed {
        Plan::Migrate { moves, status } => {
            if let Err(e) = ctx.config.audit.writable().await {
                return audit_unavailable(ctx, ms, status, &e).await;
            }
            let (status, failed) =
                super::migration::apply(ctx, &with_status(ms, status.clone()), status, moves)
                    .await?;
            let again =
                observe::observe(ms, ctx, StatusSeen::Stored(Box::new(status)), false).await;
            match plan_of(ms, again).await {
                Plan::Sync(mut p) => {
                    p.migration_failed |= failed;
                    Plan::Sync(p)
                }
                other => other,
            }
        }
        other => other,
    };
    match observed {
        Plan::Sync(plan) => {
            let base = with_status(ms, plan.base.clone());
            if plan.acts()
                && let Err(e) = ctx.config.audit.writable().await
            {
                return audit_unavailable(ctx, &base, plan.base.clone(), &e).await;
            }
            match apply::apply(ms, ctx, &plan).await {
                Ok(outcome) => {
                    if plan.decision == decide::VersionDecision::New(plan.stamp.version) {
                        ctx.metrics.version_written(&plan.profile);
                    }
                    let mut report = report::report(ms, &plan, &outcome);
                    let records = records::sync_records(ms, &plan, &outcome);
                    audited(ctx, ms, records, &mut report.status, &mut report.notes).await;
                    if report.check_stores {
                        ctx.health_checks.request();
                    }
                    ctx.events.publish_all(ms, &report.notes).await;
                    write_status(ctx, &base, &report.status).await?;
                    Ok(Action::requeue(report.requeue))
                }
                Err(e) => fail(ctx, &base, plan::failure(ms, plan.base.clone(), e)).await,
            }
        }
        Plan::Fail(failure) => fail(ctx, ms, failure).await,
        Plan::Hold(mut hold) => {
            let verified = ctx.config.verified_identity;
            let before = ms.status.clone().unwrap_or_default();
            let actor = plan::author(ms, &before, verified);
            let records = records::hold_records(ms, &hold.before, &hold.status, &actor);
            audited(ctx, ms, records, &mut hold.status, &mut hold.notes).await;
            ctx.events.publish_all(ms, &hold.notes).await;
            write_status(ctx, ms, &hold.status).await?;
            Ok(Action::requeue(hold.requeue))
        }
        Plan::Migrate { .. } => Err(Error::config(
            Reason::MigrationConflict,
            "a second migration step in one reconcile",
        )),
    }
}

/// The first plan of a sync, on the cached status; made again on the stored status when
/// the cache may predate this process's last status write and the plan acts on history
/// (one GET in that case only: an idle refresh reads no status).
async fn first_plan(ms: &ManagedSecret, ctx: &Context) -> Result<Plan> {
    let observed = observe::observe(ms, ctx, StatusSeen::Cached, true).await;
    let stale = observed.stale;
    let planned = plan_of(ms, observed).await;
    if !(stale && planned.decides_on_history()) {
        return Ok(planned);
    }
    let stored = super::status::read(&ctx.client, ms).await?;
    Ok(match planned {
        // A failure is recorded on the stored status, not observed again (its reads failed).
        Plan::Fail(f) => Plan::Fail(plan::failure(ms, stored, f.error)),
        _ => {
            let again = observe::observe(ms, ctx, StatusSeen::Stored(Box::new(stored)), true).await;
            plan_of(ms, again).await
        }
    })
}

/// [`plan::plan`]; on a blocking thread (behind the CPU semaphore) when the type's
/// validation parses keys or certificates or runs a KDF.
async fn plan_of(ms: &ManagedSecret, observed: observe::Observation) -> Plan {
    if !crate::content::cpu::is_heavy(ms.spec.type_) {
        return plan::plan(ms, observed);
    }
    let ms = ms.clone();
    crate::content::cpu::blocking(move || plan::plan(&ms, observed)).await
}

/// Writes `records` to the audit log before the status that reports them, and says in
/// that status whether it could (condition `AuditUnavailable`).
async fn audited(
    ctx: &Context,
    ms: &ManagedSecret,
    records: Vec<crate::audit::Record>,
    status: &mut ManagedSecretStatus,
    notes: &mut Vec<crate::controller::events::Note>,
) {
    let none = records.is_empty();
    match ctx.config.audit.record(records).await {
        Ok(()) if none && !ctx.config.audit.available() => {}
        Ok(()) => remove_condition(&mut status.conditions, ConditionType::AuditUnavailable),
        Err(e) => {
            warn!(error = %e, "audit records could not be written");
            set_condition(
                &mut status.conditions,
                condition(
                    ConditionType::AuditUnavailable,
                    true,
                    Reason::AuditUnavailable,
                    format!("{e}: what was done is recorded once it can be"),
                    ms.metadata.generation,
                ),
            );
            notes.push(crate::controller::events::Note::warning(
                Reason::AuditUnavailable,
                e.to_string(),
            ));
        }
    }
}

/// A sync that would write while the audit log cannot be written: nothing is written; the
/// status says why; tried again soon.
async fn audit_unavailable(
    ctx: &Context,
    base: &ManagedSecret,
    mut status: ManagedSecretStatus,
    e: &crate::audit::AuditError,
) -> Result<Action> {
    let generation = base.metadata.generation;
    let message = format!("{e}: no value is written until it can be");
    warn!(error = %e, "sync held: the audit log cannot be written");
    status.phase = Some(crate::api::ManagedSecretPhase::Error);
    for type_ in [ConditionType::AuditUnavailable, ConditionType::Ready] {
        let true_ = type_ == ConditionType::AuditUnavailable;
        set_condition(
            &mut status.conditions,
            condition(
                type_,
                true_,
                Reason::AuditUnavailable,
                message.clone(),
                generation,
            ),
        );
    }
    ctx.events
        .publish(base, EventType::Warning, Reason::AuditUnavailable, &message)
        .await;
    write_status(ctx, base, &status).await?;
    Ok(Action::requeue(AUDIT_RETRY))
}

/// How soon a sync held by an unwritable audit log is tried again.
const AUDIT_RETRY: Duration = Duration::from_secs(10);

/// Records a failed sync: its status, an Event, a health check when a store failed.
async fn fail(ctx: &Context, base: &ManagedSecret, failure: plan::Failure) -> Result<Action> {
    let plan::Failure { mut status, error } = failure;
    let before = base.status.clone().unwrap_or_default();
    let actor = plan::author(base, &before, ctx.config.verified_identity);
    let records = records::failure_records(base, &before, &status, &actor);
    let mut notes = vec![];
    audited(ctx, base, records, &mut status, &mut notes).await;
    ctx.events.publish_all(base, &notes).await;
    warn!(error = %error, "sync failed");
    ctx.health_checks.after(&error);
    ctx.events
        .publish(base, EventType::Warning, error.reason(), &error.to_string())
        .await;
    write_status(ctx, base, &status).await?;
    Err(error)
}

/// Writes `status` (when it changed) and remembers it.
async fn write_status(
    ctx: &Context,
    ms: &ManagedSecret,
    status: &ManagedSecretStatus,
) -> Result<()> {
    if let Some(stored) = ctx.apply_status(ms, status).await? {
        ctx.status_written(&stored);
    }
    Ok(())
}

fn with_status(ms: &ManagedSecret, status: ManagedSecretStatus) -> ManagedSecret {
    let mut ms = ms.clone();
    ms.status = Some(status);
    ms
}

/// Applies the deletionPolicy to the native Secret. The stores keep every version.
async fn cleanup(ms: &ManagedSecret, ctx: &Context) -> Result<Action> {
    ctx.status_writes.forget(ms);
    let Some(todo) = native::cleanup(ms) else {
        return Ok(Action::await_change());
    };
    let namespace = ms.namespace().unwrap_or_default();
    let name = ms.secret_name();
    let object = format!("Secret {namespace}/{name}");
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(secret) = secrets
        .get_opt(&name)
        .await
        .map_err(Error::kube(Verb::Read, object.clone()))?
    else {
        return Ok(Action::await_change());
    };
    if !native::is_managed_by(&secret, ms) {
        return Ok(Action::await_change()); // not ours (any more)
    }
    let (reason, note) = match todo {
        Cleanup::Delete => {
            secrets
                .delete(&name, &DeleteParams::default())
                .await
                .map_err(Error::kube(Verb::Delete, object))?;
            (
                Reason::SecretDeleted,
                format!("Secret {name} deleted (deletionPolicy Delete)"),
            )
        }
        Cleanup::RemoveKeys => {
            // Applying an empty intent drops every field keyhaven owns: its keys, labels, annotations.
            let empty = serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}});
            secrets
                .patch(
                    &name,
                    &PatchParams::apply(&ctx.config.field_manager).force(),
                    &Patch::Apply(&empty),
                )
                .await
                .map_err(Error::kube(Verb::Apply, object))?;
            (
                Reason::SecretKeysRemoved,
                format!("keyhaven's keys removed from Secret {name}"),
            )
        }
        Cleanup::Release => {
            // Drop our owner reference so the garbage collector leaves the Secret alone.
            let uid = ms.metadata.uid.clone().unwrap_or_default();
            let remaining: Vec<_> = secret
                .owner_references()
                .iter()
                .filter(|o| o.uid != uid)
                .cloned()
                .collect();
            let patch = serde_json::json!({"metadata": {"ownerReferences": remaining, "resourceVersion": secret.resource_version()}});
            secrets
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(Error::kube(Verb::Patch, object))?;
            (
                Reason::SecretRetained,
                format!("Secret {name} retained (deletionPolicy Retain)"),
            )
        }
    };
    let actor = ms
        .annotations()
        .get(crate::labels::DELETION_REQUESTED_BY_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| who::SYSTEM_AUTHOR.to_owned());
    let record = crate::audit::Record::new(
        crate::audit::Action::SecretRemoved,
        &actor,
        &namespace,
        &ms.name_any(),
    )
    .path(&ms.store_path())
    .reason(note.clone());
    if let Err(e) = ctx.config.audit.record(vec![record]).await {
        warn!(error = %e, "audit record of the native Secret's cleanup could not be written");
    }
    ctx.events
        .publish(ms, EventType::Normal, reason, &note)
        .await;
    Ok(Action::await_change())
}

/// The object's key in [`Context::retries`].
pub fn retry_key(ms: &ManagedSecret) -> String {
    format!(
        "ManagedSecret {}/{}",
        ms.namespace().unwrap_or_default(),
        ms.name_any()
    )
}

/// How long to wait before retrying after `error`: soon when transient, 30 s when the spec
/// must change, backing off to 5 min when the API server will refuse the same again.
pub fn error_policy(ms: Arc<ManagedSecret>, error: &Error, ctx: Arc<Context>) -> Action {
    let otherwise = if error.is_transient() {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(30)
    };
    Action::requeue(ctx.retries.after(&retry_key(&ms), error, otherwise))
}
