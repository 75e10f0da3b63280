//! The controllers: one reconciler per kind, sharing one [`Context`]. This file runs them
//! (leadership, shutdown); [`wiring`] builds them and connects their watches.
//!
//! Dependencies among these modules run one way: `wiring` → the reconcilers
//! (`managed_secret`, `vault_profile`, `secret_store`) → `migration`, `store_guard` →
//! `context`, `status`, `events`, `own_writes`, `backlog`, `stores`, `retry`.

mod backlog;
mod context;
mod events;
mod managed_secret;
mod migration;
mod own_writes;
mod retry;
mod secret_store;
mod status;
mod store_guard;
mod stores;
mod turns;
mod vault_profile;
mod watch_filters;
mod wiring;

pub use crate::labels::{FORCE_DELETE_ANNOTATION, ROTATE_ANNOTATION, STORE_FINALIZER};
pub use context::{Config, Context};
pub use managed_secret::FINALIZER;
pub use stores::{CredentialNamespaces, StoreRegistry};
pub use wiring::{Runtime, Stopped};

use crate::api::Reason;
use crate::error::{Error, Result, Verb};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

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
                Error::config(
                    Reason::LeaderElectionFailed,
                    format!("leader election: {e}"),
                )
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
                    return Err(Error::config(Reason::LeaderElectionFailed, "leader election ended"));
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

    let result = wiring::run_controllers(client, config, &rt, stop_rx.clone()).await;
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

/// Creates the operator's namespace when it is missing (out-of-cluster runs).
pub async fn ensure_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let object = format!("Namespace {name}");
    let existing = match api.get_opt(name).await {
        // In a cluster the chart made the namespace and grants no access to namespaces.
        Err(kube::Error::Api(s)) if s.code == 403 => return Ok(()),
        other => other.map_err(Error::kube(Verb::Read, object.clone()))?,
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
            Err(e) => return Err(Error::kube(Verb::Create, object)(e)),
        }
        info!(namespace = name, "created the operator namespace");
    }
    Ok(())
}
