//! One [`Backend`] for every store whose versions are [`SealedRecords`] in the operator's
//! namespace: the internal store and the pkcs11 store differ only in the key that seals
//! their data keys, which a [`SealingKey`] supplies.

use super::sealed_records::SealedRecords;
use super::{Backend, BackendError, Health, StoredVersion, VersionStamp};
use crate::crypto::KeyWrapper;
use crate::secret_data::SecretData;
use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use std::sync::Arc;

/// The key-encryption key of a [`SealedStore`], as the store sees it.
#[async_trait]
pub trait SealingKey: Send + Sync {
    /// The key that wraps the store's data keys.
    fn wrapper(&self) -> Arc<dyn KeyWrapper>;
    /// Whether the key can be used now; if so, what the store's health message says once
    /// its records' namespace answers too.
    async fn check(&self, store: &str) -> Result<String, BackendError>;
}

/// A store that keeps each version as a sealed record, its data key wrapped by `K`.
pub struct SealedStore<K> {
    pub(super) store: String,
    pub(super) records: SealedRecords,
    pub(super) key: K,
}

impl<K: SealingKey> SealedStore<K> {
    /// The store `store`, keeping its records in `namespace`, sealed under `key`.
    pub(super) fn with_key(store: &str, client: Client, namespace: &str, key: K) -> Self {
        SealedStore {
            store: store.to_owned(),
            records: SealedRecords::new(
                store,
                Api::<Secret>::namespaced(client, namespace),
                key.wrapper(),
            ),
            key,
        }
    }
}

#[async_trait]
impl<K: SealingKey> Backend for SealedStore<K> {
    fn store(&self) -> &str {
        &self.store
    }

    async fn read(
        &self,
        path: &str,
        version: Option<u64>,
    ) -> Result<Option<StoredVersion>, BackendError> {
        self.records.read(path, version).await
    }

    async fn write(
        &self,
        path: &str,
        stamp: &VersionStamp,
        data: &SecretData,
    ) -> Result<Option<u64>, BackendError> {
        // Sealed records have no version numbers of their own.
        self.records.write(path, stamp, data).await.map(|()| None)
    }

    async fn list_versions(&self, path: &str) -> Result<Vec<u64>, BackendError> {
        self.records.list_versions(path).await
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        self.records.delete(path).await
    }

    async fn prune(&self, path: &str, versions: &[u64]) -> Result<Vec<u64>, BackendError> {
        self.records.prune(path, versions).await
    }

    /// The key first (a sealed store is Sealed before anything else), then the records'
    /// namespace.
    async fn health(&self) -> Health {
        let checked = match self.key.check(&self.store).await {
            Ok(message) => self.records.probe().await.map(|()| message),
            Err(e) => Err(e),
        };
        match checked {
            Ok(message) => Health::active(message),
            Err(e) => Health::failed(&e),
        }
    }

    async fn count(&self) -> Result<u64, BackendError> {
        self.records.count().await
    }
}
