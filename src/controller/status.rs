//! Status writes of every kind: one server-side apply of the whole status under the
//! operator's field manager, skipped when nothing changed (an idle reconcile writes nothing).
//! Every status is first cut to its CRD schema's bounds (a long error message or user name
//! is shortened, never a reason for the API server to refuse the write).

use crate::api::ClampToSchema;
use crate::error::{Error, Result, Verb};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// A kind whose status keyhaven writes.
pub trait HasStatus: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug {
    type Status: Serialize + PartialEq + Clone + Default + ClampToSchema;
    /// The status as the object holds it.
    fn status(&self) -> Option<&Self::Status>;
    /// The API of this object's kind (in its namespace, for a namespaced kind).
    fn api(&self, client: Client) -> Api<Self>;
}

impl HasStatus for crate::api::ManagedSecret {
    type Status = crate::api::ManagedSecretStatus;
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
    fn api(&self, client: Client) -> Api<Self> {
        Api::namespaced(client, &self.namespace().unwrap_or_default())
    }
}

impl HasStatus for crate::api::VaultProfile {
    type Status = crate::api::VaultProfileStatus;
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
    fn api(&self, client: Client) -> Api<Self> {
        Api::all(client)
    }
}

impl HasStatus for crate::api::SecretStore {
    type Status = crate::api::SecretStoreStatus;
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
    fn api(&self, client: Client) -> Api<Self> {
        Api::all(client)
    }
}

/// The server-side apply body of a whole status.
pub fn body<K: HasStatus>(status: &K::Status) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    })
}

/// Writes `status`, cut to its schema's bounds, onto `obj` unless `obj` already holds it;
/// returns the object as stored after the write (None when nothing was written).
pub async fn apply<K: HasStatus>(
    client: &Client,
    field_manager: &str,
    obj: &K,
    status: &K::Status,
) -> Result<Option<K>> {
    let mut status = status.clone();
    status.clamp_to_schema();
    let status = &status;
    if obj.status() == Some(status) {
        return Ok(None);
    }
    let name = obj.name_any();
    let stored = obj
        .api(client.clone())
        .patch_status(
            &name,
            &PatchParams::apply(field_manager).force(),
            &Patch::Apply(&body::<K>(status)),
        )
        .await
        .map_err(Error::kube(Verb::ApplyStatus, describe(obj)))?;
    Ok(Some(stored))
}

/// The status as the API server holds it (not a cache).
pub async fn read<K: HasStatus>(client: &Client, obj: &K) -> Result<K::Status> {
    let stored = obj
        .api(client.clone())
        .get_status(&obj.name_any())
        .await
        .map_err(Error::kube(Verb::ReadStatus, describe(obj)))?;
    Ok(stored.status().cloned().unwrap_or_default())
}

/// `Kind namespace/name`, or `Kind name` for a cluster-scoped object.
pub fn describe<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    match obj.meta().namespace.as_deref() {
        Some(ns) => format!("{} {ns}/{}", K::kind(&()), obj.name_any()),
        None => format!("{} {}", K::kind(&()), obj.name_any()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ManagedSecret, ManagedSecretPhase, ManagedSecretStatus, SecretStore};

    #[test]
    fn the_body_names_the_kind_and_holds_only_the_status() {
        let status = ManagedSecretStatus {
            phase: Some(ManagedSecretPhase::Synced),
            ..Default::default()
        };
        let body = body::<ManagedSecret>(&status);
        assert_eq!(body["apiVersion"], "keyhaven.io/v1alpha1");
        assert_eq!(body["kind"], "ManagedSecret");
        assert_eq!(body["status"]["phase"], "Synced");
        assert_eq!(body.as_object().unwrap().len(), 3);
    }

    #[test]
    fn describes_namespaced_and_cluster_objects() {
        let ms: ManagedSecret = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": "a", "namespace": "n"},
            "spec": {"type": "generic", "content": {"fromStore": {}}},
        }))
        .unwrap();
        assert_eq!(describe(&ms), "ManagedSecret n/a");
        let store: SecretStore = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "SecretStore",
            "metadata": {"name": "s"}, "spec": {"provider": {"internal": {}}},
        }))
        .unwrap();
        assert_eq!(describe(&store), "SecretStore s");
    }
}
