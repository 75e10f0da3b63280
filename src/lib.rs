//! keyhaven: a Kubernetes operator for typed, versioned secrets kept in several stores.

pub mod api;
pub mod backend;
pub mod content;
pub mod controller;
pub mod crypto;
pub mod error;
pub mod secret_data;
