//! The SecretStore reconciler: health and secret count into status.

use super::Context;
use crate::api::{SecretStore, SecretStoreStatus, StorePhase, condition, now, set_condition};
use crate::error::{Error, Result};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Status is rewritten at least this often even when nothing changed, so `lastChecked` stays meaningful.
const STATUS_HEARTBEAT: Duration = Duration::from_secs(300);

pub async fn reconcile(store: Arc<SecretStore>, ctx: Arc<Context>) -> Result<Action> {
    let span = tracing::info_span!("reconcile", kind = "SecretStore", name = %store.name_any());
    async move {
        let (phase, message, secrets) = match ctx.stores_registry.backend(&store) {
            Ok(backend) => {
                let health = backend.health().await;
                let count = if health.phase == StorePhase::Active { backend.count().await.ok() } else { None };
                (health.phase, health.message, count.or(store.status.as_ref().and_then(|s| s.secrets)))
            }
            Err(e) => (StorePhase::Invalid, e.to_string(), None),
        };
        let previous = store.status.clone().unwrap_or_default();
        let mut status = SecretStoreStatus {
            phase: Some(phase),
            type_: Some(store.spec.provider_type().into()),
            secrets,
            message: Some(message.clone()),
            last_checked: previous.last_checked.clone(),
            observed_generation: store.metadata.generation,
            conditions: previous.conditions.clone(),
        };
        let reason = if phase == StorePhase::Active { "Active".to_owned() } else { phase.as_str().to_owned() };
        set_condition(&mut status.conditions, condition("Ready", phase == StorePhase::Active, &reason, message.clone(), store.metadata.generation));
        let stale = previous.last_checked.as_ref().is_none_or(|t| {
            jiff::Timestamp::now().duration_since(t.0).unsigned_abs() > STATUS_HEARTBEAT
        });
        if previous.phase != Some(phase) {
            let type_ = if phase == StorePhase::Active { EventType::Normal } else { EventType::Warning };
            ctx.event(store.as_ref(), type_, phase.as_str(), &message).await;
        }
        if status != previous || stale {
            status.last_checked = Some(now());
            let body = serde_json::json!({"apiVersion": SecretStore::api_version(&()), "kind": SecretStore::kind(&()), "status": status});
            let api: Api<SecretStore> = Api::all(ctx.client.clone());
            api.patch_status(&store.name_any(), &PatchParams::apply(&ctx.config.field_manager).force(), &Patch::Apply(&body)).await?;
        }
        Ok(Action::requeue(if phase == StorePhase::Active { Duration::from_secs(60) } else { Duration::from_secs(10) }))
    }
    .instrument(span)
    .await
}

pub fn error_policy(_store: Arc<SecretStore>, _error: &Error, _ctx: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(10))
}
