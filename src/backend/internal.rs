//! The internal store: envelope-encrypted versions in Secrets of the operator's namespace,
//! data keys wrapped by the operator's master key.

use super::BackendError;
use super::sealed_store::{SealedStore, SealingKey};
use crate::crypto::KeyWrapper;
use async_trait::async_trait;
use kube::Client;
use std::sync::Arc;

/// keyhaven's own software-encrypted store.
pub type InternalStore = SealedStore<MasterKey>;

/// The internal store's key: the operator's master key, held in memory.
pub struct MasterKey(Arc<dyn KeyWrapper>);

#[async_trait]
impl SealingKey for MasterKey {
    fn wrapper(&self) -> Arc<dyn KeyWrapper> {
        self.0.clone()
    }

    /// A key in memory is always usable: the store is as healthy as its records' namespace.
    async fn check(&self, _store: &str) -> Result<String, BackendError> {
        Ok("encrypted records in the operator namespace are reachable".into())
    }
}

impl InternalStore {
    /// The store `store`, keeping its records in `namespace`, sealed under `master`.
    pub fn new(store: &str, client: Client, namespace: &str, master: Arc<dyn KeyWrapper>) -> Self {
        SealedStore::with_key(store, client, namespace, MasterKey(master))
    }
}
