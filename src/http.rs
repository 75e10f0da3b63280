//! The operator's HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process
//! answers) and `/readyz` (leadership is known and, on the leader, the caches are synced).

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::task::JoinHandle;
use tracing::info;

/// What `/readyz` reports, set by the controller run as it goes.
#[derive(Debug, Default)]
pub struct Probes {
    leadership_known: AtomicBool,
    leader: AtomicBool,
    caches_synced: AtomicUsize,
    caches_expected: AtomicUsize,
    stopping: AtomicBool,
}

impl Probes {
    /// Whether this process is leader is settled (it leads, or another holder's Lease was seen).
    pub fn set_leadership(&self, leader: bool) {
        self.leader.store(leader, Ordering::SeqCst);
        self.leadership_known.store(true, Ordering::SeqCst);
    }

    /// The controllers start `expected` caches; none is synced yet.
    pub fn expect_caches(&self, expected: usize) {
        self.caches_synced.store(0, Ordering::SeqCst);
        self.caches_expected.store(expected, Ordering::SeqCst);
    }

    /// One more cache holds its first full list.
    pub fn cache_synced(&self) {
        self.caches_synced.fetch_add(1, Ordering::SeqCst);
    }

    /// Shutting down: no longer ready.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Why the process is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<String> {
        if self.stopping.load(Ordering::SeqCst) {
            return Some("shutting down".into());
        }
        if !self.leadership_known.load(Ordering::SeqCst) {
            return Some("leadership not known yet".into());
        }
        if !self.leader.load(Ordering::SeqCst) {
            return None; // a standby is ready to take over
        }
        let (synced, expected) = (
            self.caches_synced.load(Ordering::SeqCst),
            self.caches_expected.load(Ordering::SeqCst),
        );
        if expected == 0 || synced < expected {
            return Some(format!("caches synced: {synced} of {expected}"));
        }
        None
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    probes: Arc<Probes>,
}

/// Binds `addr` and serves until `shutdown` completes. Returns the bound address (useful
/// with port 0) and the server's task.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    probes: Arc<Probes>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, probes });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(address = %bound, "metrics and probes listening");
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok((bound, task))
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match state.probes.not_ready() {
        None => (StatusCode::OK, "ok".to_owned()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_leadership_then_synced_caches() {
        let p = Probes::default();
        assert!(p.not_ready().is_some());
        p.set_leadership(false);
        assert_eq!(p.not_ready(), None, "a standby is ready");
        p.set_leadership(true);
        p.expect_caches(2);
        assert!(p.not_ready().unwrap().contains("0 of 2"));
        p.cache_synced();
        p.cache_synced();
        assert_eq!(p.not_ready(), None);
        p.stopping();
        assert_eq!(p.not_ready().as_deref(), Some("shutting down"));
    }
}
