//! The kubernetes store: plain Secrets in a namespace of the operator's cluster.
//!
//! The current value of a path lives in a Secret named after it (`apps/db` → `apps.db`;
//! paths that cannot name a Secret use `kh-<hash>`), so a user can create one by hand and
//! a ManagedSecret can read it with `fromStore`. Each version keyhaven writes is also kept
//! in an immutable copy `<name>.v<N>`.

use super::labels::*;
use super::{
    Backend, BackendError, Health, StoredVersion, VersionStamp, labelled_versions, object_id,
    object_labels, object_selector,
};
use crate::crypto::Fingerprint;
use crate::secret_data::SecretData;
use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};
use std::collections::BTreeMap;

const ROLE_CURRENT: &str = "current";
const ROLE_HISTORY: &str = "history";

/// Plain Secrets in one namespace.
pub struct KubernetesStore {
    store: String,
    namespace: String,
    secrets: Api<Secret>,
    namespaces: Api<Namespace>,
}

impl KubernetesStore {
    pub fn new(store: &str, client: Client, namespace: &str) -> Self {
        KubernetesStore {
            store: store.to_owned(),
            namespace: namespace.to_owned(),
            secrets: Api::namespaced(client.clone(), namespace),
            namespaces: Api::all(client),
        }
    }

    fn err(&self, what: &'static str) -> impl Fn(kube::Error) -> BackendError + '_ {
        move |e| BackendError::from_kube(&self.store, what, e)
    }
}

/// The Secret name of a path's current value: the path with `/` as `.` when that is a valid
/// name, `kh-<hash>` otherwise. At most 240 characters, leaving room for `.v<N>`.
pub fn secret_name_for_path(path: &str) -> String {
    let label_ok = |seg: &str| {
        !seg.is_empty()
            && seg
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !seg.starts_with('-')
            && !seg.ends_with('-')
    };
    if path.len() <= 240 && path.split('/').all(label_ok) {
        path.replace('/', ".")
    } else {
        format!("kh-{}", object_id(path))
    }
}

fn to_data(data: &SecretData) -> BTreeMap<String, ByteString> {
    data.iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.to_vec())))
        .collect()
}

fn from_secret(secret: &Secret) -> StoredVersion {
    let data = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    let annotations = secret.annotations();
    let version = annotations
        .get(VERSION_ANNOTATION)
        .and_then(|v| v.parse().ok());
    let fingerprint = annotations
        .get(FINGERPRINT_ANNOTATION)
        .and_then(|f| Fingerprint::parse(f));
    let stamp = version
        .zip(fingerprint)
        .map(|(version, fingerprint)| VersionStamp {
            version,
            fingerprint,
        });
    StoredVersion {
        data,
        stamp,
        store_version: None,
    }
}

#[async_trait]
impl Backend for KubernetesStore {
    fn store(&self) -> &str {
        &self.store
    }

    async fn read(
        &self,
        path: &str,
        version: Option<u64>,
    ) -> Result<Option<StoredVersion>, BackendError> {
        let name = secret_name_for_path(path);
        let current = self
            .secrets
            .get_opt(&name)
            .await
            .map_err(self.err("reading the current Secret"))?;
        let Some(version) = version else {
            return Ok(current.as_ref().map(from_secret));
        };
        if let Some(stored) = current.as_ref().map(from_secret)
            && stored.stamp.as_ref().is_some_and(|s| s.version == version)
        {
            return Ok(Some(stored));
        }
        let copy = self
            .secrets
            .get_opt(&format!("{name}.v{version}"))
            .await
            .map_err(self.err("reading a version copy"))?;
        Ok(copy.as_ref().map(from_secret))
    }

    async fn write(
        &self,
        path: &str,
        stamp: &VersionStamp,
        data: &SecretData,
    ) -> Result<Option<u64>, BackendError> {
        let name = secret_name_for_path(path);
        let annotations = BTreeMap::from([
            (PATH_ANNOTATION.to_owned(), path.to_owned()),
            (VERSION_ANNOTATION.to_owned(), stamp.version.to_string()),
            (
                FINGERPRINT_ANNOTATION.to_owned(),
                stamp.fingerprint.to_string(),
            ),
        ]);
        // The immutable copy of the version first, so the history never lags the current value.
        let copy = Secret {
            metadata: ObjectMeta {
                name: Some(format!("{name}.v{}", stamp.version)),
                labels: Some(object_labels(
                    &self.store,
                    path,
                    ROLE_HISTORY,
                    Some(stamp.version),
                )),
                annotations: Some(annotations.clone()),
                ..Default::default()
            },
            immutable: Some(true),
            data: Some(to_data(data)),
            ..Default::default()
        };
        match self.secrets.create(&PostParams::default(), &copy).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {} // written before a restart: immutable, same version
            Err(e) => {
                return Err(BackendError::from_kube(
                    &self.store,
                    "writing a version copy",
                    e,
                ));
            }
        }
        // Then the current value: replaced whole, so keys edited in by hand are repaired.
        let existing = self
            .secrets
            .get_opt(&name)
            .await
            .map_err(self.err("reading the current Secret"))?;
        let mut current = existing.clone().unwrap_or_default();
        current.metadata.name = Some(name.clone());
        current
            .metadata
            .labels
            .get_or_insert_default()
            .extend(object_labels(&self.store, path, ROLE_CURRENT, None));
        current
            .metadata
            .annotations
            .get_or_insert_default()
            .extend(annotations);
        current.data = Some(to_data(data));
        current.string_data = None;
        if existing.is_some() {
            self.secrets
                .replace(&name, &PostParams::default(), &current)
                .await
                .map_err(self.err("replacing the current Secret"))?;
        } else {
            self.secrets
                .create(&PostParams::default(), &current)
                .await
                .map_err(self.err("creating the current Secret"))?;
        }
        Ok(None)
    }

    async fn list_versions(&self, path: &str) -> Result<Vec<u64>, BackendError> {
        let lp = object_selector(&self.store, ROLE_HISTORY, Some(path));
        let list = self
            .secrets
            .list_metadata(&lp)
            .await
            .map_err(self.err("listing version copies"))?;
        Ok(labelled_versions(&list.items))
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        let lp = object_selector(&self.store, ROLE_HISTORY, Some(path));
        self.secrets
            .delete_collection(&DeleteParams::default(), &lp)
            .await
            .map_err(self.err("deleting version copies"))?;
        match self
            .secrets
            .delete(&secret_name_for_path(path), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(BackendError::from_kube(
                &self.store,
                "deleting the current Secret",
                e,
            )),
        }
    }

    async fn health(&self) -> Health {
        match self.namespaces.get_opt(&self.namespace).await {
            Ok(Some(_)) => match self
                .secrets
                .list_metadata(&ListParams::default().limit(1))
                .await
            {
                Ok(_) => Health::active(format!("namespace {} is reachable", self.namespace)),
                Err(e) => {
                    Health::failed(&BackendError::from_kube(&self.store, "listing Secrets", e))
                }
            },
            Ok(None) => Health {
                phase: crate::api::StorePhase::Invalid,
                message: format!("namespace {} does not exist", self.namespace),
            },
            Err(e) => Health::failed(&BackendError::from_kube(
                &self.store,
                "reading the namespace",
                e,
            )),
        }
    }

    async fn count(&self) -> Result<u64, BackendError> {
        let lp = object_selector(&self.store, ROLE_CURRENT, None);
        let list = self
            .secrets
            .list_metadata(&lp)
            .await
            .map_err(self.err("counting Secrets"))?;
        Ok(list.items.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_for_paths() {
        assert_eq!(secret_name_for_path("apps/payments/db"), "apps.payments.db");
        assert_eq!(secret_name_for_path("team-a/db"), "team-a.db");
        for odd in ["Apps/DB", "a_b/c", "a//b", "-a/b", "a/b.", &"x".repeat(241)] {
            let name = secret_name_for_path(odd);
            assert!(
                name.starts_with("kh-") && name.len() == 35,
                "{odd:?} -> {name}"
            );
        }
        assert_ne!(secret_name_for_path("A/b"), secret_name_for_path("a_b"));
    }
}
