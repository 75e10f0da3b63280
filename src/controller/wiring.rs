//! Builds the three controllers and connects their watches: which change of one kind
//! reconciles which objects of another. The stateful filters on the watch streams are
//! named types in [`super::watch_filters`], with their own tests.

use super::context::{Caches, Config, Context, HealthChecks};
use super::events::Events;
use super::stores::StoreRegistry;
use super::turns::{Lane, Turns};
use super::watch_filters::{
    ProfileChanges, ProfileCounts, StoreRecoveries, WatchBackoff, pushing, reconcile_inputs,
    trim_managed_fields, using_store,
};
use super::{managed_secret, secret_store, vault_profile};
use crate::api::{ManagedSecret, SecretApproval, SecretStore, VaultProfile};
use crate::crypto::OperatorKeys;
use crate::error::Result;
use crate::http::Probes;
use crate::labels::{MANAGED_LABEL, MANAGED_LABEL_VALUE, MANAGED_SECRET_LABEL};
use crate::leader::LeaderElection;
use crate::metrics::Metrics;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tokio::sync::watch;
use tracing::info;

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
    /// The client the watches use, when it is not the one requests use: requests have a
    /// read timeout (a request the API server holds, as it does for up to 60 s after etcd
    /// restarts, must not hold a reconcile slot that long), watches cannot (a quiet watch
    /// sends nothing for minutes; kube's watcher has its own idle timeout).
    pub watch_client: Option<Client>,
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
        watcher::watcher(api, wc)
            .backoff(WatchBackoff::default())
            .modify(|obj| trim_managed_fields(obj.meta_mut())),
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

fn selected(selector: &Option<String>) -> watcher::Config {
    match selector {
        Some(sel) => watcher::Config::default().labels(sel),
        None => watcher::Config::default(),
    }
}

/// Runs the SecretStore, VaultProfile and ManagedSecret controllers until `stop` says why.
pub(super) async fn run_controllers(
    client: Client,
    config: Config,
    rt: &Runtime,
    stop: watch::Receiver<Option<Stopped>>,
) -> Result<()> {
    log_panics_without_values();
    let watches = rt.watch_client.clone().unwrap_or_else(|| client.clone());
    let keys = OperatorKeys::load_or_create(client.clone(), &config.operator_namespace)
        .await
        .map_err(crate::error::Error::kube(
            crate::error::Verb::Read,
            format!(
                "the operator keys in namespace {}",
                config.operator_namespace
            ),
        ))?;
    let store_wc = selected(&config.store_selector);
    let (managed_api, secrets_api): (Api<ManagedSecret>, Api<PartialObjectMeta<Secret>>) =
        match &config.watch_namespace {
            Some(ns) => (
                Api::namespaced(watches.clone(), ns),
                Api::namespaced(watches.clone(), ns),
            ),
            None => (Api::all(watches.clone()), Api::all(watches.clone())),
        };
    let probes = rt.probes.clone();
    // Store changes reach the profiles that name them from the store controller's own cache
    // (already updated), so a profile never reads a store's older state than its trigger.
    let (store_changed, store_changes) = futures::channel::mpsc::unbounded::<SecretStore>();
    let (store_recovered, store_recoveries) = futures::channel::mpsc::unbounded::<SecretStore>();
    let mut recoveries = StoreRecoveries::new(store_recovered);
    let store_ctl = controller(
        Api::<SecretStore>::all(watches.clone()),
        store_wc.clone(),
        probes.clone(),
        move |event: &watcher::Event<SecretStore>| {
            recoveries.see(event);
            if let watcher::Event::Apply(s) | watcher::Event::Delete(s) = event {
                let _ = store_changed.unbounded_send(s.clone());
            }
        },
    );
    let (profile_changed, profile_changes) = futures::channel::mpsc::unbounded::<VaultProfile>();
    let (profiles_recheck, profiles_recheck_rx) = futures::channel::mpsc::unbounded::<()>();
    let mut profile_tap = ProfileChanges::new(profile_changed, profiles_recheck.clone());
    let profile_ctl = controller(
        Api::<VaultProfile>::all(watches.clone()),
        store_wc.clone(),
        probes.clone(),
        move |event| profile_tap.see(event),
    );
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
    let ns_recheck = profiles_recheck.clone();
    let ns_changes = reflector(
        ns_writer,
        watcher::watcher(
            Api::<PartialObjectMeta<Namespace>>::all(watches.clone()),
            ns_wc,
        )
        .backoff(WatchBackoff::default()),
    )
    .inspect(move |event| {
        if matches!(
            event,
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))
        ) {
            let _ = ns_recheck.unbounded_send(());
        }
    })
    .touched_objects();
    // SecretApprovals: each decision wakes the ManagedSecret it answers.
    let approvals_api: Api<SecretApproval> = match &config.watch_namespace {
        Some(ns) => Api::namespaced(watches.clone(), ns),
        None => Api::all(watches.clone()),
    };
    let approvals_writer = reflector::store::Writer::<SecretApproval>::default();
    let approvals = approvals_writer.as_reader();
    let approval_changes = reflector(
        approvals_writer,
        watcher::watcher(approvals_api, watcher::Config::default())
            .backoff(WatchBackoff::default())
            .modify(|obj| trim_managed_fields(obj.meta_mut())),
    )
    .touched_objects();
    let managed_synced = Arc::new(AtomicBool::new(false));
    let mut counts = ProfileCounts::new(managed_synced.clone(), profiles_recheck);
    let managed_ctl = controller(
        managed_api,
        selected(&config.managed_selector),
        probes,
        move |event| counts.see(event),
    );

    let (recheck, recheck_rx) = futures::channel::mpsc::channel(0);
    let reporter = Reporter {
        controller: config.field_manager.clone(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        health_checks: HealthChecks::new(recheck),
        client: client.clone(),
        caches: Caches {
            store_selector: config.store_selector.clone(),
            stores: store_ctl.store(),
            profiles: profile_ctl.store(),
            managed: managed_ctl.store(),
            approvals,
            managed_synced,
            namespaces,
        },
        backlog: Default::default(),
        turns: Turns::new(usize::from(config.concurrency)),
        status_writes: Default::default(),
        secret_writes: Default::default(),
        registry: StoreRegistry::new(
            client.clone(),
            &config.operator_namespace,
            &config.service_account,
            keys.clone(),
            config.pkcs11_modules.clone(),
            config.credential_namespaces.clone(),
        ),
        events: Events::new(client.clone(), reporter),
        keys,
        config: config.clone(),
        metrics: rt.metrics.clone(),
        retries: Default::default(),
    });
    rt.metrics
        .watch_caches(ctx.caches.stores.clone(), ctx.caches.managed.clone());

    // Profiles follow their stores' health, and each other and the namespaces (conflicts).
    let profiles = ctx.caches.profiles.clone();
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
    let (profiles, managed) = (ctx.caches.profiles.clone(), ctx.caches.managed.clone());
    let managed_ctl =
        watch_for_managed(managed_ctl, &ctx, profile_changes, ns_changes, secrets_api)
            .watches_stream(approval_changes, |a: SecretApproval| {
                Some(ObjectRef::new(&a.spec.secret_ref.name).within(&a.namespace()?))
            })
            .watches_stream(store_recoveries.map(Ok), move |store: SecretStore| {
                using_store(&store.name_any(), &profiles.state(), &managed.state())
            });

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
    // Once stopping, no ManagedSecret reconcile still waiting for its turn runs.
    let turns = ctx.turns.clone();
    let closing = stopped(stop.clone());
    tokio::spawn(async move {
        closing.await;
        turns.close();
    });
    // The ManagedSecret controller hands its turns out itself (turns.rs): kube-runtime's
    // limit, saturated, starves some objects for good.
    let managed_done = managed_ctl
        .with_config(controller_config.concurrency(0))
        .graceful_shutdown_on(stopped(stop))
        .run(reconcile_managed, managed_secret::error_policy, ctx.clone())
        .for_each(|r| async move { log_result("ManagedSecret", r) });
    futures::join!(stores_done, profiles_done, managed_done);
    ctx.registry.shutdown().await;
    info!("keyhaven controllers stopped");
    Ok(())
}

/// ManagedSecrets follow their profile (those without spec.profile: every profile, as any
/// may change what they resolve to), their namespace's labels and annotations, and their
/// native Secrets, watched by label only.
fn watch_for_managed(
    managed_ctl: Controller<ManagedSecret>,
    ctx: &Arc<Context>,
    profile_changes: impl futures::Stream<Item = VaultProfile> + Send + 'static,
    ns_changes: impl futures::Stream<Item = Result<PartialObjectMeta<Namespace>, watcher::Error>>
    + Send
    + 'static,
    secrets_api: Api<PartialObjectMeta<Secret>>,
) -> Controller<ManagedSecret> {
    let managed = ctx.caches.managed.clone();
    let managed_in_ns = ctx.caches.managed.clone();
    let sources = ctx.caches.managed.clone();
    let sources_api = secrets_api.clone();
    let ctx = ctx.clone();
    managed_ctl
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
            .backoff(WatchBackoff::default())
            .filter_map(move |event| {
                let touched = match event {
                    Ok(watcher::Event::Apply(s)) if ctx.secret_writes.is_own(&s) => None,
                    Ok(
                        watcher::Event::Apply(s)
                        | watcher::Event::InitApply(s)
                        | watcher::Event::Delete(s),
                    ) => Some(Ok(s)),
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                    Err(e) => Some(Err(e)),
                };
                futures::future::ready(touched)
            }),
            |secret: PartialObjectMeta<Secret>| {
                let owner = secret.labels().get(MANAGED_SECRET_LABEL).cloned();
                owner.map(|name| {
                    ObjectRef::new(&name).within(&secret.namespace().unwrap_or_default())
                })
            },
        )
        // The Secrets `content.fromSecret` pushes (any Secret keyhaven did not write),
        // metadata only and cached nowhere: a change is a new version at once, not at the
        // next refresh. The first list wakes nothing (every ManagedSecret reconciles when the
        // operator starts); a list after a watch gap (an etcd restart) wakes the pushers of
        // every Secret in it, as changes made in the gap come only that way.
        .watches_stream(
            watcher::watcher(
                sources_api,
                watcher::Config::default()
                    .labels(&format!("{MANAGED_LABEL}!={MANAGED_LABEL_VALUE}")),
            )
            .backoff(WatchBackoff::default())
            .filter_map({
                let mut listed = false;
                move |event| {
                    futures::future::ready(match event {
                        Ok(watcher::Event::Apply(s) | watcher::Event::Delete(s)) => Some(Ok(s)),
                        Ok(watcher::Event::InitApply(s)) if listed => Some(Ok(s)),
                        Ok(watcher::Event::InitDone) => {
                            listed = true;
                            None
                        }
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    })
                }
            }),
            move |secret: PartialObjectMeta<Secret>| {
                let namespace = secret.namespace().unwrap_or_default();
                pushing(&namespace, &secret.name_any(), &sources.state())
            },
        )
}

/// Replaces the default panic hook (which prints the panic's message, which may quote a
/// value) with one that logs where the panic happened, and its message only when that is a
/// literal (`&'static str`): a formatted message is dropped.
fn log_panics_without_values() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let message = info.payload().downcast_ref::<&'static str>().copied();
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()));
            tracing::error!(
                location = location.as_deref().unwrap_or("unknown"),
                message = message.unwrap_or("(formatted message withheld)"),
                "panic"
            );
        }));
    });
}

// The reconcilers, counted and timed by kind; a panic fails the one reconcile. One that
// succeeds ends its object's backoff ([`retry`](super::retry)).
async fn reconcile_store(obj: Arc<SecretStore>, ctx: Arc<Context>) -> Result<Action> {
    let object = obj.name_any();
    let key = secret_store::retry_key(&obj);
    let result = ctx
        .metrics
        .reconcile(
            "SecretStore",
            object,
            secret_store::reconcile(obj, ctx.clone()),
        )
        .await;
    succeeded(&ctx, &key, result)
}

async fn reconcile_profile(obj: Arc<VaultProfile>, ctx: Arc<Context>) -> Result<Action> {
    let object = obj.name_any();
    let key = vault_profile::retry_key(&obj);
    let result = ctx
        .metrics
        .reconcile(
            "VaultProfile",
            object,
            vault_profile::reconcile(obj, ctx.clone()),
        )
        .await;
    succeeded(&ctx, &key, result)
}

async fn reconcile_managed(obj: Arc<ManagedSecret>, ctx: Arc<Context>) -> Result<Action> {
    // The lane of the object as the cache holds it now (a spec change since this request
    // was made makes it urgent).
    let cached = ctx.caches.managed.get(&ObjectRef::from_obj(obj.as_ref()));
    let lane = match super::backlog::awaits_sync(
        cached.as_deref().unwrap_or(&obj),
        jiff::Timestamp::now(),
    ) {
        true => Lane::Urgent,
        false => Lane::Routine,
    };
    let namespace = obj.namespace().unwrap_or_default();
    ctx.metrics.set_reconciles_waiting(ctx.turns.waiting() + 1);
    let turn = ctx.turns.take(&namespace, lane).await;
    ctx.metrics.set_reconciles_waiting(ctx.turns.waiting());
    let Some(_turn) = turn else {
        // The controller stops (shutdown, leadership lost): nothing more is written.
        return Ok(Action::await_change());
    };
    // The object as it is now: it may have changed, or gone, while it waited.
    let Some(obj) = ctx.caches.managed.get(&ObjectRef::from_obj(obj.as_ref())) else {
        return Ok(Action::await_change());
    };
    let object = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    let key = managed_secret::retry_key(&obj);
    let result = ctx
        .metrics
        .reconcile(
            "ManagedSecret",
            object,
            // Boxed: a reconcile waiting for its turn (thousands at a cold start) holds a
            // pointer, not the whole reconcile's state.
            Box::pin(managed_secret::reconcile(obj, ctx.clone())),
        )
        .await;
    succeeded(&ctx, &key, result)
}

fn succeeded(ctx: &Context, key: &str, result: Result<Action>) -> Result<Action> {
    if result.is_ok() {
        ctx.retries.succeeded(key);
    }
    result
}

fn log_result<K: Resource, E: std::fmt::Display>(
    kind: &str,
    result: std::result::Result<(ObjectRef<K>, Action), E>,
) {
    if let Err(e) = result {
        // Reconcile errors are already in the object's status and events.
        tracing::debug!(kind, error = %e, "reconcile failed");
    }
}
