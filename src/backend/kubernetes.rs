//! The kubernetes store: plain Secrets in a namespace of the operator's cluster.
//!
//! The current value of a path lives in a Secret named after it (`apps/db` → `apps.db`;
//! paths that cannot name a Secret use `kh-<hash>`), so a user can create one by hand and
//! a ManagedSecret can read it with `fromStore`. Each version keyhaven writes is also kept
//! in an immutable copy `<name>.v<N>`.
//!
//! The store touches only its own Secrets: those carrying its labels ([`is_store_secret`]).
//! Any other Secret at a path's name reads as absent and is never replaced or deleted, so
//! a store over a namespace cannot be used to read or overwrite what else lives there.

use super::labels::*;
use super::{
    Backend, BackendError, Health, StoredVersion, VERSIONS_PER_SELECTOR, VersionStamp,
    annotated_owner, labelled_versions, object_id, object_labels, object_selector, prune_plan,
    with_versions,
};
use crate::crypto::Fingerprint;
use crate::secret_data::SecretData;
use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use std::collections::BTreeMap;

const ROLE_CURRENT: &str = "current";
const ROLE_HISTORY: &str = "history";

/// Whether a Secret with `labels` is the store `store`'s object for `path` in `role`: it
/// carries the store's labels (`app.kubernetes.io/managed-by: keyhaven` and
/// `keyhaven.io/store: <store>`, all a Secret made by hand for keyhaven needs), and the
/// object and role labels keyhaven writes, where present, name this path and role.
pub fn is_store_secret(
    labels: &BTreeMap<String, String>,
    store: &str,
    path: &str,
    role: &str,
) -> bool {
    let is = |key: &str, value: &str| labels.get(key).is_some_and(|v| v == value);
    let absent_or = |key: &str, value: &str| labels.get(key).is_none_or(|v| v == value);
    is(MANAGED_BY, MANAGED_BY_VALUE)
        && is(STORE, store)
        && absent_or(OBJECT, &super::object_id(path))
        && absent_or(ROLE, role)
}

/// Selects the store's own Secrets in `role` (with `path`: that path's): the object
/// selector, narrowed to Secrets keyhaven manages.
fn store_selector(store: &str, role: &str, path: Option<&str>) -> ListParams {
    let mut lp = object_selector(store, role, path);
    lp.label_selector = lp
        .label_selector
        .map(|s| format!("{MANAGED_BY}={MANAGED_BY_VALUE},{s}"));
    lp
}

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

    /// The Secret `name`, if it exists, and whether it is this store's object for `path`
    /// in `role` ([`is_store_secret`]).
    async fn existing(
        &self,
        name: &str,
        path: &str,
        role: &str,
        what: &'static str,
    ) -> Result<Option<(Secret, bool)>, BackendError> {
        let found = self.secrets.get_opt(name).await.map_err(self.err(what))?;
        Ok(found.map(|secret| {
            let ours = is_store_secret(secret.labels(), &self.store, path, role);
            (secret, ours)
        }))
    }

    /// The Secret `name` when it is this store's object for `path` in `role`: any other
    /// Secret reads as absent.
    async fn own(
        &self,
        name: &str,
        path: &str,
        role: &str,
        what: &'static str,
    ) -> Result<Option<Secret>, BackendError> {
        Ok(match self.existing(name, path, role, what).await? {
            Some((secret, true)) => Some(secret),
            Some((_, false)) => {
                tracing::debug!(store = %self.store, path, secret = name,
                    "a Secret without the store's labels reads as absent");
                None
            }
            None => None,
        })
    }

    /// The refusal to carry out `operation` on the Secret `name` of `path`, not the store's.
    fn foreign(&self, path: &str, name: &str, operation: &str) -> BackendError {
        refusal(&self.store, &self.namespace, path, name, operation)
    }
}

/// The refusal to carry out `operation` (e.g. "writing") at `path` of the store `store`,
/// whose Secret `namespace/name` is not the store's: names the store, the path, the Secret
/// and the labels it lacks; never a value.
fn refusal(store: &str, namespace: &str, path: &str, name: &str, operation: &str) -> BackendError {
    BackendError::Foreign {
        store: store.to_owned(),
        path: path.to_owned(),
        message: format!(
            "{operation}: Secret {namespace}/{name} exists without the store's labels \
             ({MANAGED_BY}={MANAGED_BY_VALUE}, {STORE}={store}); keyhaven leaves it as it is"
        ),
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
            owner: annotated_owner(annotations),
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
            .own(&name, path, ROLE_CURRENT, "reading the current Secret")
            .await?;
        let Some(version) = version else {
            return Ok(current.as_ref().map(from_secret));
        };
        if let Some(stored) = current.as_ref().map(from_secret)
            && stored.stamp.as_ref().is_some_and(|s| s.version == version)
        {
            return Ok(Some(stored));
        }
        let copy = self
            .own(
                &format!("{name}.v{version}"),
                path,
                ROLE_HISTORY,
                "reading a version copy",
            )
            .await?;
        Ok(copy.as_ref().map(from_secret))
    }

    async fn write(
        &self,
        path: &str,
        stamp: &VersionStamp,
        data: &SecretData,
    ) -> Result<Option<u64>, BackendError> {
        let name = secret_name_for_path(path);
        // A Secret at the name that is not the store's stops the write before anything is
        // written. The replace below carries this read's resourceVersion, so a Secret
        // swapped in meanwhile is not overwritten either.
        let existing = self
            .existing(&name, path, ROLE_CURRENT, "reading the current Secret")
            .await?;
        let existing = match existing {
            Some((_, false)) => return Err(self.foreign(path, &name, "writing")),
            Some((secret, true)) => Some(secret),
            None => None,
        };
        let mut annotations = BTreeMap::from([
            (PATH_ANNOTATION.to_owned(), path.to_owned()),
            (VERSION_ANNOTATION.to_owned(), stamp.version.to_string()),
            (
                FINGERPRINT_ANNOTATION.to_owned(),
                stamp.fingerprint.to_string(),
            ),
        ]);
        // A reader's write (no owner) keeps the owner the current Secret records.
        let owner = stamp.owner.clone().or_else(|| {
            existing
                .as_ref()
                .and_then(|e| annotated_owner(e.annotations()))
        });
        if let Some(owner) = owner {
            annotations.insert(OWNER_ANNOTATION.to_owned(), owner.to_annotation());
        }
        // The immutable copy of the version first, so the history never lags the current value.
        let copy_name = format!("{name}.v{}", stamp.version);
        let copy = Secret {
            metadata: ObjectMeta {
                name: Some(copy_name.clone()),
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
            // Written before a restart (immutable, same version), unless it is not the store's.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let found = self
                    .existing(&copy_name, path, ROLE_HISTORY, "reading a version copy")
                    .await?;
                if let Some((_, false)) = found {
                    return Err(self.foreign(path, &copy_name, "writing a version copy"));
                }
            }
            Err(e) => {
                return Err(BackendError::from_kube(
                    &self.store,
                    "writing a version copy",
                    e,
                ));
            }
        }
        // Then the current value: replaced whole, so keys edited in by hand are repaired.
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
        let lp = store_selector(&self.store, ROLE_HISTORY, Some(path));
        let list = self
            .secrets
            .list_metadata(&lp)
            .await
            .map_err(self.err("listing version copies"))?;
        Ok(labelled_versions(&list.items))
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        let name = secret_name_for_path(path);
        // Refused before anything goes when the current Secret is not the store's.
        let current = match self
            .existing(&name, path, ROLE_CURRENT, "reading the current Secret")
            .await?
        {
            Some((_, false)) => return Err(self.foreign(path, &name, "deleting")),
            Some((secret, true)) => Some(secret),
            None => None,
        };
        let lp = store_selector(&self.store, ROLE_HISTORY, Some(path));
        self.secrets
            .delete_collection(&DeleteParams::default(), &lp)
            .await
            .map_err(self.err("deleting version copies"))?;
        let Some(current) = current else {
            return Ok(());
        };
        // Only the Secret just checked: one swapped in meanwhile fails the precondition.
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: current.metadata.uid.clone(),
                resource_version: current.metadata.resource_version.clone(),
            }),
            ..DeleteParams::default()
        };
        match self.secrets.delete(&name, &dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(BackendError::from_kube(
                &self.store,
                "deleting the current Secret",
                e,
            )),
        }
    }

    /// Deletes the version copies of `versions` (the current Secret stays as it is). The
    /// current version is the one the current Secret records or, without one, the latest
    /// copy. One read and one list (at once), then one delete of a collection (per 100
    /// versions).
    async fn prune(&self, path: &str, versions: &[u64]) -> Result<Vec<u64>, BackendError> {
        if versions.is_empty() {
            return Ok(Vec::new());
        }
        let name = secret_name_for_path(path);
        let (current, held) = tokio::join!(
            self.own(&name, path, ROLE_CURRENT, "reading the current Secret"),
            self.list_versions(path)
        );
        let held = held?;
        let current = current?
            .and_then(|c| c.annotations().get(VERSION_ANNOTATION)?.parse().ok())
            .or_else(|| held.last().copied());
        let plan = prune_plan(&self.store, path, current, &held, versions)?;
        for chunk in plan.chunks(VERSIONS_PER_SELECTOR) {
            let lp = with_versions(store_selector(&self.store, ROLE_HISTORY, Some(path)), chunk);
            self.secrets
                .delete_collection(&DeleteParams::default(), &lp)
                .await
                .map_err(self.err("pruning version copies"))?;
        }
        Ok(plan)
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
        let lp = store_selector(&self.store, ROLE_CURRENT, None);
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

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_secrets_with_the_stores_labels_are_the_stores() {
        let path = "team-a/db";
        // What the store writes is its own, in the role it was written in.
        let current = object_labels("kstore", path, ROLE_CURRENT, None);
        assert!(is_store_secret(&current, "kstore", path, ROLE_CURRENT));
        let copy = object_labels("kstore", path, ROLE_HISTORY, Some(3));
        assert!(is_store_secret(&copy, "kstore", path, ROLE_HISTORY));
        assert!(!is_store_secret(&copy, "kstore", path, ROLE_CURRENT));
        // Made by hand for keyhaven: the two store labels are enough.
        let by_hand = labels(&[(MANAGED_BY, MANAGED_BY_VALUE), (STORE, "kstore")]);
        assert!(is_store_secret(&by_hand, "kstore", path, ROLE_CURRENT));

        let refused = [
            ("no labels", labels(&[])),
            (
                "another tool's",
                labels(&[(MANAGED_BY, "helm"), (STORE, "kstore")]),
            ),
            ("no managed-by", labels(&[(STORE, "kstore")])),
            ("no store", labels(&[(MANAGED_BY, MANAGED_BY_VALUE)])),
            (
                "another store's",
                object_labels("other", path, ROLE_CURRENT, None),
            ),
            (
                "another path's",
                object_labels("kstore", "team-b/db", ROLE_CURRENT, None),
            ),
            (
                "an empty store label",
                labels(&[(MANAGED_BY, MANAGED_BY_VALUE), (STORE, "")]),
            ),
        ];
        for (what, l) in refused {
            assert!(!is_store_secret(&l, "kstore", path, ROLE_CURRENT), "{what}");
        }
    }

    #[test]
    fn a_refusal_names_the_store_the_path_and_the_secret() {
        let e = refusal("kstore", "team-x", "team-a/db", "team-a.db", "writing");
        assert_eq!(
            e.to_string(),
            "store kstore, path team-a/db: writing: Secret team-x/team-a.db exists without the \
             store's labels (app.kubernetes.io/managed-by=keyhaven, keyhaven.io/store=kstore); \
             keyhaven leaves it as it is"
        );
        assert_eq!(
            e.phase(),
            crate::api::StorePhase::Active,
            "the store stays usable"
        );
    }

    #[test]
    fn the_stores_selectors_ask_for_keyhavens_secrets_only() {
        let lp = store_selector("kstore", ROLE_HISTORY, Some("a/b"));
        assert_eq!(
            lp.label_selector.as_deref(),
            Some(
                format!(
                    "{MANAGED_BY}={MANAGED_BY_VALUE},{STORE}=kstore,{ROLE}=history,{OBJECT}={}",
                    object_id("a/b")
                )
                .as_str()
            )
        );
        let count = store_selector("kstore", ROLE_CURRENT, None);
        assert_eq!(
            count.label_selector.as_deref(),
            Some(format!("{MANAGED_BY}={MANAGED_BY_VALUE},{STORE}=kstore,{ROLE}=current").as_str())
        );
    }
}
