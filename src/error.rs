//! The controller's errors. Each says what failed and on which object; none carries a value.

use crate::backend::BackendError;
use crate::content::ContentError;

/// A reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Content(#[from] ContentError),
    /// The spec refers to something that does not exist or cannot be used; retried slowly.
    #[error("{message}")]
    Config {
        reason: &'static str,
        message: String,
    },
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// The CamelCase reason used in conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesError",
            Error::Backend(BackendError::Unreachable { .. }) => "StoreUnreachable",
            Error::Backend(BackendError::Sealed { .. }) => "StoreSealed",
            Error::Backend(BackendError::Invalid { .. }) => "StoreInvalid",
            Error::Backend(_) => "StoreError",
            Error::Content(_) => "InvalidContent",
            Error::Config { reason, .. } => reason,
            Error::Finalizer(_) => "FinalizerError",
        }
    }

    pub fn config(reason: &'static str, message: impl Into<String>) -> Self {
        Error::Config {
            reason,
            message: message.into(),
        }
    }

    /// Whether retrying soon may help (a store or the API server was briefly away) or the
    /// spec must change first.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Kube(_)
                | Error::Backend(BackendError::Unreachable { .. } | BackendError::Conflict { .. })
                | Error::Finalizer(_)
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
