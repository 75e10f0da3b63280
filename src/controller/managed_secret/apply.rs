//! The apply stage: carries a [`SyncPlan`] out in order — the source first (a version
//! exists once the source holds it), then each sync target (a failure there is reported,
//! not raised, so one store that is down does not hold back the others), the native
//! Secret, the restarts. The first failure of the others stops the sync (a workload that is
//! missing, or that RBAC forbids restarting, is reported instead).

use super::plan::{SyncPlan, TargetStep};
use super::report::Outcome;
use crate::api::{ManagedSecret, RolloutRestartTarget, WorkloadKind};
use crate::controller::context::Context;
use crate::error::{Error, Result, Verb};
use crate::labels::RESTARTED_AT_ANNOTATION;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use tracing::{info, warn};

/// Carries out `plan` for `ms`.
pub async fn apply(ms: &ManagedSecret, ctx: &Context, plan: &SyncPlan) -> Result<Outcome> {
    let mut outcome = Outcome {
        source_version: plan.source.store_version,
        ..Default::default()
    };
    if plan.source.write {
        let source = ctx.backend(&plan.source.store).await?;
        outcome.source_version = source.write(&plan.path, &plan.stamp, &plan.data).await?;
    }
    for step in &plan.targets {
        let written = match step {
            TargetStep::InSync { .. } | TargetStep::Unreadable { .. } => Ok(()),
            TargetStep::Write { store, .. } => match ctx.backend(store).await {
                Ok(target) => target
                    .write(&plan.path, &plan.stamp, &plan.data)
                    .await
                    .map(drop)
                    .map_err(Error::from),
                Err(e) => Err(e),
            },
        };
        outcome.targets.push(written);
    }
    if let Some(desired) = &plan.native.apply {
        apply_secret(ms, ctx, desired).await?;
        info!(secret = %plan.native.name, version = plan.stamp.version, "native Secret applied");
        outcome.native_written = true;
    }
    if plan.restart == super::decide::RestartDecision::Restart {
        let at = plan.now.to_string();
        let namespace = ms.namespace().unwrap_or_default();
        for target in &ms.spec.rollout_restart_targets {
            let name = format!("{:?}/{}", target.kind, target.name);
            match restart_workload(ctx, &namespace, target, &at).await? {
                Restart::Done => {
                    info!(workload = %name, version = plan.stamp.version, "rollout restarted");
                    outcome.restarted.push(name);
                }
                Restart::Missing => outcome.missing_workloads.push(name),
                Restart::Forbidden => {
                    warn!(workload = %name, version = plan.stamp.version,
                        "rollout restart forbidden: the operator may not patch it");
                    outcome.forbidden_workloads.push(name);
                }
            }
        }
    }
    if let Some(prune) = &plan.prune {
        for store in &prune.stores {
            let result = match ctx.backend(store).await {
                Ok(backend) => backend
                    .prune(&plan.path, &prune.versions)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match &result {
                Ok(removed) if !removed.is_empty() => {
                    info!(store = %store, versions = removed.len(), "old versions removed (retention)");
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(store = %store, error = %e, "retention: removing old versions failed")
                }
            }
            outcome.pruned.push(super::report::Pruned {
                store: store.clone(),
                result,
            });
        }
    }
    Ok(outcome)
}

/// Server-side applies the native Secret and notes the write, so that its watch event
/// triggers nothing.
async fn apply_secret(ms: &ManagedSecret, ctx: &Context, desired: &Secret) -> Result<()> {
    let namespace = ms.namespace().unwrap_or_default();
    let name = desired.name_any();
    let written = Api::<Secret>::namespaced(ctx.client.clone(), &namespace)
        .patch(
            &name,
            &PatchParams::apply(&ctx.config.field_manager).force(),
            &Patch::Apply(desired),
        )
        .await
        .map_err(Error::kube(
            Verb::Apply,
            format!("Secret {namespace}/{name}"),
        ))?;
    ctx.secret_writes.wrote(&written);
    Ok(())
}

/// What became of one workload's restart.
enum Restart {
    Done,
    /// The workload does not exist.
    Missing,
    /// The operator's RBAC does not let it patch the workload (403). Retrying would not
    /// help: reported, like a missing workload, and the version is recorded.
    Forbidden,
}

/// Sets the restart annotation on a workload's pod template (as `kubectl rollout restart`
/// does). Any other failure than a missing or forbidden workload is an error (retried).
async fn restart_workload(
    ctx: &Context,
    namespace: &str,
    target: &RolloutRestartTarget,
    at: &str,
) -> Result<Restart> {
    let patch = Patch::Merge(serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT_ANNOTATION: at}}}}
    }));
    let pp = PatchParams {
        field_manager: Some(ctx.config.field_manager.clone()),
        ..Default::default()
    };
    let client = ctx.client.clone();
    let result = match target.kind {
        WorkloadKind::Deployment => Api::<Deployment>::namespaced(client, namespace)
            .patch(&target.name, &pp, &patch)
            .await
            .map(drop),
        WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(client, namespace)
            .patch(&target.name, &pp, &patch)
            .await
            .map(drop),
        WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(client, namespace)
            .patch(&target.name, &pp, &patch)
            .await
            .map(drop),
    };
    match result {
        Ok(()) => Ok(Restart::Done),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Restart::Missing),
        Err(kube::Error::Api(e)) if e.code == 403 => Ok(Restart::Forbidden),
        Err(e) => Err(Error::kube(
            Verb::Patch,
            format!("{:?} {namespace}/{}", target.kind, target.name),
        )(e)),
    }
}
