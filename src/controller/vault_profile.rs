//! The VaultProfile reconciler: Ready when its source and sync targets exist and are Active;
//! condition `Conflict` when it is a default (or the fallback) together with another profile.

use super::Context;
use crate::api::{
    ManagedSecret, MigrationStatus, StorePhase, VaultProfile, VaultProfileSpec, VaultProfileStatus,
    condition, set_condition,
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
        if !ctx.managed_synced.load(std::sync::atomic::Ordering::SeqCst) {
            // The counts and the migration's progress come from the ManagedSecret cache.
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        let mut problems = Vec::new();
        for name in profile.spec.stores().chain(profile.spec.migrate_from.as_deref()) {
            let problem = match ctx.secret_store(name).await? {
                None => Some(format!("SecretStore {name} does not exist")),
                Some(s) => match s.status.as_ref().and_then(|st| st.phase) {
                    Some(StorePhase::Active | StorePhase::Draining) => None,
                    Some(phase) => Some(format!("SecretStore {name} is {}", phase.as_str())),
                    None => Some(format!("SecretStore {name} has not been checked yet")),
                },
            };
            problems.extend(problem);
        }
        let name = profile.name_any();
        let managed = ctx.managed.state();
        let mine: Vec<&ManagedSecret> = managed.iter().map(|ms| ms.as_ref()).filter(|ms| uses(ms, &name)).collect();
        let secrets = mine.len() as u64;
        let migration = migration_progress(&profile.spec, &mine);
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
            migration: migration.clone(),
            conditions: previous.conditions.clone(),
        };
        migration_events(&profile, &ctx, previous.migration.as_ref(), migration.as_ref()).await;
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
        let migrating = migration.is_some_and(|m| m.phase != COMPLETE);
        Ok(Action::requeue(Duration::from_secs(match (migrating, ready) {
            (true, _) => 3,
            (false, true) => 60,
            (false, false) => 10,
        })))
    }
    .instrument(span)
    .await
}

const COMPLETE: &str = "Complete";

/// Where the migration `spec.migrateFrom` asks for stands, from the status of the
/// profile's ManagedSecrets.
pub fn migration_progress(
    spec: &VaultProfileSpec,
    secrets: &[&ManagedSecret],
) -> Option<MigrationStatus> {
    let from = spec.migrate_from.clone()?;
    let (mut moved, mut failed, mut versions_moved) = (0, 0, 0);
    for ms in secrets {
        let Some(status) = ms.status.as_ref() else {
            continue;
        };
        versions_moved += status
            .versions
            .iter()
            .filter(|r| r.moved_from.as_deref() == Some(from.as_str()))
            .count() as u64;
        if !super::migration::pending(Some(status), &from) {
            moved += 1;
        } else if status.conditions.iter().any(|c| {
            c.type_ == super::migration::CONDITION && c.status == "False" && c.reason != "Moving"
        }) {
            failed += 1;
        }
    }
    let total = secrets.len() as u64;
    let phase = if moved == total {
        COMPLETE
    } else if moved + failed == total {
        "Failed"
    } else {
        "Migrating"
    };
    Some(MigrationStatus {
        to: spec.source.clone(),
        from,
        phase: phase.into(),
        total,
        moved,
        failed,
        versions_moved,
    })
}

/// Events when a migration starts, completes, or has failures left.
async fn migration_events(
    profile: &VaultProfile,
    ctx: &Context,
    before: Option<&MigrationStatus>,
    now: Option<&MigrationStatus>,
) {
    let Some(now) = now else { return };
    let same = before.filter(|b| b.from == now.from && b.to == now.to);
    if same.is_none() {
        let note = format!(
            "moving the versions of {} secret(s) from store {} to store {}",
            now.total, now.from, now.to
        );
        ctx.event(profile, EventType::Normal, "MigrationStarted", &note)
            .await;
    }
    if same.is_none_or(|b| b.phase != now.phase) {
        match now.phase.as_str() {
            COMPLETE => {
                let note = format!(
                    "{} secret(s), {} version(s) moved from store {} to store {}, each verified by fingerprint; {} holds none of them now",
                    now.moved, now.versions_moved, now.from, now.to, now.from
                );
                ctx.event(profile, EventType::Normal, "MigrationComplete", &note)
                    .await;
            }
            "Failed" => {
                let note = format!(
                    "{} of {} secret(s) could not be moved from store {} (their condition Migrated says why); retrying",
                    now.failed, now.total, now.from
                );
                ctx.event(profile, EventType::Warning, "MigrationFailed", &note)
                    .await;
            }
            _ => {}
        }
    }
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
