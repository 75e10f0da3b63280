//! Secret stores. One [`Backend`] trait; one module per kind of store.
//!
//! A store holds *secret objects* at *paths*; each object has numbered versions. Version
//! numbers are keyhaven's (assigned by the ManagedSecret reconciler), so a version N means
//! the same content in every store of a profile.

mod internal;
mod kubernetes;
mod pkcs11;
mod sealed_records;
mod sealed_store;
mod vault;

pub use internal::{InternalStore, MasterKey};
pub use kubernetes::KubernetesStore;
pub use pkcs11::{HsmKek, ModuleAllowList, Pkcs11Store, RotationStep};
pub use sealed_store::{SealedStore, SealingKey};
pub use vault::{SessionSource, VaultStore};

use crate::api::StorePhase;
use crate::crypto::{CryptoError, Fingerprint};
use crate::secret_data::SecretData;
use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use std::collections::BTreeMap;

/// The version number and fingerprint written with a value, and the ManagedSecret that
/// wrote it (None: written by a reader, which takes no ownership, or before owners were
/// recorded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionStamp {
    pub version: u64,
    pub fingerprint: Fingerprint,
    pub owner: Option<Owner>,
}

/// The ManagedSecret that writes a path: each store records it beside the path's
/// bookkeeping, and a second writer is refused while this one exists.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Owner {
    /// As kept in an annotation: `namespace/name/uid`.
    pub fn to_annotation(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.name, self.uid)
    }

    /// Parses [`to_annotation`](Self::to_annotation)'s form.
    pub fn from_annotation(text: &str) -> Option<Owner> {
        let mut parts = text.splitn(3, '/');
        let (namespace, name, uid) = (parts.next()?, parts.next()?, parts.next()?);
        (!namespace.is_empty() && !name.is_empty() && !uid.is_empty()).then(|| Owner {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
        })
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ManagedSecret {}/{}", self.namespace, self.name)
    }
}

/// A value read from a store, with the stamp keyhaven wrote beside it, if any (a value
/// written by someone else, e.g. by hand in Vault, has none).
#[derive(Debug)]
pub struct StoredVersion {
    pub data: SecretData,
    pub stamp: Option<VersionStamp>,
    /// The store's own version number of this value, where it has one (KV v2).
    pub store_version: Option<u64>,
}

/// A store's health as its SecretStore's phase shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub phase: StorePhase,
    pub message: String,
}

impl Health {
    pub fn active(message: impl Into<String>) -> Self {
        Health {
            phase: StorePhase::Active,
            message: message.into(),
        }
    }

    /// The health of a store whose check failed with `e`: the phase the error implies.
    pub fn failed(e: &BackendError) -> Self {
        Health {
            phase: e.phase(),
            message: e.to_string(),
        }
    }
}

/// A backend: where versions of secret objects are kept.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The SecretStore's name.
    fn store(&self) -> &str;
    /// The current value at `path` (`version: None`) or a given version; `None` when absent.
    async fn read(
        &self,
        path: &str,
        version: Option<u64>,
    ) -> Result<Option<StoredVersion>, BackendError>;
    /// Makes `stamp.version` with `data` the current version at `path`, keeping older
    /// versions. Idempotent: writing a version that exists with the same content is a no-op.
    /// Returns the store's own version number of the value, where it has one (KV v2).
    async fn write(
        &self,
        path: &str,
        stamp: &VersionStamp,
        data: &SecretData,
    ) -> Result<Option<u64>, BackendError>;
    /// The version numbers kept at `path`, ascending.
    async fn list_versions(&self, path: &str) -> Result<Vec<u64>, BackendError>;
    /// Removes every version at `path`.
    async fn delete(&self, path: &str) -> Result<(), BackendError>;
    /// Removes `versions` at `path` for good (retention): the value and keyhaven's
    /// bookkeeping of each, so that [`list_versions`](Self::list_versions) no longer lists
    /// it and a read of it finds nothing. Versions the store does not hold are skipped; the
    /// path's current version is never removed (refused with [`BackendError::Conflict`],
    /// nothing removed). Returns the versions removed, ascending.
    async fn prune(&self, path: &str, versions: &[u64]) -> Result<Vec<u64>, BackendError>;
    /// Whether the store is usable, and why not.
    async fn health(&self) -> Health;
    /// How many secret objects the store holds for keyhaven.
    async fn count(&self) -> Result<u64, BackendError>;
    /// Releases what the backend holds outside the process (a Vault token is revoked).
    async fn shutdown(&self) {}
}

/// A store operation failed. Messages name the store and path, never a value.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("store {store} is unreachable: {message}")]
    Unreachable { store: String, message: String },
    #[error("store {store} is sealed: {message}")]
    Sealed { store: String, message: String },
    #[error("store {store} is misconfigured: {message}")]
    Invalid { store: String, message: String },
    #[error("store {store}, path {path}: {source}")]
    Crypto {
        store: String,
        path: String,
        source: CryptoError,
    },
    #[error("store {store}, path {path}: {message}")]
    Conflict {
        store: String,
        path: String,
        message: String,
    },
    #[error("store {store}, path {path}: stored data is malformed: {message}")]
    Corrupt {
        store: String,
        path: String,
        message: String,
    },
    /// The object at the path is not the store's (a Secret without its labels): keyhaven
    /// neither writes over it nor deletes it.
    #[error("store {store}, path {path}: {message}")]
    Foreign {
        store: String,
        path: String,
        message: String,
    },
}

impl BackendError {
    /// The phase a store is in when one of its operations fails this way.
    pub fn phase(&self) -> StorePhase {
        match self {
            BackendError::Unreachable { .. } => StorePhase::Unreachable,
            BackendError::Sealed { .. } => StorePhase::Sealed,
            BackendError::Invalid { .. } => StorePhase::Invalid,
            _ => StorePhase::Active,
        }
    }

    /// Classifies a Kubernetes API error of a store kept in Kubernetes.
    pub(crate) fn from_kube(store: &str, what: &str, e: kube::Error) -> Self {
        let store = store.to_owned();
        match &e {
            kube::Error::Api(s) if matches!(s.code, 401 | 403) => BackendError::Invalid {
                store,
                message: format!("{what}: permission denied: {}", s.message),
            },
            kube::Error::Api(s) if s.code == 404 => BackendError::Invalid {
                store,
                message: format!("{what}: not found: {}", s.message),
            },
            kube::Error::Api(s) if s.code == 409 => BackendError::Conflict {
                store,
                path: what.to_owned(),
                message: s.message.clone(),
            },
            _ => BackendError::Unreachable {
                store,
                message: format!("{what}: {e}"),
            },
        }
    }
}

/// The label and annotation keys of the objects keyhaven's stores keep in Kubernetes, under
/// the names the stores use (the keys themselves live in [`crate::labels`]).
pub(crate) mod labels {
    pub use crate::labels::{
        FINGERPRINT_ANNOTATION, MANAGED_BY, MANAGED_BY_VALUE, OBJECT_LABEL as OBJECT,
        OWNER_ANNOTATION, PATH_ANNOTATION, ROLE_LABEL as ROLE, STORE_LABEL as STORE,
        VERSION_ANNOTATION, VERSION_LABEL as VERSION,
    };
}

/// A short, label-safe identifier of a path: hex of its SHA-256, 32 characters.
pub fn object_id(path: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(path.as_bytes())[..16])
}

/// The labels of the object a store keeps for `path` in `role`; the object of one version
/// also names its `version`.
pub(crate) fn object_labels(
    store: &str,
    path: &str,
    role: &str,
    version: Option<u64>,
) -> BTreeMap<String, String> {
    use labels::{MANAGED_BY, MANAGED_BY_VALUE, OBJECT, ROLE, STORE, VERSION};
    let mut labels = BTreeMap::from([
        (MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
        (STORE.to_owned(), store.to_owned()),
        (OBJECT.to_owned(), object_id(path)),
        (ROLE.to_owned(), role.to_owned()),
    ]);
    if let Some(v) = version {
        labels.insert(VERSION.to_owned(), v.to_string());
    }
    labels
}

/// Selects the objects a store keeps in `role`; with `path`, only that path's.
pub(crate) fn object_selector(store: &str, role: &str, path: Option<&str>) -> ListParams {
    use labels::{OBJECT, ROLE, STORE};
    let mut selector = format!("{STORE}={store},{ROLE}={role}");
    if let Some(path) = path {
        selector.push_str(&format!(",{OBJECT}={}", object_id(path)));
    }
    ListParams::default().labels(&selector)
}

/// The version an object's labels name, if they name one.
pub(crate) fn labelled_version(object_labels: &BTreeMap<String, String>) -> Option<u64> {
    object_labels.get(labels::VERSION)?.parse().ok()
}

/// The versions listed objects name, ascending.
pub(crate) fn labelled_versions(objects: &[PartialObjectMeta<Secret>]) -> Vec<u64> {
    let mut versions: Vec<u64> = objects
        .iter()
        .filter_map(|m| labelled_version(m.labels()))
        .collect();
    versions.sort_unstable();
    versions
}

/// Which of `requested` a prune at `path` removes: those the store holds (`held`),
/// ascending, each once. Refused ([`BackendError::Conflict`]) when `requested` names the
/// path's `current` version: nothing is removed then.
pub(crate) fn prune_plan(
    store: &str,
    path: &str,
    current: Option<u64>,
    held: &[u64],
    requested: &[u64],
) -> Result<Vec<u64>, BackendError> {
    if let Some(current) = current.filter(|c| requested.contains(c)) {
        return Err(BackendError::Conflict {
            store: store.to_owned(),
            path: path.to_owned(),
            message: format!("version {current} is the current version and is never pruned"),
        });
    }
    let held: std::collections::BTreeSet<u64> = held.iter().copied().collect();
    let plan: std::collections::BTreeSet<u64> = requested
        .iter()
        .copied()
        .filter(|v| held.contains(v))
        .collect();
    Ok(plan.into_iter().collect())
}

/// At most this many versions are named in one label selector (`version in (..)`), so a
/// long prune does not make an overlong request URL.
pub(crate) const VERSIONS_PER_SELECTOR: usize = 100;

/// `lp` narrowed to the objects of `versions` (a set-based selector on the version label).
pub(crate) fn with_versions(mut lp: ListParams, versions: &[u64]) -> ListParams {
    let set: Vec<String> = versions.iter().map(u64::to_string).collect();
    let narrowed = format!("{} in ({})", labels::VERSION, set.join(","));
    lp.label_selector = Some(match lp.label_selector.take() {
        Some(s) if !s.is_empty() => format!("{s},{narrowed}"),
        _ => narrowed,
    });
    lp
}

/// The owner an object's annotations record, if any.
pub(crate) fn annotated_owner(annotations: &BTreeMap<String, String>) -> Option<Owner> {
    Owner::from_annotation(annotations.get(labels::OWNER_ANNOTATION)?)
}

#[cfg(test)]
mod prune_tests {
    use super::*;

    #[test]
    fn a_prune_removes_the_held_versions_asked_for_ascending_once_each() {
        let plan = prune_plan("s", "a/b", Some(5), &[1, 2, 3, 5], &[3, 9, 1, 3]).unwrap();
        assert_eq!(plan, vec![1, 3], "9 is not held; 3 once");
        assert!(
            prune_plan("s", "a/b", Some(5), &[1, 5], &[])
                .unwrap()
                .is_empty()
        );
        assert!(prune_plan("s", "a/b", None, &[], &[1]).unwrap().is_empty());
    }

    #[test]
    fn a_prune_naming_the_current_version_is_refused_whole() {
        let e = prune_plan("s", "a/b", Some(5), &[1, 2, 5], &[1, 5]).unwrap_err();
        assert!(matches!(e, BackendError::Conflict { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "store s, path a/b: version 5 is the current version and is never pruned"
        );
    }

    #[test]
    fn version_selectors_narrow_the_object_selector() {
        let lp = with_versions(object_selector("s", "r", Some("a/b")), &[2, 10]);
        assert_eq!(
            lp.label_selector.unwrap(),
            format!(
                "{}=s,{}=r,{}={},{} in (2,10)",
                labels::STORE,
                labels::ROLE,
                labels::OBJECT,
                object_id("a/b"),
                labels::VERSION
            )
        );
    }
}

#[cfg(test)]
mod owner_tests {
    use super::Owner;

    #[test]
    fn owner_round_trips_through_an_annotation() {
        let o = Owner {
            namespace: "team-a".into(),
            name: "db".into(),
            uid: "0b9c-11".into(),
        };
        assert_eq!(Owner::from_annotation(&o.to_annotation()), Some(o));
        assert_eq!(Owner::from_annotation("team-a/db"), None);
        assert_eq!(Owner::from_annotation("//"), None);
    }
}
