//! The internal store: envelope-encrypted versions in Secrets of the operator's namespace,
//! data keys wrapped by the operator's master key.

use super::sealed_records::SealedRecords;
use super::{Backend, BackendError, Health, StoredVersion, VersionStamp};
use crate::crypto::KeyWrapper;
use crate::secret_data::SecretData;
use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use std::sync::Arc;

/// keyhaven's own software-encrypted store.
pub struct InternalStore {
    store: String,
    records: SealedRecords,
}

impl InternalStore {
    /// The store `store`, keeping its records in `namespace`, sealed under `master`.
    pub fn new(store: &str, client: Client, namespace: &str, master: Arc<dyn KeyWrapper>) -> Self {
        InternalStore {
            store: store.to_owned(),
            records: SealedRecords::new(
                store,
                Api::<Secret>::namespaced(client, namespace),
                master,
            ),
        }
    }
}

#[async_trait]
impl Backend for InternalStore {
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
        self.records.write(path, stamp, data).await.map(|()| None)
    }

    async fn list_versions(&self, path: &str) -> Result<Vec<u64>, BackendError> {
        self.records.list_versions(path).await
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        self.records.delete(path).await
    }

    async fn health(&self) -> Health {
        match self.records.probe().await {
            Ok(()) => Health::active("encrypted records in the operator namespace are reachable"),
            Err(e) => Health {
                phase: e.phase(),
                message: e.to_string(),
            },
        }
    }

    async fn count(&self) -> Result<u64, BackendError> {
        self.records.count().await
    }
}
