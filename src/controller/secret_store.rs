//! The SecretStore reconciler: health and secret count into status; for pkcs11 stores,
//! one step of a KEK rotation per reconcile while one is under way.

use super::context::Context;
use crate::api::{
    ConditionType, KekRotationPhase, KekRotationStatus, MigrationPhase, Reason, SecretStore,
    SecretStoreSpec, SecretStoreStatus, StorePhase, condition, now, remove_condition,
    set_condition,
};
use crate::error::{Error, Result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use std::sync::Arc;
use std::time::Duration;
use tracing::{Instrument, warn};

/// Status is rewritten at least this often even when nothing changed, so `lastChecked` stays meaningful.
const STATUS_HEARTBEAT: Duration = Duration::from_secs(300);
/// The pause between two steps of a KEK rotation that made progress.
const ROTATION_STEP: Duration = Duration::from_millis(200);

pub async fn reconcile(store: Arc<SecretStore>, ctx: Arc<Context>) -> Result<Action> {
    let span = tracing::info_span!("reconcile", kind = "SecretStore", name = %store.name_any());
    async move {
        if let Some(action) = super::store_guard::guard(&store, &ctx).await? {
            return Ok(action);
        }
        let (phase, mut message, secrets) = health(&store, &ctx).await;
        let previous = store.status.clone().unwrap_or_default();
        let rotation = if phase == StorePhase::Active {
            rotate_kek(&store, &ctx, &previous).await
        } else {
            None
        };
        let (active_kek, kek_rotation) = match &rotation {
            Some(r) => (r.active_kek.clone(), r.status.clone()),
            None => (previous.active_kek.clone(), previous.kek_rotation.clone()),
        };
        if let Some(r) = kek_rotation
            .as_ref()
            .filter(|r| r.phase == KekRotationPhase::Rotating)
        {
            message = format!(
                "{message}; KEK rotation to {:?}: {}/{} data keys re-wrapped",
                r.to, r.rewrapped, r.total
            );
        }
        crate::api::clamp_text(&mut message, crate::api::MAX_MESSAGE);
        let mut status = SecretStoreStatus {
            phase: Some(phase),
            type_: Some(store.spec.provider_type().into()),
            secrets,
            message: Some(message.clone()),
            last_checked: previous.last_checked.clone(),
            observed_generation: store.metadata.generation,
            conditions: previous.conditions.clone(),
            active_kek,
            kek_rotation,
        };
        set_condition(
            &mut status.conditions,
            condition(
                ConditionType::Ready,
                phase == StorePhase::Active,
                Reason::from(phase),
                message.clone(),
                store.metadata.generation,
            ),
        );
        match insecure(&store.spec, store.metadata.generation) {
            Some(c) => set_condition(&mut status.conditions, c),
            None => remove_condition(&mut status.conditions, ConditionType::Insecure),
        }
        let stale = previous.last_checked.as_ref().is_none_or(|t| {
            jiff::Timestamp::now().duration_since(t.0).unsigned_abs() > STATUS_HEARTBEAT
        });
        if previous.phase != Some(phase) {
            let type_ = if matches!(phase, StorePhase::Active | StorePhase::Draining) {
                EventType::Normal
            } else {
                EventType::Warning
            };
            ctx.events
                .publish(store.as_ref(), type_, Reason::from(phase), &message)
                .await;
        }
        rotation_events(&store, &ctx, previous.kek_rotation.as_ref(), &status).await;
        if status != previous || stale {
            status.last_checked = Some(now());
            ctx.apply_status(store.as_ref(), &status).await?;
        }
        Ok(Action::requeue(match rotation {
            Some(r) if r.rotating && r.progressed => ROTATION_STEP,
            // Stuck on records that cannot be re-wrapped now: try again later.
            Some(r) if r.rotating => Duration::from_secs(10),
            // A draining store's count falls as the migration goes: show it.
            _ if phase == StorePhase::Draining => Duration::from_secs(3),
            _ if phase == StorePhase::Active => Duration::from_secs(60),
            _ => Duration::from_secs(10),
        }))
    }
    .instrument(span)
    .await
}

/// The store's phase, why, and how many secret objects it holds: its backend's health,
/// Draining while a profile's migration empties it.
async fn health(store: &SecretStore, ctx: &Context) -> (StorePhase, String, Option<u64>) {
    let (phase, message, secrets) = match ctx.registry.backend(store) {
        Ok(backend) => {
            let health = backend.health().await;
            let count = if health.phase == StorePhase::Active {
                backend.count().await.ok()
            } else {
                None
            };
            (
                health.phase,
                health.message,
                count.or(store.status.as_ref().and_then(|s| s.secrets)),
            )
        }
        Err(e) => (StorePhase::Invalid, e.to_string(), None),
    };
    match draining(&store.name_any(), &ctx.caches.profiles.state()) {
        Some(drain) if phase == StorePhase::Active => (
            StorePhase::Draining,
            format!(
                "{message}; being emptied into store {} by VaultProfile {} (migrateFrom): {} secret object(s) left",
                drain.to,
                drain.profile,
                secrets.unwrap_or_default()
            ),
            secrets,
        ),
        _ => (phase, message, secrets),
    }
}

/// `Insecure=True` (reason `PlaintextHTTP`) for a vault store allowed to talk plaintext
/// `http://` (`insecureHTTP`); None for every other store (the condition is removed).
fn insecure(spec: &SecretStoreSpec, generation: Option<i64>) -> Option<Condition> {
    let v = spec.provider.vault.as_ref()?;
    (v.is_plaintext() && v.insecure_http).then(|| {
        condition(
            ConditionType::Insecure,
            true,
            Reason::PlaintextHTTP,
            format!(
                "provider.vault.insecureHTTP: the server {} is plaintext http://: the Vault \
                 token and secret values cross the network unencrypted; use https:// outside \
                 development",
                v.server
            ),
            generation,
        )
    })
}

/// A migration emptying a store.
struct Drain {
    profile: String,
    to: String,
}

/// The migration emptying the store `name`, if one is under way: a profile whose
/// `migrateFrom` names it and whose migration is not Complete.
fn draining(name: &str, profiles: &[Arc<crate::api::VaultProfile>]) -> Option<Drain> {
    profiles.iter().find_map(|p| {
        let complete = p
            .status
            .as_ref()
            .and_then(|s| s.migration.as_ref())
            .is_some_and(|m| {
                m.from == name && m.to == p.spec.source && m.phase == MigrationPhase::Complete
            });
        (p.spec.migrate_from.as_deref() == Some(name) && !complete).then(|| Drain {
            profile: p.name_any(),
            to: p.spec.source.clone(),
        })
    })
}

/// What a KEK rotation step means for the status and the next reconcile.
struct Rotation {
    active_kek: Option<String>,
    status: Option<KekRotationStatus>,
    rotating: bool,
    progressed: bool,
}

/// One step of the KEK rotation of a pkcs11 store (None for other stores). A failure
/// keeps the previous rotation status and is retried at the next reconcile.
async fn rotate_kek(
    store: &SecretStore,
    ctx: &Context,
    previous: &SecretStoreStatus,
) -> Option<Rotation> {
    let backend = match ctx.registry.pkcs11(store) {
        Ok(b) => b?,
        Err(e) => {
            warn!(error = %e, "KEK rotation: no backend");
            return None;
        }
    };
    match backend
        .rotate(
            previous.active_kek.as_deref(),
            previous.kek_rotation.as_ref(),
        )
        .await
    {
        Ok(step) => Some(Rotation {
            active_kek: Some(backend.kek_label().to_owned()),
            rotating: step.rotating(),
            progressed: step.progressed,
            status: step.status,
        }),
        Err(e) => {
            warn!(error = %e, "KEK rotation step failed");
            Some(Rotation {
                active_kek: previous.active_kek.clone(),
                status: previous.kek_rotation.clone(),
                rotating: true,
                progressed: false,
            })
        }
    }
}

/// Events when a rotation starts and when it completes.
async fn rotation_events(
    store: &SecretStore,
    ctx: &Context,
    before: Option<&KekRotationStatus>,
    status: &SecretStoreStatus,
) {
    let Some(now) = status.kek_rotation.as_ref() else {
        return;
    };
    let same_rotation = before.is_some_and(|b| b.to == now.to && b.started_at == now.started_at);
    let was = before.filter(|_| same_rotation).map(|b| b.phase);
    if now.phase == KekRotationPhase::Rotating && was.is_none() {
        let note = format!(
            "re-wrapping {} data key(s) from {} to key-encryption key {:?}",
            now.total,
            now.from.join(", "),
            now.to
        );
        ctx.events
            .publish(store, EventType::Normal, Reason::KekRotationStarted, &note)
            .await;
    }
    if now.phase == KekRotationPhase::Complete && was != Some(KekRotationPhase::Complete) {
        let note = format!(
            "every data key is wrapped by key-encryption key {:?}; unused by this store now: {} (kept on the token: delete once no backup needs them)",
            now.to,
            now.unused_keys.join(", ")
        );
        ctx.events
            .publish(store, EventType::Normal, Reason::KekRotationComplete, &note)
            .await;
    }
}

/// The object's key in [`Context::retries`].
pub fn retry_key(store: &SecretStore) -> String {
    format!("SecretStore {}", store.name_any())
}

/// Every 10 s; backing off to 5 min when the API server will refuse the same again.
pub fn error_policy(store: Arc<SecretStore>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = retry_key(&store);
    Action::requeue(ctx.retries.after(&key, error, Duration::from_secs(10)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault(server: &str, insecure_http: bool) -> SecretStoreSpec {
        serde_json::from_value(serde_json::json!({"provider": {"vault": {
            "server": server, "insecureHTTP": insecure_http,
            "auth": {"kubernetes": {"role": "r"}}}}}))
        .unwrap()
    }

    #[test]
    fn a_plaintext_vault_store_is_marked_insecure() {
        let c = insecure(&vault("http://127.0.0.1:8200", true), Some(3)).unwrap();
        assert_eq!(c.type_, "Insecure");
        assert_eq!(c.status, "True");
        assert_eq!(c.reason, "PlaintextHTTP");
        assert_eq!(c.observed_generation, Some(3));
        assert!(
            c.message.contains("http://127.0.0.1:8200") && c.message.contains("unencrypted"),
            "{}",
            c.message
        );
        // Refused (Invalid) without the flag: not marked, the Ready condition says why.
        assert!(insecure(&vault("http://127.0.0.1:8200", false), None).is_none());
        assert!(insecure(&vault("https://vault:8200", false), None).is_none());
        let internal: SecretStoreSpec =
            serde_json::from_value(serde_json::json!({"provider": {"internal": {}}})).unwrap();
        assert!(insecure(&internal, None).is_none());
    }
}
