//! Turns SecretStore objects into live backends, one per store, rebuilt when the store's
//! spec changes and shared by every reconcile that uses the store.

use crate::api::{Reason, SecretStore};
use crate::backend::{
    Backend, InternalStore, KubernetesStore, ModuleAllowList, Pkcs11Store, SessionSource,
    VaultStore,
};
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
    /// The PKCS#11 modules pkcs11 stores may load (`--pkcs11-modules`).
    pkcs11_modules: ModuleAllowList,
    cache: Mutex<HashMap<String, CachedBackend>>,
    /// The pkcs11 backends again, typed: their KEK rotation is driven by the SecretStore
    /// reconciler, which the `Backend` trait knows nothing of.
    pkcs11: Mutex<HashMap<String, (BackendKey, Arc<Pkcs11Store>)>>,
}

/// A live backend and what it was built from.
type CachedBackend = (BackendKey, Arc<dyn Backend>);

/// What a cached backend was built from: a new uid or generation rebuilds it.
#[derive(PartialEq, Eq, Clone)]
struct BackendKey {
    uid: Option<String>,
    generation: Option<i64>,
}

impl BackendKey {
    fn of(store: &SecretStore) -> Self {
        BackendKey {
            uid: store.uid(),
            generation: store.metadata.generation,
        }
    }
}

impl StoreRegistry {
    pub fn new(
        client: Client,
        operator_namespace: &str,
        service_account: &str,
        keys: OperatorKeys,
        pkcs11_modules: ModuleAllowList,
    ) -> Self {
        StoreRegistry {
            client,
            operator_namespace: operator_namespace.to_owned(),
            service_account: service_account.to_owned(),
            keys,
            pkcs11_modules,
            cache: Mutex::default(),
            pkcs11: Mutex::default(),
        }
    }

    /// The backend of `store`, built on first use and whenever its spec changes.
    pub fn backend(&self, store: &SecretStore) -> Result<Arc<dyn Backend>> {
        let name = store.name_any();
        let key = BackendKey::of(store);
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
            kubernetes_namespace_allowed(name, &k.namespace, &self.operator_namespace)?;
            return Ok(Arc::new(KubernetesStore::new(
                name,
                self.client.clone(),
                &k.namespace,
            )));
        }
        if let Some(p) = &provider.pkcs11 {
            let backend = Arc::new(Pkcs11Store::new(
                name,
                self.client.clone(),
                &self.operator_namespace,
                p,
                &self.pkcs11_modules,
            )?);
            self.pkcs11
                .lock()
                .expect("store registry lock")
                .insert(name.to_owned(), (BackendKey::of(store), backend.clone()));
            return Ok(backend);
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
            Reason::InvalidProvider,
            format!("SecretStore {name} sets no provider"),
        ))
    }

    /// The pkcs11 backend of `store`, when it is a pkcs11 store (built like [`Self::backend`]).
    pub fn pkcs11(&self, store: &SecretStore) -> Result<Option<Arc<Pkcs11Store>>> {
        if store.spec.provider.pkcs11.is_none() {
            return Ok(None);
        }
        self.backend(store)?;
        let key = BackendKey::of(store);
        Ok(self
            .pkcs11
            .lock()
            .expect("store registry lock")
            .get(&store.name_any())
            .filter(|(k, _)| *k == key)
            .map(|(_, b)| b.clone()))
    }

    /// Forgets a deleted store, releasing what its backend holds.
    pub fn forget(&self, name: &str) {
        self.pkcs11
            .lock()
            .expect("store registry lock")
            .remove(name);
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

/// A kubernetes store may not keep its Secrets in the operator's namespace: the operator's
/// master and fingerprint keys (`keyhaven-keys`) and the sealed stores' records live there,
/// and a store over it would let whoever may use the store read or overwrite them.
fn kubernetes_namespace_allowed(
    store: &str,
    namespace: &str,
    operator_namespace: &str,
) -> Result<()> {
    if namespace == operator_namespace {
        return Err(Error::config(
            Reason::InvalidProvider,
            format!(
                "SecretStore {store}: provider.kubernetes.namespace {namespace} is the operator's \
                 namespace, which holds its keys and the sealed stores' records; \
                 a kubernetes store must use another namespace"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubernetes_store_may_not_use_the_operators_namespace() {
        assert!(kubernetes_namespace_allowed("k", "team-secrets", "keyhaven-system").is_ok());
        let refused =
            kubernetes_namespace_allowed("k", "keyhaven-system", "keyhaven-system").unwrap_err();
        assert_eq!(refused.reason(), Reason::InvalidProvider);
        let text = refused.to_string();
        assert!(
            text.starts_with("SecretStore k: provider.kubernetes.namespace keyhaven-system is the operator's namespace"),
            "{text}"
        );
    }
}
