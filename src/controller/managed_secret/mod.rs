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
mod report;
mod who;
#[cfg(test)]
mod who_tests;

pub use crate::labels::CLEANUP_FINALIZER as FINALIZER;

use super::context::Context;
use crate::api::{ManagedSecret, ManagedSecretStatus, Reason};
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
            match apply::apply(ms, ctx, &plan).await {
                Ok(outcome) => {
                    if plan.decision == decide::VersionDecision::New(plan.stamp.version) {
                        ctx.metrics.version_written(&plan.profile);
                    }
                    let report = report::report(ms, &plan, &outcome);
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
        Plan::Hold(hold) => {
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

/// Records a failed sync: its status, an Event, a health check when a store failed.
async fn fail(ctx: &Context, base: &ManagedSecret, failure: plan::Failure) -> Result<Action> {
    let plan::Failure { status, error } = failure;
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
