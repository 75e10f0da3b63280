//! The store removal guard: a SecretStore carries the finalizer [`STORE_FINALIZER`]; while
//! VaultProfiles still name it (as source, sync target or migrateFrom), or ManagedSecrets
//! still keep versions in it (after a source switch without migration), its deletion is
//! held, and its status says which profiles and how many secret objects it holds. The annotation
//! `keyhaven.io/force-delete: "true"` lets it go anyway (the store's data is left where it is).

use super::context::Context;
use crate::api::{ConditionType, Reason, SecretStore, condition, set_condition};
use crate::error::{Error, Result, Verb};
use crate::labels::{FORCE_DELETE_ANNOTATION, STORE_FINALIZER};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use std::time::Duration;

/// What the guard decides for a store (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum Guard {
    /// Not being deleted, finalizer present: reconcile as usual.
    Proceed,
    /// Not being deleted and without the finalizer: add it, then reconcile as usual.
    AddFinalizer,
    /// Being deleted and nothing holds it (or forced): remove the finalizer.
    Release,
    /// Being deleted while these profiles reference it, or this many ManagedSecrets keep
    /// versions in it.
    Hold(Vec<String>, usize),
    /// Being deleted, the finalizer already gone: nothing to do.
    Gone,
}

/// Decides for a store with these `finalizers`, `deleting` or not, `forced` or not, named by
/// the profiles `referencing`, holding versions of `holders` ManagedSecrets.
pub fn decide(
    finalizers: &[String],
    deleting: bool,
    forced: bool,
    mut referencing: Vec<String>,
    holders: usize,
) -> Guard {
    let has = finalizers.iter().any(|f| f == STORE_FINALIZER);
    match (deleting, has) {
        (false, true) => Guard::Proceed,
        (false, false) => Guard::AddFinalizer,
        (true, false) => Guard::Gone,
        (true, true) if forced || (referencing.is_empty() && holders == 0) => Guard::Release,
        (true, true) => {
            referencing.sort();
            Guard::Hold(referencing, holders)
        }
    }
}

/// The profiles naming the store `name` (as source, sync target or migrateFrom), read from
/// the API server, and how many ManagedSecrets keep versions in it.
async fn users(name: &str, ctx: &Context) -> Result<(Vec<String>, usize)> {
    let referencing = ctx
        .caches
        .list_profiles(&ctx.client)
        .await?
        .into_iter()
        .filter(|p| {
            p.spec.stores().any(|s| s == name) || p.spec.migrate_from.as_deref() == Some(name)
        })
        .map(|p| p.name_any())
        .collect();
    let holders = ctx
        .caches
        .managed
        .state()
        .iter()
        .filter(|ms| {
            ms.status
                .as_ref()
                .is_some_and(|s| s.versions.iter().any(|r| r.store == name))
        })
        .count();
    Ok((referencing, holders))
}

/// Runs the guard; `Some(action)` ends the reconcile there (the store is being deleted).
pub async fn guard(store: &SecretStore, ctx: &Context) -> Result<Option<Action>> {
    let name = store.name_any();
    let deleting = store.meta().deletion_timestamp.is_some();
    let forced = store
        .annotations()
        .get(FORCE_DELETE_ANNOTATION)
        .is_some_and(|v| v == "true");
    let (referencing, holders) = if deleting {
        users(&name, ctx).await?
    } else {
        (vec![], 0)
    };
    let api: Api<SecretStore> = Api::all(ctx.client.clone());
    let finalizers = store.finalizers().to_vec();
    match decide(&finalizers, deleting, forced, referencing, holders) {
        Guard::Proceed => Ok(None),
        Guard::AddFinalizer => {
            let mut list = finalizers;
            list.push(STORE_FINALIZER.into());
            set_finalizers(&api, store, list).await?;
            Ok(None)
        }
        Guard::Gone => Ok(Some(Action::await_change())),
        Guard::Release => {
            let list = finalizers
                .into_iter()
                .filter(|f| f != STORE_FINALIZER)
                .collect();
            set_finalizers(&api, store, list).await?;
            ctx.registry.forget(&name);
            if forced {
                ctx.events
                    .publish(
                        store,
                        EventType::Warning,
                        Reason::ForceDeleted,
                        &format!("SecretStore {name} released by {FORCE_DELETE_ANNOTATION}"),
                    )
                    .await;
            }
            Ok(Some(Action::await_change()))
        }
        Guard::Hold(profiles, holders) => {
            let held = store
                .status
                .as_ref()
                .and_then(|s| s.secrets)
                .map_or_else(String::new, |n| format!(" holds {n} secret object(s);"));
            let mut why = vec![];
            if !profiles.is_empty() {
                why.push(format!(
                    "it is referenced by VaultProfile(s) {} (remove it from them)",
                    profiles.join(", ")
                ));
            }
            if holders > 0 {
                why.push(format!("{holders} ManagedSecret(s) keep versions in it (move them with a profile's migrateFrom)"));
            }
            let mut message = format!(
                "deletion held: SecretStore {name}{held} {}; or annotate it {FORCE_DELETE_ANNOTATION}=true",
                why.join(" and ")
            );
            crate::api::clamp_text(&mut message, crate::api::MAX_MESSAGE);
            let mut status = store.status.clone().unwrap_or_default();
            let before = status.message.clone();
            status.message = Some(message.clone());
            set_condition(
                &mut status.conditions,
                condition(
                    ConditionType::DeletionBlocked,
                    true,
                    Reason::InUseByProfiles,
                    message.clone(),
                    store.metadata.generation,
                ),
            );
            if before.as_deref() != Some(message.as_str()) {
                ctx.apply_status(store, &status).await?;
                ctx.events
                    .publish(store, EventType::Warning, Reason::DeletionBlocked, &message)
                    .await;
            }
            Ok(Some(Action::requeue(Duration::from_secs(10))))
        }
    }
}

/// Replaces the finalizer list, guarded by the resourceVersion the decision was made on.
async fn set_finalizers(
    api: &Api<SecretStore>,
    store: &SecretStore,
    list: Vec<String>,
) -> Result<()> {
    let patch = serde_json::json!({"metadata": {"finalizers": list, "resourceVersion": store.resource_version()}});
    api.patch(
        &store.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(Error::kube(
        Verb::Patch,
        format!("the finalizers of SecretStore {}", store.name_any()),
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let with = vec!["other".to_owned(), STORE_FINALIZER.to_owned()];
        let without = vec!["other".to_owned()];
        assert_eq!(decide(&with, false, false, vec![], 0), Guard::Proceed);
        assert_eq!(
            decide(&without, false, false, vec![], 0),
            Guard::AddFinalizer
        );
        assert_eq!(
            decide(&without, true, false, vec!["p".into()], 0),
            Guard::Gone
        );
        assert_eq!(decide(&with, true, false, vec![], 0), Guard::Release);
        assert_eq!(
            decide(&with, true, false, vec!["b".into(), "a".into()], 0),
            Guard::Hold(vec!["a".into(), "b".into()], 0)
        );
        // Versions left behind by a source switch hold it too.
        assert_eq!(
            decide(&with, true, false, vec![], 3),
            Guard::Hold(vec![], 3)
        );
        assert_eq!(
            decide(&with, true, true, vec!["a".into()], 3),
            Guard::Release
        );
    }
}
