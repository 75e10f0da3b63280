//! The controllers: one reconciler per kind, sharing one [`Context`].

mod managed_secret;
mod migration;
pub mod plan;
mod secret_store;
mod store_guard;
mod stores;
mod vault_profile;

pub use managed_secret::{FINALIZER, ROTATE_ANNOTATION};
pub use store_guard::{FORCE_DELETE_ANNOTATION, STORE_FINALIZER};
pub use stores::StoreRegistry;

use crate::api::{ManagedSecret, SecretStore, VaultProfile};
use crate::backend::Backend;
use crate::content::{MANAGED_LABEL, MANAGED_LABEL_VALUE, MANAGED_SECRET_LABEL};
use crate::crypto::OperatorKeys;
use crate::error::{Error, Result};
use crate::http::Probes;
use crate::leader::LeaderElection;
use crate::metrics::Metrics;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ListParams, ObjectMeta, PartialObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
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
    /// Reconcile (and cache) only ManagedSecrets matching this label selector.
    pub managed_selector: Option<String>,
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
    /// Whether `managed` holds the first full list (counts made before would be short).
    pub managed_synced: Arc<std::sync::atomic::AtomicBool>,
    /// ManagedSecrets not synced at their generation yet, and when that was counted.
    backlog: std::sync::Mutex<Option<(std::time::Instant, usize)>>,
    /// A digest of the status this process last wrote, by ManagedSecret uid: tells a cached
    /// object that holds our last status write from one that predates it.
    written_status: std::sync::Mutex<WrittenStatus>,
    /// The resourceVersion of each native Secret keyhaven last wrote, by namespace and
    /// name, until its watch event comes back.
    own_writes: std::sync::Mutex<std::collections::HashMap<(String, String), String>>,
    /// Namespaces' metadata (labels, annotations): the watched namespace only, with
    /// `--watch-namespace`.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub stores_registry: StoreRegistry,
    /// Counters and latencies (`/metrics`).
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
    reporter: Reporter,
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

    /// How many ManagedSecrets wait for their first sync at their current generation (new
    /// or changed ones), counted from the cache at most once a second. Periodic refreshes
    /// yield to them.
    pub fn backlog(&self) -> usize {
        let mut counted = self.backlog.lock().expect("backlog lock");
        match *counted {
            Some((at, n)) if at.elapsed() < Duration::from_secs(1) => n,
            _ => {
                let now = jiff::Timestamp::now();
                let n = self
                    .managed
                    .state()
                    .iter()
                    .filter(|m| managed_secret::awaits_sync(m, now))
                    .count();
                *counted = Some((std::time::Instant::now(), n));
                n
            }
        }
    }

    /// Records the status the API server stored for `ms` after our write.
    pub(super) fn status_written(&self, ms: &ManagedSecret) {
        let Some(uid) = ms.uid() else { return };
        let mut written = self.written_status.lock().expect("status record lock");
        written.digests.insert(uid, status_digest(ms));
        // ManagedSecrets deleted without a finalizer leave their record: those are dropped
        // whenever the map has doubled since the last time.
        if written.digests.len() > written.prune_at {
            let live: std::collections::HashSet<String> = self
                .managed
                .state()
                .iter()
                .filter_map(|m| m.uid())
                .collect();
            written.digests.retain(|uid, _| live.contains(uid));
            written.prune_at = 1024 + 2 * written.digests.len();
        }
    }

    /// Forgets what was written for a ManagedSecret that is gone.
    pub(super) fn status_forget(&self, ms: &ManagedSecret) {
        if let Some(uid) = ms.uid() {
            let mut written = self.written_status.lock().expect("status record lock");
            written.digests.remove(&uid);
        }
    }

    /// Whether the cached `ms` holds the last status this process wrote for it (true when
    /// it wrote none: the cache was listed after the process started, and no other writer
    /// changes the status).
    pub(super) fn holds_status_written(&self, ms: &ManagedSecret) -> bool {
        let Some(uid) = ms.uid() else { return false };
        let written = self.written_status.lock().expect("status record lock");
        written
            .digests
            .get(&uid)
            .is_none_or(|d| *d == status_digest(ms))
    }

    /// Notes a native Secret keyhaven just wrote (as the API server returned it).
    pub(super) fn wrote_secret(&self, secret: &Secret) {
        let (Some(ns), Some(rv)) = (secret.namespace(), secret.resource_version()) else {
            return;
        };
        let mut own = self.own_writes.lock().expect("own writes lock");
        own.insert((ns, secret.name_any()), rv);
    }

    /// Whether this watch event of a native Secret is keyhaven's own last write coming
    /// back (forgotten then: the next event of it is someone's change).
    fn is_own_write(&self, secret: &PartialObjectMeta<Secret>) -> bool {
        let key = (secret.namespace().unwrap_or_default(), secret.name_any());
        let mut own = self.own_writes.lock().expect("own writes lock");
        match own.get(&key) {
            Some(rv) if secret.resource_version().as_ref() == Some(rv) => {
                own.remove(&key);
                true
            }
            _ => false,
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

    /// The labels and annotations of namespace `name`, from the cache or the API server.
    pub async fn namespace_info(&self, name: &str) -> Result<crate::profiles::NamespaceInfo> {
        if let Some(ns) = self.namespaces.get(&ObjectRef::new(name)) {
            return Ok(crate::profiles::NamespaceInfo::from_meta(&ns.metadata));
        }
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns = api.get_metadata_opt(name).await?.ok_or_else(|| {
            Error::config(
                "NamespaceNotFound",
                format!("namespace {name} does not exist"),
            )
        })?;
        Ok(crate::profiles::NamespaceInfo::from_meta(&ns.metadata))
    }

    /// Every VaultProfile within the store selector, read from the API server (not the
    /// cache): to confirm a refusal the cache may be too young to decide.
    pub async fn list_profiles(&self) -> Result<Vec<VaultProfile>> {
        let api: Api<VaultProfile> = Api::all(self.client.clone());
        let mut lp = ListParams::default();
        if let Some(selector) = &self.config.store_selector {
            lp = lp.labels(selector);
        }
        Ok(api.list(&lp).await?.items)
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
        // kube's Recorder folds events with the same key into one series and keeps the
        // first note; the key has no note, so "version 2 recorded" would show as a repeat
        // of "version 1 recorded". A digest of the note in the action folds only events
        // that say the same thing.
        use sha2::{Digest, Sha256};
        let digest = hex::encode(&Sha256::digest(note.as_bytes())[..4]);
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note.into()),
            action: format!("Reconcile-{digest}"),
            secondary: None,
        };
        // Warnings go through the shared recorder, which folds a repeated one into a series
        // for six minutes. Normal events say something new each time (a version, a Secret):
        // a recorder of their own keeps nothing, where the shared one would hold every
        // event of a sync of thousands of secrets for those six minutes.
        let published = match type_ {
            EventType::Warning => self.recorder.publish(&ev, &obj.object_ref(&())).await,
            EventType::Normal => {
                Recorder::new(self.client.clone(), self.reporter.clone())
                    .publish(&ev, &obj.object_ref(&()))
                    .await
            }
        };
        if let Err(e) = published {
            warn!(error = %e, reason, "could not publish an event");
        }
    }
}

/// Digests of the statuses this process wrote, by ManagedSecret uid.
#[derive(Default)]
struct WrittenStatus {
    digests: std::collections::HashMap<String, [u8; 32]>,
    /// The size at which records of deleted ManagedSecrets are dropped.
    prune_at: usize,
}

/// A digest of a ManagedSecret's status as the API server returned it.
fn status_digest(ms: &ManagedSecret) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let json = serde_json::to_vec(&ms.status).unwrap_or_default();
    Sha256::digest(&json).into()
}

/// What [`run`] shares with the process around it: the metrics, the probes `/readyz`
/// reads, and the shutdown request (SIGTERM).
#[derive(Clone)]
pub struct Runtime {
    pub metrics: Arc<Metrics>,
    pub probes: Arc<Probes>,
    /// Becomes `true` when the process must stop (SIGTERM, Ctrl-C).
    pub shutdown: watch::Receiver<bool>,
    /// Elect a leader on a Lease before reconciling; `None` reconciles at once.
    pub leader_election: Option<LeaderElection>,
}

/// How [`run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was requested; in-flight reconciles finished and the Lease was released.
    Shutdown,
    /// The leader Lease was lost (not renewed in time): the process should exit and start
    /// again as a candidate.
    LostLeadership,
}

/// Waits for leadership (when elected), then runs the three controllers until shutdown
/// is requested or leadership is lost. Reconciles in flight finish before it returns.
pub async fn run(client: Client, config: Config, rt: Runtime) -> Result<Stopped> {
    ensure_namespace(&client, &config.operator_namespace).await?;
    let mut shutdown = rt.shutdown.clone();

    let candidate = match &rt.leader_election {
        None => {
            rt.probes.set_leadership(true);
            rt.metrics.set_leader(true);
            None
        }
        Some(election) => {
            let mut candidate = election.join(client.clone()).await.map_err(|e| {
                Error::config("LeaderElectionFailed", format!("leader election: {e}"))
            })?;
            // A free Lease is taken within moments; still not leading then means another
            // holder: leadership is known, this process is a (ready) standby.
            let led = tokio::time::timeout(Duration::from_secs(2), candidate.leading()).await;
            if led.is_err() {
                rt.probes.set_leadership(false);
                info!(identity = %election.identity, "standing by: another process leads");
            }
            tokio::select! {
                led = candidate.leading() => if led.is_none() {
                    return Err(Error::config("LeaderElectionFailed", "leader election ended"));
                },
                _ = shutdown.wait_for(|stop| *stop) => {
                    candidate.release().await;
                    return Ok(Stopped::Shutdown);
                }
            }
            info!(identity = %election.identity, "leading: starting the controllers");
            rt.metrics.set_leader(true);
            Some(candidate)
        }
    };
    rt.probes.expect_caches(3);
    rt.probes.set_leadership(true);

    // One stop signal for every controller, saying why: shutdown requested, or leadership lost.
    let (stop_tx, stop_rx) = watch::channel(None);
    let lost = candidate.as_ref().map(|c| c.lost());
    let stopper = tokio::spawn(async move {
        let lost_leadership = async {
            match lost {
                Some(lost) => lost.await,
                None => std::future::pending().await,
            }
        };
        let why = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => Stopped::Shutdown,
            _ = lost_leadership => Stopped::LostLeadership,
        };
        let _ = stop_tx.send(Some(why));
    });

    let result = run_controllers(client, config, &rt, stop_rx.clone()).await;
    rt.probes.stopping();
    rt.metrics.set_leader(false);
    stopper.abort();
    let stopped = stop_rx.borrow().unwrap_or(Stopped::Shutdown);
    if stopped == Stopped::LostLeadership {
        warn!("lost the leader Lease: stopped reconciling");
    }
    if let Some(candidate) = candidate {
        candidate.release().await;
    }
    result.map(|()| stopped)
}

/// A future that completes when `stop` says why (or its sender goes).
async fn stopped(mut stop: watch::Receiver<Option<Stopped>>) {
    let _ = stop.wait_for(Option::is_some).await;
}

/// A controller of `K` whose cache reports its first full list to `probes`; `tap` sees
/// every watch event (after the cache holds the change).
fn controller<K>(
    api: Api<K>,
    wc: watcher::Config,
    probes: Arc<Probes>,
    mut tap: impl FnMut(&watcher::Event<K>) + Send + 'static,
) -> Controller<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let writer = reflector::store::Writer::<K>::default();
    let reader = writer.as_reader();
    let mut first_list = true;
    let objects = reflector(
        writer,
        watcher::watcher(api, wc).modify(|obj| trim_managed_fields(obj.meta_mut())),
    )
    .inspect(move |event| {
        if first_list && matches!(event, Ok(watcher::Event::InitDone)) {
            first_list = false;
            probes.cache_synced();
        }
        if let Ok(event) = event {
            tap(event);
        }
    })
    .applied_objects()
    .predicate_filter(reconcile_inputs, Default::default());
    Controller::for_stream(objects, reader)
}

/// Drops the field sets of `managedFields` from a cached object: keyhaven reads only who
/// changed an object and when (a version's author), and the field sets are often the
/// largest part of a cached object's metadata.
fn trim_managed_fields(meta: &mut ObjectMeta) {
    for entry in meta.managed_fields.iter_mut().flatten() {
        entry.fields_v1 = None;
    }
}

/// What a reconcile reads of an object's own metadata and spec: generation, labels,
/// annotations (rotate, force-delete), finalizers, deletion. Not its status: without this
/// filter, every status write of our own would reconcile the object a second time.
fn reconcile_inputs<K: Resource>(obj: &K) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let m = obj.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        m.generation,
        &m.labels,
        &m.annotations,
        &m.finalizers,
        m.deletion_timestamp.is_some(),
    )
        .hash(&mut h);
    Some(h.finish())
}

async fn run_controllers(
    client: Client,
    config: Config,
    rt: &Runtime,
    stop: watch::Receiver<Option<Stopped>>,
) -> Result<()> {
    let keys = OperatorKeys::load_or_create(client.clone(), &config.operator_namespace).await?;

    let store_wc = match &config.store_selector {
        Some(sel) => watcher::Config::default().labels(sel),
        None => watcher::Config::default(),
    };
    let (managed_api, secrets_api): (Api<ManagedSecret>, Api<PartialObjectMeta<Secret>>) =
        match &config.watch_namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
    let probes = rt.probes.clone();
    // Store changes reach the profiles that name them from the store controller's own cache
    // (already updated), so a profile never reads a store's older state than its trigger.
    let (store_changed, store_changes) = futures::channel::mpsc::unbounded::<SecretStore>();
    let store_ctl = controller(
        Api::<SecretStore>::all(client.clone()),
        store_wc.clone(),
        probes.clone(),
        move |event: &watcher::Event<SecretStore>| {
            if let watcher::Event::Apply(s) | watcher::Event::Delete(s) = event {
                let _ = store_changed.unbounded_send(s.clone());
            }
        },
    );
    // Every profile change reaches the ManagedSecret controller (whose profile resolution
    // reads this same cache, already updated) and re-checks every profile's conflicts. Not
    // a status write: a profile's status (its counts) changes as its ManagedSecrets sync,
    // and fanning each of those out to every ManagedSecret of the profile made the work of
    // a sync of N secrets grow as N².
    let (profile_changed, profile_changes) = futures::channel::mpsc::unbounded::<VaultProfile>();
    let (profiles_recheck, profiles_recheck_rx) = futures::channel::mpsc::unbounded::<()>();
    let profiles_recheck_managed = profiles_recheck.clone();
    let profile_ctl = {
        let profiles_recheck = profiles_recheck.clone();
        let mut inputs: std::collections::HashMap<String, Option<u64>> = Default::default();
        controller(
            Api::<VaultProfile>::all(client.clone()),
            store_wc.clone(),
            probes.clone(),
            move |event: &watcher::Event<VaultProfile>| {
                let changed = match event {
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                        let now = reconcile_inputs(p);
                        (inputs.insert(p.name_any(), now) != Some(now)).then_some(p)
                    }
                    watcher::Event::Delete(p) => {
                        inputs.remove(&p.name_any());
                        Some(p)
                    }
                    _ => None,
                };
                if let Some(p) = changed {
                    let _ = profile_changed.unbounded_send(p.clone());
                    let _ = profiles_recheck.unbounded_send(());
                }
            },
        )
    };
    // Re-checks of every profile (counts, conflicts) asked for while one runs or within
    // half a second make one more: a sync of thousands of ManagedSecrets asks for one each.
    let profiles_recheck_rx = profiles_recheck_rx
        .ready_chunks(64)
        .then(|_| tokio::time::sleep(Duration::from_millis(500)));
    // Namespaces, metadata only (labels and the profile annotation decide profiles): the
    // watched one, or all.
    let ns_wc = match &config.watch_namespace {
        Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
        None => watcher::Config::default(),
    };
    let ns_writer = reflector::store::Writer::<PartialObjectMeta<Namespace>>::default();
    let namespaces = ns_writer.as_reader();
    let ns_changes = reflector(
        ns_writer,
        watcher::watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            ns_wc,
        ),
    )
    .inspect(move |event| {
        if matches!(
            event,
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))
        ) {
            let _ = profiles_recheck.unbounded_send(());
        }
    })
    .touched_objects();
    let managed_wc = match &config.managed_selector {
        Some(sel) => watcher::Config::default().labels(sel),
        None => watcher::Config::default(),
    };
    // A ManagedSecret that comes, goes or changes profile changes its profiles' counts.
    let managed_synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let managed_ctl = {
        let profiles_recheck = profiles_recheck_managed;
        let mut seen: std::collections::HashMap<(String, String), Option<String>> =
            Default::default();
        let synced = managed_synced.clone();
        controller(
            managed_api,
            managed_wc,
            probes,
            move |event: &watcher::Event<ManagedSecret>| {
                if matches!(event, watcher::Event::InitDone) {
                    synced.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _ = profiles_recheck.unbounded_send(());
                }
                let (ms, deleted, init) = match event {
                    watcher::Event::Apply(ms) => (ms, false, false),
                    watcher::Event::InitApply(ms) => (ms, false, true),
                    watcher::Event::Delete(ms) => (ms, true, false),
                    _ => return,
                };
                let key = (ms.namespace().unwrap_or_default(), ms.name_any());
                let changed = if deleted {
                    seen.remove(&key).is_some()
                } else {
                    let profile = ms
                        .spec
                        .profile
                        .clone()
                        .or_else(|| ms.status.as_ref().and_then(|s| s.profile.clone()));
                    seen.insert(key, profile.clone()) != Some(profile)
                };
                if changed && !init {
                    let _ = profiles_recheck.unbounded_send(());
                }
            },
        )
    };

    let (recheck, recheck_rx) = futures::channel::mpsc::channel(0);
    let reporter = Reporter {
        controller: config.field_manager.clone(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        recheck: std::sync::Mutex::new(recheck),
        client: client.clone(),
        stores: store_ctl.store(),
        profiles: profile_ctl.store(),
        managed: managed_ctl.store(),
        managed_synced,
        backlog: Default::default(),
        written_status: Default::default(),
        own_writes: Default::default(),
        namespaces,
        stores_registry: StoreRegistry::new(
            client.clone(),
            &config.operator_namespace,
            &config.service_account,
            keys.clone(),
        ),
        recorder: Recorder::new(client.clone(), reporter.clone()),
        reporter,
        keys,
        config: config.clone(),
        metrics: rt.metrics.clone(),
    });
    rt.metrics
        .watch_caches(ctx.stores.clone(), ctx.managed.clone());

    // Profiles follow their stores' health, and each other and the namespaces (conflicts).
    let profiles = ctx.profiles.clone();
    let profile_ctl = profile_ctl
        .reconcile_all_on(profiles_recheck_rx)
        .watches_stream(store_changes.map(Ok), move |store: SecretStore| {
            let name = store.name_any();
            profiles
                .state()
                .into_iter()
                .filter(|p| p.spec.stores().any(|s| s == name))
                .map(|p| ObjectRef::new(&p.name_any()))
                .collect::<Vec<_>>()
        });
    // ManagedSecrets follow their profile (those without spec.profile: every profile, as
    // any may change what they resolve to), their namespace's labels and annotations, and
    // their native Secrets, watched by label only.
    let managed = ctx.managed.clone();
    let managed_in_ns = ctx.managed.clone();
    let managed_ctl = managed_ctl
        .watches_stream(profile_changes.map(Ok), move |profile: VaultProfile| {
            let name = profile.name_any();
            managed
                .state()
                .into_iter()
                .filter(|m| {
                    m.spec.profile.as_deref().is_none_or(|p| p == name)
                        || m.status.as_ref().and_then(|s| s.profile.as_deref()) == Some(&name)
                })
                .map(|m| ObjectRef::from_obj(m.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(ns_changes, move |ns: PartialObjectMeta<Namespace>| {
            let name = ns.name_any();
            managed_in_ns
                .state()
                .into_iter()
                .filter(|m| m.namespace().as_deref() == Some(name.as_str()))
                .map(|m| ObjectRef::from_obj(m.as_ref()))
                .collect::<Vec<_>>()
        })
        // Metadata only: the data of thousands of Secrets is never held or even decoded here.
        // keyhaven's own writes come back as watch events: they trigger nothing (the
        // reconcile that wrote is the one that would run again).
        .watches_stream(
            watcher::watcher(
                secrets_api,
                watcher::Config::default()
                    .labels(&format!("{MANAGED_LABEL}={MANAGED_LABEL_VALUE}")),
            )
            .filter_map({
                let ctx = ctx.clone();
                move |event| {
                    let touched = match event {
                        Ok(watcher::Event::Apply(s)) if ctx.is_own_write(&s) => None,
                        Ok(
                            watcher::Event::Apply(s)
                            | watcher::Event::InitApply(s)
                            | watcher::Event::Delete(s),
                        ) => Some(Ok(s)),
                        Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                        Err(e) => Some(Err(e)),
                    };
                    futures::future::ready(touched)
                }
            }),
            |secret: PartialObjectMeta<Secret>| {
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
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(reconcile_store, secret_store::error_policy, ctx.clone())
        .for_each(|r| async move { log_result("SecretStore", r) });
    let profiles_done = profile_ctl
        .with_config(controller_config.clone())
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(reconcile_profile, vault_profile::error_policy, ctx.clone())
        .for_each(|r| async move { log_result("VaultProfile", r) });
    let managed_done = managed_ctl
        .with_config(controller_config)
        .graceful_shutdown_on(stopped(stop))
        .run(reconcile_managed, managed_secret::error_policy, ctx.clone())
        .for_each(|r| async move { log_result("ManagedSecret", r) });
    futures::join!(stores_done, profiles_done, managed_done);
    ctx.stores_registry.shutdown().await;
    info!("keyhaven controllers stopped");
    Ok(())
}

// The reconcilers, counted and timed by kind.
async fn reconcile_store(obj: Arc<SecretStore>, ctx: Arc<Context>) -> Result<Action> {
    let metrics = ctx.metrics.clone();
    metrics
        .reconcile("SecretStore", secret_store::reconcile(obj, ctx))
        .await
}

async fn reconcile_profile(obj: Arc<VaultProfile>, ctx: Arc<Context>) -> Result<Action> {
    let metrics = ctx.metrics.clone();
    metrics
        .reconcile("VaultProfile", vault_profile::reconcile(obj, ctx))
        .await
}

async fn reconcile_managed(obj: Arc<ManagedSecret>, ctx: Arc<Context>) -> Result<Action> {
    let metrics = ctx.metrics.clone();
    metrics
        .reconcile("ManagedSecret", managed_secret::reconcile(obj, ctx))
        .await
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
    let existing = match api.get_opt(name).await {
        // In a cluster the chart made the namespace and grants no access to namespaces.
        Err(kube::Error::Api(s)) if s.code == 403 => return Ok(()),
        other => other?,
    };
    if existing.is_none() {
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
