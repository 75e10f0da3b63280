//! The internal store: envelope-encrypted versions in Secrets of the operator's namespace,
//! data keys wrapped by the operator's master key.

use super::sealed_records::SealedRecords;
use super::{BackendError, Health, StoredVersion, VersionStamp};
use crate::crypto::KeyWrapper;
use crate::secret_data::SecretData;
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

super::sealed_records::sealed_store_backend!(
    InternalStore,
    async fn health(&self) -> Health {
        match self.records.probe().await {
            Ok(()) => Health::active("encrypted records in the operator namespace are reachable"),
            Err(e) => Health::failed(&e),
        }
    }
);
