//! What every reconcile shares, in named parts: the caches of the watched kinds and the
//! lookups over them, the live backends, what this process wrote, the backlog, the Event
//! publisher, and the request for a prompt store health check.

use super::backlog::Backlog;
use super::events::Events;
use super::own_writes::{SecretWrites, StatusWrites};
use super::retry::Retries;
use super::status::HasStatus;
use super::stores::StoreRegistry;
use crate::api::{ManagedSecret, Reason, SecretStore, StorePhase, VaultProfile};
use crate::backend::Backend;
use crate::crypto::OperatorKeys;
use crate::error::{Error, Result, Verb};
use crate::metrics::Metrics;
use crate::profiles::NamespaceInfo;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ListParams, PartialObjectMeta};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the operator keeps its keys and the internal store's records.
    pub operator_namespace: String,
    /// Reconcile ManagedSecrets of this namespace only (all namespaces when `None`).
    pub watch_namespace: Option<String>,
    /// Manage only SecretStores and VaultProfiles matching this label selector.
    pub store_selector: Option<String>,
    /// Reconcile (and cache) only ManagedSecrets matching this label selector.
    pub managed_selector: Option<String>,
    /// The field manager of every server-side apply.
    pub field_manager: String,
    /// Reconciles of one kind running at once.
    pub concurrency: u16,
    /// The operator's own ServiceAccount (in `operator_namespace`): the identity Vault's
    /// kubernetes auth method sees unless a store names another.
    pub service_account: String,
    /// The PKCS#11 modules pkcs11 stores may load (`--pkcs11-modules`); empty: none.
    pub pkcs11_modules: crate::backend::ModuleAllowList,
    /// The namespaces besides `operator_namespace` that stores may read credentials and CA
    /// bundles from (`--credential-namespaces`); empty: none.
    pub credential_namespaces: super::stores::CredentialNamespaces,
    /// This process serves the admission webhook, which writes who asked into each
    /// ManagedSecret: versions record that as `createdBy` (else the unverified field manager).
    pub verified_identity: bool,
    /// The audit log (`--audit-log`; disabled without it).
    pub audit: crate::audit::Audit,
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub keys: OperatorKeys,
    pub caches: Caches,
    /// Live backends, one per SecretStore.
    pub registry: StoreRegistry,
    /// Native Secrets this process wrote, until their watch events come back.
    pub secret_writes: SecretWrites,
    /// The ManagedSecret statuses this process wrote last.
    pub status_writes: StatusWrites,
    pub backlog: Backlog,
    /// Whose ManagedSecret reconciles next when every slot is taken (fair across namespaces).
    pub turns: std::sync::Arc<super::turns::Turns>,
    pub events: Events,
    /// Counters and latencies (`/metrics`).
    pub metrics: Arc<Metrics>,
    pub health_checks: HealthChecks,
    /// The backoff of failures the API server will repeat, per object.
    pub retries: Retries,
}

impl Context {
    /// How many ManagedSecrets wait for their first sync at their current generation.
    pub fn backlog(&self) -> usize {
        self.backlog.size(|| self.caches.managed.state())
    }

    /// Records the status the API server stored for `ms` after our write.
    pub fn status_written(&self, ms: &ManagedSecret) {
        self.status_writes.wrote(ms, || {
            self.caches
                .managed
                .state()
                .iter()
                .filter_map(|m| m.uid())
                .collect()
        });
    }

    /// Writes `status` onto `obj` (server-side apply under the operator's field manager)
    /// unless `obj` already holds it; the object as stored, when written.
    pub async fn apply_status<K: HasStatus>(
        &self,
        obj: &K,
        status: &K::Status,
    ) -> Result<Option<K>> {
        super::status::apply(&self.client, &self.config.field_manager, obj, status).await
    }

    /// The live backend of the SecretStore named `name`.
    pub async fn backend(&self, name: &str) -> Result<Arc<dyn Backend>> {
        let store = self
            .caches
            .get::<SecretStore>(&self.client, name)
            .await?
            .ok_or_else(|| {
                Error::config(
                    Reason::StoreNotFound,
                    format!("SecretStore {name} does not exist"),
                )
            })?;
        self.registry.backend(&store)
    }
}

/// Asks the SecretStore controller for a health check now (a reconcile of another kind saw
/// a store fail), instead of at its next periodic check.
pub struct HealthChecks {
    request: std::sync::Mutex<futures::channel::mpsc::Sender<()>>,
}

impl HealthChecks {
    /// `request` is the SecretStore controller's reconcile-all trigger (a channel of size 0:
    /// one pending request is enough).
    pub fn new(request: futures::channel::mpsc::Sender<()>) -> Self {
        HealthChecks {
            request: std::sync::Mutex::new(request),
        }
    }

    /// Re-checks every store's health soon. A full queue means one is already pending.
    pub fn request(&self) {
        let _ = self.request.lock().expect("recheck lock").try_send(());
    }

    /// Re-checks the stores' health soon, if `error` says a store is unusable.
    pub fn after(&self, error: &Error) {
        if let Error::Backend(e) = error
            && e.phase() != StorePhase::Active
        {
            self.request();
        }
    }
}

/// A cluster-scoped kind the caches hold.
pub trait Cached:
    Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + 'static
{
    fn cache(caches: &Caches) -> &Store<Self>;
}

impl Cached for SecretStore {
    fn cache(caches: &Caches) -> &Store<Self> {
        &caches.stores
    }
}

impl Cached for VaultProfile {
    fn cache(caches: &Caches) -> &Store<Self> {
        &caches.profiles
    }
}

/// The caches of the watched kinds, and lookups that fall back to the API server.
pub struct Caches {
    /// Selects the SecretStores and VaultProfiles this operator manages.
    pub store_selector: Option<String>,
    pub stores: Store<SecretStore>,
    pub profiles: Store<VaultProfile>,
    pub managed: Store<ManagedSecret>,
    /// SecretApprovals (the watched namespace only, with `--watch-namespace`).
    pub approvals: Store<crate::api::SecretApproval>,
    /// Whether `managed` holds the first full list (counts made before would be short).
    pub managed_synced: Arc<AtomicBool>,
    /// Namespaces' metadata (labels, annotations): the watched namespace only, with
    /// `--watch-namespace`.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
}

impl Caches {
    pub fn managed_listed(&self) -> bool {
        self.managed_synced.load(Ordering::SeqCst)
    }

    /// The SecretStore or VaultProfile `name` from its cache, else read from the API server
    /// within the operator's store selector (an object outside it does not exist for this
    /// operator): a reconcile never mistakes "not listed yet" for "does not exist".
    /// Not `Store::wait_until_ready`: that future keeps a single waker, which the
    /// controller's own applier already holds, so a second waiter would never wake.
    pub async fn get<K: Cached>(&self, client: &Client, name: &str) -> Result<Option<Arc<K>>> {
        if let Some(obj) = K::cache(self).get(&ObjectRef::new(name)) {
            return Ok(Some(obj));
        }
        let api: Api<K> = Api::all(client.clone());
        let mut lp = ListParams::default().fields(&format!("metadata.name={name}"));
        if let Some(selector) = &self.store_selector {
            lp = lp.labels(selector);
        }
        let listed = api
            .list(&lp)
            .await
            .map_err(Error::kube(Verb::List, format!("{} {name}", K::kind(&()))))?;
        Ok(listed.items.into_iter().next().map(Arc::new))
    }

    /// The labels and annotations of namespace `name`, from the cache or the API server.
    pub async fn namespace_info(&self, client: &Client, name: &str) -> Result<NamespaceInfo> {
        if let Some(ns) = self.namespaces.get(&ObjectRef::new(name)) {
            return Ok(NamespaceInfo::from_meta(&ns.metadata));
        }
        let api: Api<Namespace> = Api::all(client.clone());
        let ns = api
            .get_metadata_opt(name)
            .await
            .map_err(Error::kube(Verb::Read, format!("Namespace {name}")))?
            .ok_or_else(|| {
                Error::config(
                    Reason::NamespaceNotFound,
                    format!("namespace {name} does not exist"),
                )
            })?;
        Ok(NamespaceInfo::from_meta(&ns.metadata))
    }

    /// Every VaultProfile within the store selector, read from the API server (not the
    /// cache): to confirm a refusal the cache may be too young to decide.
    pub async fn list_profiles(&self, client: &Client) -> Result<Vec<VaultProfile>> {
        let api: Api<VaultProfile> = Api::all(client.clone());
        let mut lp = ListParams::default();
        if let Some(selector) = &self.store_selector {
            lp = lp.labels(selector);
        }
        let listed = api
            .list(&lp)
            .await
            .map_err(Error::kube(Verb::List, "VaultProfiles"))?;
        Ok(listed.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;

    #[test]
    fn only_an_unusable_store_asks_for_a_health_check() {
        let (tx, mut rx) = futures::channel::mpsc::channel(0);
        let checks = HealthChecks::new(tx);
        let conflict = Error::Backend(BackendError::Conflict {
            store: "s".into(),
            path: "p".into(),
            message: "m".into(),
        });
        checks.after(&conflict);
        assert!(
            rx.try_recv().is_err(),
            "a conflict says nothing of the store's health"
        );
        let sealed = Error::Backend(BackendError::Sealed {
            store: "s".into(),
            message: "m".into(),
        });
        checks.after(&sealed);
        checks.after(&sealed);
        assert_eq!(rx.try_recv().unwrap(), ());
        assert!(rx.try_recv().is_err(), "one pending request is enough");
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher;

    fn store(name: &str) -> SecretStore {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "SecretStore",
            "metadata": {"name": name}, "spec": {"provider": {"internal": {}}},
        }))
        .unwrap()
    }

    /// Caches holding `stores`, and a client of an API server that does not answer.
    fn caches(stores: &[SecretStore]) -> (Caches, Client) {
        let mut writer = Writer::<SecretStore>::default();
        for s in stores {
            writer.apply_watcher_event(&watcher::Event::Apply(s.clone()));
        }
        let caches = Caches {
            store_selector: Some("team=a".into()),
            stores: writer.as_reader(),
            profiles: Writer::default().as_reader(),
            managed: Writer::default().as_reader(),
            approvals: Writer::default().as_reader(),
            managed_synced: Default::default(),
            namespaces: Writer::default().as_reader(),
        };
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        (caches, Client::try_from(config).unwrap())
    }

    #[tokio::test]
    async fn a_cached_object_is_read_from_the_cache_and_a_missing_one_from_the_server() {
        crate::install_crypto_provider();
        let (caches, client) = caches(&[store("a")]);
        let hit = caches.get::<SecretStore>(&client, "a").await.unwrap();
        assert_eq!(
            hit.unwrap().name_any(),
            "a",
            "no request made: the server does not answer"
        );
        let miss = caches.get::<SecretStore>(&client, "b").await.unwrap_err();
        let text = miss.to_string();
        assert!(text.starts_with("listing SecretStore b: "), "{text}");
        assert!(!caches.managed_listed());
    }
}
