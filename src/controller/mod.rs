//! The controllers: one reconciler per kind, sharing one [`Context`].

mod managed_secret;
pub mod plan;
mod secret_store;
mod stores;
mod vault_profile;

pub use managed_secret::FINALIZER;
pub use stores::StoreRegistry;

use crate::api::{ManagedSecret, SecretStore, VaultProfile};
use crate::backend::Backend;
use crate::content::{MANAGED_LABEL, MANAGED_LABEL_VALUE, MANAGED_SECRET_LABEL};
use crate::crypto::OperatorKeys;
use crate::error::{Error, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use std::sync::Arc;
use tracing::{info, warn};

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the operator keeps its keys and the internal store's records.
    pub operator_namespace: String,
    /// Reconcile ManagedSecrets of this namespace only (all namespaces when `None`).
    pub watch_namespace: Option<String>,
    /// Manage only SecretStores and VaultProfiles matching this label selector.
    pub store_selector: Option<String>,
    /// The field manager of every server-side apply.
    pub field_manager: String,
    /// Reconciles of one kind running at once.
    pub concurrency: u16,
    /// The operator's own ServiceAccount (in `operator_namespace`): the identity Vault's
    /// kubernetes auth method sees unless a store names another.
    pub service_account: String,
}

/// What every reconcile shares: the client, caches of the watched kinds, live backends,
/// the operator's keys and the event recorder.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub keys: OperatorKeys,
    pub stores: Store<SecretStore>,
    pub profiles: Store<VaultProfile>,
    pub managed: Store<ManagedSecret>,
    pub stores_registry: StoreRegistry,
    recorder: Recorder,
    /// Asks the SecretStore controller for a health check now (a reconcile of another kind
    /// saw a store fail), instead of at its next periodic check.
    recheck: std::sync::Mutex<futures::channel::mpsc::Sender<()>>,
}

impl Context {
    /// Re-checks the stores' health soon, if `error` says a store is unusable.
    pub fn store_failed(&self, error: &Error) {
        if let Error::Backend(e) = error
            && e.phase() != crate::api::StorePhase::Active
        {
            self.recheck_stores();
        }
    }

    /// Re-checks every store's health soon. A full queue means one is already pending.
    pub fn recheck_stores(&self) {
        let _ = self.recheck.lock().expect("recheck lock").try_send(());
    }

    /// The SecretStore `name` from the cache, or from the API server when the cache does
    /// not hold it (yet): a reconcile never mistakes "not listed yet" for "does not exist".
    pub async fn secret_store(&self, name: &str) -> Result<Option<Arc<SecretStore>>> {
        self.cached_or_fetched(&self.stores, name).await
    }

    /// The VaultProfile `name`, like [`Context::secret_store`].
    pub async fn vault_profile(&self, name: &str) -> Result<Option<Arc<VaultProfile>>> {
        self.cached_or_fetched(&self.profiles, name).await
    }

    /// A cluster-scoped object from `cache`, else read from the API server within the
    /// operator's store selector (an object outside it does not exist for this operator).
    /// Not `Store::wait_until_ready`: that future keeps a single waker, which the
    /// controller's own applier already holds, so a second waiter would never wake.
    async fn cached_or_fetched<K>(&self, cache: &Store<K>, name: &str) -> Result<Option<Arc<K>>>
    where
        K: Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        if let Some(obj) = cache.get(&ObjectRef::new(name)) {
            return Ok(Some(obj));
        }
        let api: Api<K> = Api::all(self.client.clone());
        let mut lp = ListParams::default().fields(&format!("metadata.name={name}"));
        if let Some(selector) = &self.config.store_selector {
            lp = lp.labels(selector);
        }
        Ok(api.list(&lp).await?.items.into_iter().next().map(Arc::new))
    }

    /// The live backend of the SecretStore named `name`.
    pub async fn backend(&self, name: &str) -> Result<Arc<dyn Backend>> {
        let store = self.secret_store(name).await?.ok_or_else(|| {
            Error::config(
                "StoreNotFound",
                format!("SecretStore {name} does not exist"),
            )
        })?;
        self.stores_registry.backend(&store)
    }

    /// Publishes an Event about `obj`. The note must not contain a secret value.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: &str,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish an event");
        }
    }
}

/// Runs the three controllers until SIGTERM or Ctrl-C.
pub async fn run(client: Client, config: Config) -> Result<()> {
    ensure_namespace(&client, &config.operator_namespace).await?;
    let keys = OperatorKeys::load_or_create(client.clone(), &config.operator_namespace).await?;

    let store_wc = match &config.store_selector {
        Some(sel) => watcher::Config::default().labels(sel),
        None => watcher::Config::default(),
    };
    let (managed_api, secrets_api): (Api<ManagedSecret>, Api<Secret>) =
        match &config.watch_namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
    let store_ctl = Controller::new(Api::<SecretStore>::all(client.clone()), store_wc.clone());
    let profile_ctl = Controller::new(Api::<VaultProfile>::all(client.clone()), store_wc.clone());
    let managed_ctl = Controller::new(managed_api, watcher::Config::default());

    let (recheck, recheck_rx) = futures::channel::mpsc::channel(0);
    let ctx = Arc::new(Context {
        recheck: std::sync::Mutex::new(recheck),
        client: client.clone(),
        stores: store_ctl.store(),
        profiles: profile_ctl.store(),
        managed: managed_ctl.store(),
        stores_registry: StoreRegistry::new(
            client.clone(),
            &config.operator_namespace,
            &config.service_account,
            keys.clone(),
        ),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: config.field_manager.clone(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        keys,
        config: config.clone(),
    });

    // Profiles follow their stores' health.
    let profiles = ctx.profiles.clone();
    let profile_ctl = profile_ctl.watches(
        Api::<SecretStore>::all(client.clone()),
        store_wc.clone(),
        move |store: SecretStore| {
            let name = store.name_any();
            profiles
                .state()
                .into_iter()
                .filter(|p| p.spec.stores().any(|s| s == name))
                .map(|p| ObjectRef::new(&p.name_any()))
                .collect::<Vec<_>>()
        },
    );
    // ManagedSecrets follow their profile, and their native Secrets, watched by label only.
    let managed = ctx.managed.clone();
    let managed_ctl = managed_ctl
        .watches(
            Api::<VaultProfile>::all(client.clone()),
            store_wc,
            move |profile: VaultProfile| {
                let name = profile.name_any();
                managed
                    .state()
                    .into_iter()
                    .filter(|m| m.spec.profile == name)
                    .map(|m| ObjectRef::from_obj(m.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .watches(
            secrets_api,
            watcher::Config::default().labels(&format!("{MANAGED_LABEL}={MANAGED_LABEL_VALUE}")),
            |secret: Secret| {
                let owner = secret.labels().get(MANAGED_SECRET_LABEL).cloned();
                owner.map(|name| {
                    ObjectRef::new(&name).within(&secret.namespace().unwrap_or_default())
                })
            },
        );

    let controller_config =
        kube::runtime::controller::Config::default().concurrency(config.concurrency);
    info!(namespace = %config.operator_namespace, watch_namespace = ?config.watch_namespace, "keyhaven controllers starting");
    let stores_done = store_ctl
        .reconcile_all_on(recheck_rx)
        .with_config(controller_config.clone())
        .shutdown_on_signal()
        .run(
            secret_store::reconcile,
            secret_store::error_policy,
            ctx.clone(),
        )
        .for_each(|r| async move { log_result("SecretStore", r) });
    let profiles_done = profile_ctl
        .with_config(controller_config.clone())
        .shutdown_on_signal()
        .run(
            vault_profile::reconcile,
            vault_profile::error_policy,
            ctx.clone(),
        )
        .for_each(|r| async move { log_result("VaultProfile", r) });
    let managed_done = managed_ctl
        .with_config(controller_config)
        .shutdown_on_signal()
        .run(
            managed_secret::reconcile,
            managed_secret::error_policy,
            ctx.clone(),
        )
        .for_each(|r| async move { log_result("ManagedSecret", r) });
    futures::join!(stores_done, profiles_done, managed_done);
    ctx.stores_registry.shutdown().await;
    info!("keyhaven controllers stopped");
    Ok(())
}

fn log_result<K: Resource, E: std::fmt::Display>(
    kind: &str,
    result: Result<(ObjectRef<K>, kube::runtime::controller::Action), E>,
) {
    if let Err(e) = result {
        // Reconcile errors are already in the object's status and events.
        tracing::debug!(kind, error = %e, "reconcile failed");
    }
}

/// Creates the operator's namespace when it is missing (out-of-cluster runs).
async fn ensure_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    if api.get_opt(name).await?.is_none() {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        info!(namespace = name, "created the operator namespace");
    }
    Ok(())
}
