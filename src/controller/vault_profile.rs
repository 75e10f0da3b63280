//! The VaultProfile reconciler: Ready when its source and sync targets exist and are Active;
//! condition `Conflict` when it is a default (or the fallback) together with another profile.

use super::Context;
use crate::api::{
    ManagedSecret, StorePhase, VaultProfile, VaultProfileStatus, condition, set_condition,
};
use crate::error::{Error, Result};
use crate::profiles::{NamespaceInfo, conflicts};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

pub async fn reconcile(profile: Arc<VaultProfile>, ctx: Arc<Context>) -> Result<Action> {
    let span = tracing::info_span!("reconcile", kind = "VaultProfile", name = %profile.name_any());
    async move {
        let mut problems = Vec::new();
        for name in profile.spec.stores() {
            let problem = match ctx.secret_store(name).await? {
                None => Some(format!("SecretStore {name} does not exist")),
                Some(s) => match s.status.as_ref().and_then(|st| st.phase) {
                    Some(StorePhase::Active) => None,
                    Some(phase) => Some(format!("SecretStore {name} is {}", phase.as_str())),
                    None => Some(format!("SecretStore {name} has not been checked yet")),
                },
            };
            problems.extend(problem);
        }
        let name = profile.name_any();
        let secrets = ctx.managed.state().iter().filter(|ms: &&Arc<ManagedSecret>| uses(ms, &name)).count() as u64;
        let ready = problems.is_empty();
        let mut message = if ready { "source and sync targets are Active".to_owned() } else { problems.join("; ") };
        let namespaces: Vec<NamespaceInfo> = ctx.namespaces.state().iter().map(|ns| NamespaceInfo::from_meta(&ns.metadata)).collect();
        let all = ctx.profiles.state();
        let conflicts = conflicts(&profile, &namespaces, all.iter().map(|p| p.as_ref()));
        for c in &conflicts {
            message = format!("{message}; {}", c.message);
        }
        let previous = profile.status.clone().unwrap_or_default();
        let mut status = VaultProfileStatus {
            phase: Some(if ready { "Ready" } else { "NotReady" }.into()),
            message: Some(message.clone()),
            secrets: Some(secrets),
            observed_generation: profile.metadata.generation,
            conditions: previous.conditions.clone(),
        };
        let reason = if ready { "StoresActive" } else { "StoresNotActive" };
        set_condition(&mut status.conditions, condition("Ready", ready, reason, message, profile.metadata.generation));
        let conflict = match conflicts.as_slice() {
            [] => condition("Conflict", false, "NoConflict", "no other default or fallback profile overlaps this one", profile.metadata.generation),
            [one, ..] => {
                let c = condition("Conflict", true, one.reason, conflicts.iter().map(|c| c.message.as_str()).collect::<Vec<_>>().join("; "), profile.metadata.generation);
                if previous.conditions.iter().find(|c| c.type_ == "Conflict").is_none_or(|p| p.status != "True" || p.message != c.message) {
                    ctx.event(profile.as_ref(), EventType::Warning, one.reason, &c.message).await;
                }
                c
            }
        };
        set_condition(&mut status.conditions, conflict);
        if status != previous {
            let body = serde_json::json!({"apiVersion": VaultProfile::api_version(&()), "kind": VaultProfile::kind(&()), "status": status});
            let api: Api<VaultProfile> = Api::all(ctx.client.clone());
            api.patch_status(&name, &PatchParams::apply(&ctx.config.field_manager).force(), &Patch::Apply(&body)).await?;
        }
        Ok(Action::requeue(Duration::from_secs(if ready { 60 } else { 10 })))
    }
    .instrument(span)
    .await
}

/// Whether `ms` uses the profile `name` (named in its spec, or resolved to it).
fn uses(ms: &ManagedSecret, name: &str) -> bool {
    match &ms.spec.profile {
        Some(p) => p == name,
        None => ms.status.as_ref().and_then(|s| s.profile.as_deref()) == Some(name),
    }
}

pub fn error_policy(_profile: Arc<VaultProfile>, _error: &Error, _ctx: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(10))
}
