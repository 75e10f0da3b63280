//! Turns SecretStore objects into live backends, one per store, rebuilt when the store's
//! spec changes and shared by every reconcile that uses the store.

use crate::api::SecretStore;
use crate::backend::{Backend, InternalStore, KubernetesStore, SessionSource, VaultStore};
use crate::crypto::OperatorKeys;
use crate::error::{Error, Result};
use kube::{Client, ResourceExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Live backends by store name.
pub struct StoreRegistry {
    client: Client,
    operator_namespace: String,
    service_account: String,
    keys: OperatorKeys,
    cache: Mutex<HashMap<String, CachedBackend>>,
}

/// A live backend and what it was built from.
type CachedBackend = (BackendKey, Arc<dyn Backend>);

/// What a cached backend was built from: a new uid or generation rebuilds it.
#[derive(PartialEq, Eq, Clone)]
struct BackendKey {
    uid: Option<String>,
    generation: Option<i64>,
}

impl StoreRegistry {
    pub fn new(
        client: Client,
        operator_namespace: &str,
        service_account: &str,
        keys: OperatorKeys,
    ) -> Self {
        StoreRegistry {
            client,
            operator_namespace: operator_namespace.to_owned(),
            service_account: service_account.to_owned(),
            keys,
            cache: Mutex::default(),
        }
    }

    /// The backend of `store`, built on first use and whenever its spec changes.
    pub fn backend(&self, store: &SecretStore) -> Result<Arc<dyn Backend>> {
        let name = store.name_any();
        let key = BackendKey {
            uid: store.uid(),
            generation: store.metadata.generation,
        };
        let mut cache = self.cache.lock().expect("store registry lock");
        if let Some((k, backend)) = cache.get(&name)
            && *k == key
        {
            return Ok(backend.clone());
        }
        let backend = crate::metrics::metered(self.build(&name, store)?);
        if let Some((_, replaced)) = cache.insert(name, (key, backend.clone())) {
            tokio::spawn(async move { replaced.shutdown().await });
        }
        Ok(backend)
    }

    fn build(&self, name: &str, store: &SecretStore) -> Result<Arc<dyn Backend>> {
        let provider = &store.spec.provider;
        if provider.internal.is_some() {
            return Ok(Arc::new(InternalStore::new(
                name,
                self.client.clone(),
                &self.operator_namespace,
                self.keys.master.clone(),
            )));
        }
        if let Some(k) = &provider.kubernetes {
            return Ok(Arc::new(KubernetesStore::new(
                name,
                self.client.clone(),
                &k.namespace,
            )));
        }
        if let Some(v) = &provider.vault {
            let source = SessionSource {
                kube: self.client.clone(),
                operator_namespace: self.operator_namespace.clone(),
                service_account: self.service_account.clone(),
            };
            return Ok(Arc::new(VaultStore::new(name, v, source)?));
        }
        Err(Error::config(
            "InvalidProvider",
            format!("SecretStore {name} sets no provider"),
        ))
    }

    /// Forgets a deleted store, releasing what its backend holds.
    pub fn forget(&self, name: &str) {
        if let Some((_, backend)) = self.cache.lock().expect("store registry lock").remove(name) {
            tokio::spawn(async move { backend.shutdown().await });
        }
    }

    /// Releases what every backend holds (Vault tokens are revoked): on shutdown.
    pub async fn shutdown(&self) {
        let backends: Vec<_> = self
            .cache
            .lock()
            .expect("store registry lock")
            .drain()
            .map(|(_, (_, b))| b)
            .collect();
        futures::future::join_all(backends.iter().map(|b| b.shutdown())).await;
    }
}
