//! Turns SecretStore objects into live backends, one per store, rebuilt when the store's
//! spec changes and shared by every reconcile that uses the store.

use crate::api::{Reason, SecretStore, SecretStoreSpec};
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
    /// Where credential and CA refs may point besides the operator's namespace.
    credential_namespaces: CredentialNamespaces,
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
        credential_namespaces: CredentialNamespaces,
    ) -> Self {
        StoreRegistry {
            client,
            operator_namespace: operator_namespace.to_owned(),
            service_account: service_account.to_owned(),
            keys,
            pkcs11_modules,
            credential_namespaces,
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
        credential_namespaces_allowed(
            name,
            &store.spec,
            &self.operator_namespace,
            &self.credential_namespaces,
        )?;
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

/// The namespaces besides its own the operator may read credentials and CA bundles from
/// (`--credential-namespaces`). Empty (the default): only its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredentialNamespaces(Vec<String>);

/// The longest list `--credential-namespaces` may give.
const MAX_CREDENTIAL_NAMESPACES: usize = 64;

impl CredentialNamespaces {
    /// The list from the flag's entries (comma-separated on the command line): each a
    /// namespace name; empty entries are skipped, repeats dropped.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> std::result::Result<Self, String> {
        let mut names: Vec<String> = vec![];
        for entry in entries.iter().map(|e| e.as_ref().trim()) {
            if entry.is_empty() {
                continue;
            }
            let label = entry.len() <= 63
                && entry
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !entry.starts_with('-')
                && !entry.ends_with('-');
            if !label {
                return Err(format!(
                    "--credential-namespaces: {entry:?} is not a namespace name"
                ));
            }
            if !names.iter().any(|n| n == entry) {
                names.push(entry.to_owned());
            }
        }
        if names.len() > MAX_CREDENTIAL_NAMESPACES {
            return Err(format!(
                "--credential-namespaces: {} namespaces, at most {MAX_CREDENTIAL_NAMESPACES}",
                names.len()
            ));
        }
        Ok(CredentialNamespaces(names))
    }

    /// The namespaces on the list.
    pub fn namespaces(&self) -> &[String] {
        &self.0
    }
}

/// Every ref of a store's spec to a credential or a CA bundle: the field, and the namespace
/// it names (`None`: the operator's, the default).
fn credential_refs(spec: &SecretStoreSpec) -> Vec<(&'static str, Option<&str>)> {
    let mut refs = vec![];
    if let Some(v) = &spec.provider.vault {
        let auth = &v.auth;
        if let Some(r) = &auth.token_secret_ref {
            refs.push(("provider.vault.auth.tokenSecretRef", r.namespace.as_deref()));
        }
        if let Some(a) = &auth.app_role {
            if let Some(r) = &a.role_ref {
                refs.push((
                    "provider.vault.auth.appRole.roleRef",
                    r.namespace.as_deref(),
                ));
            }
            refs.push((
                "provider.vault.auth.appRole.secretRef",
                a.secret_ref.namespace.as_deref(),
            ));
        }
        if let Some(r) = auth
            .kubernetes
            .as_ref()
            .and_then(|k| k.service_account_ref.as_ref())
        {
            refs.push((
                "provider.vault.auth.kubernetes.serviceAccountRef",
                r.namespace.as_deref(),
            ));
        }
        if let Some(ca) = &v.ca_provider {
            refs.push(("provider.vault.caProvider", ca.namespace.as_deref()));
        }
    }
    if let Some(p) = &spec.provider.pkcs11 {
        refs.push((
            "provider.pkcs11.pinSecretRef",
            p.pin_secret_ref.namespace.as_deref(),
        ));
    }
    refs
}

/// Credentials (tokens, AppRole ids, HSM PINs, the ServiceAccount Vault sees) and CA
/// bundles are read from the operator's namespace, or from one on `--credential-namespaces`:
/// whoever may write a SecretStore must not make the operator read, with its own identity,
/// a Secret of any namespace it can reach and present it to a server of their choosing.
/// The first ref naming another namespace is refused; the message says which ref, which
/// namespace and how to allow it.
fn credential_namespaces_allowed(
    store: &str,
    spec: &SecretStoreSpec,
    operator_namespace: &str,
    allowed: &CredentialNamespaces,
) -> Result<()> {
    for (field, namespace) in credential_refs(spec) {
        let Some(ns) = namespace.filter(|ns| *ns != operator_namespace) else {
            continue;
        };
        if allowed.0.iter().any(|a| a == ns) {
            continue;
        }
        let listed = if allowed.0.is_empty() {
            "empty".to_owned()
        } else {
            allowed.0.join(", ")
        };
        return Err(Error::config(
            Reason::CredentialNamespaceNotAllowed,
            format!(
                "SecretStore {store}: {field} names namespace {ns}; credentials and CA bundles \
                 are read from the operator's namespace {operator_namespace} only, or from a \
                 namespace on the operator's --credential-namespaces list \
                 (KEYHAVEN_CREDENTIAL_NAMESPACES, chart value credentialNamespaces; now: \
                 {listed}): move the object to {operator_namespace} or add {ns} to the list"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(provider: serde_json::Value) -> SecretStoreSpec {
        serde_json::from_value(serde_json::json!({ "provider": provider })).unwrap()
    }

    fn vault(auth: serde_json::Value, ca_namespace: Option<&str>) -> SecretStoreSpec {
        let mut v = serde_json::json!({"server": "https://vault:8200", "auth": auth});
        if let Some(ns) = ca_namespace {
            v["caProvider"] = serde_json::json!({"type": "ConfigMap", "name": "ca", "namespace": ns, "key": "ca.crt"});
        }
        spec(serde_json::json!({ "vault": v }))
    }

    const OP: &str = "keyhaven-system";

    #[test]
    fn credential_refs_default_to_and_may_name_the_operators_namespace() {
        let none = CredentialNamespaces::default();
        for s in [
            vault(
                serde_json::json!({"tokenSecretRef": {"name": "t", "key": "token"}}),
                None,
            ),
            vault(
                serde_json::json!({"tokenSecretRef": {"name": "t", "namespace": OP, "key": "token"}}),
                Some(OP),
            ),
            vault(serde_json::json!({"kubernetes": {"role": "r"}}), None),
            spec(
                serde_json::json!({"pkcs11": {"module": "/m.so", "tokenLabel": "t",
                "kekLabel": "k", "pinSecretRef": {"name": "pin", "key": "pin"}}}),
            ),
            spec(serde_json::json!({"kubernetes": {"namespace": "team-secrets"}})),
            spec(serde_json::json!({"internal": {}})),
        ] {
            assert!(
                credential_namespaces_allowed("s", &s, OP, &none).is_ok(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn every_credential_and_ca_ref_naming_another_namespace_is_refused() {
        let none = CredentialNamespaces::default();
        let cases = [
            (
                vault(
                    serde_json::json!({"tokenSecretRef": {"name": "t", "namespace": "team-a", "key": "token"}}),
                    None,
                ),
                "provider.vault.auth.tokenSecretRef",
            ),
            (
                vault(
                    serde_json::json!({"appRole": {"roleRef": {"name": "r", "namespace": "team-a", "key": "id"},
                        "secretRef": {"name": "s", "key": "id"}}}),
                    None,
                ),
                "provider.vault.auth.appRole.roleRef",
            ),
            (
                vault(
                    serde_json::json!({"appRole": {"roleId": "r",
                        "secretRef": {"name": "s", "namespace": "team-a", "key": "id"}}}),
                    None,
                ),
                "provider.vault.auth.appRole.secretRef",
            ),
            (
                vault(
                    serde_json::json!({"kubernetes": {"role": "r",
                        "serviceAccountRef": {"name": "sa", "namespace": "team-a"}}}),
                    None,
                ),
                "provider.vault.auth.kubernetes.serviceAccountRef",
            ),
            (
                vault(
                    serde_json::json!({"kubernetes": {"role": "r"}}),
                    Some("team-a"),
                ),
                "provider.vault.caProvider",
            ),
            (
                spec(
                    serde_json::json!({"pkcs11": {"module": "/m.so", "tokenLabel": "t",
                    "kekLabel": "k", "pinSecretRef": {"name": "pin", "namespace": "team-a", "key": "pin"}}}),
                ),
                "provider.pkcs11.pinSecretRef",
            ),
        ];
        let allowed = CredentialNamespaces::parse(&["team-a"]).unwrap();
        let others = CredentialNamespaces::parse(&["team-b", "team-c"]).unwrap();
        for (s, field) in &cases {
            let refused = credential_namespaces_allowed("v", s, OP, &none).unwrap_err();
            assert_eq!(refused.reason(), Reason::CredentialNamespaceNotAllowed);
            let text = refused.to_string();
            for part in [
                format!("SecretStore v: {field} names namespace team-a;"),
                "--credential-namespaces".into(),
                "KEYHAVEN_CREDENTIAL_NAMESPACES".into(),
                "now: empty".into(),
            ] {
                assert!(text.contains(&part), "{part:?} not in {text}");
            }
            let text = credential_namespaces_allowed("v", s, OP, &others)
                .unwrap_err()
                .to_string();
            assert!(text.contains("now: team-b, team-c"), "{text}");
            assert!(
                credential_namespaces_allowed("v", s, OP, &allowed).is_ok(),
                "{field}"
            );
        }
    }

    #[test]
    fn the_credential_namespace_list_holds_namespace_names() {
        assert_eq!(
            CredentialNamespaces::parse(&["", " team-a ", "team-b", "team-a"])
                .unwrap()
                .namespaces(),
            ["team-a", "team-b"]
        );
        assert_eq!(
            CredentialNamespaces::parse::<&str>(&[]).unwrap(),
            CredentialNamespaces::default()
        );
        for bad in ["Team-A", "-a", "a-", "a/b", "a.b", &"a".repeat(64)] {
            assert!(CredentialNamespaces::parse(&[bad]).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..=MAX_CREDENTIAL_NAMESPACES)
            .map(|i| format!("ns-{i}"))
            .collect();
        assert!(CredentialNamespaces::parse(&many).is_err());
    }

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
