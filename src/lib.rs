//! keyhaven: a Kubernetes operator for typed, versioned secrets kept in several stores.

pub mod access_review;
pub mod api;
pub mod audit;
pub mod backend;
pub mod compliance;
pub mod content;
pub mod controller;
pub mod crypto;
pub mod error;
pub mod http;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod profiles;
pub mod secret_data;
pub mod tenancy;
pub mod webhook;

/// Selects rustls' crypto provider for the process (ring). Some dependencies enable a
/// second provider, and rustls then refuses to choose; call this before any TLS client is
/// built. Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
