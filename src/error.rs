//! The controller's errors. Each says what failed and on which object; none carries a value.

use crate::api::Reason;
use crate::backend::BackendError;
use crate::content::ContentError;

/// A reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API request failed: which one, on which object.
    #[error("{verb} {object}: {source}")]
    Kube {
        verb: Verb,
        /// `Kind namespace/name`, or what was listed.
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Content(#[from] ContentError),
    /// The spec refers to something that does not exist or cannot be used; retried slowly.
    #[error("{message}")]
    Config { reason: Reason, message: String },
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// The reconcile panicked (a bug): caught, so only this reconcile failed; retried with
    /// backoff. Says which object, never the panic's message (it may quote a value).
    #[error("the reconcile of {kind} {object} panicked (a bug in keyhaven); retried with backoff")]
    Panicked { kind: &'static str, object: String },
}

/// What a failed Kubernetes API request was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Read,
    List,
    Create,
    Apply,
    Patch,
    Replace,
    Delete,
    ReadStatus,
    ApplyStatus,
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verb::Read => "reading",
            Verb::List => "listing",
            Verb::Create => "creating",
            Verb::Apply => "applying",
            Verb::Patch => "patching",
            Verb::Replace => "replacing",
            Verb::Delete => "deleting",
            Verb::ReadStatus => "reading the status of",
            Verb::ApplyStatus => "writing the status of",
        })
    }
}

impl Error {
    /// The reason used in conditions and events.
    pub fn reason(&self) -> Reason {
        match self {
            Error::Kube { .. } => Reason::KubernetesError,
            Error::Backend(BackendError::Unreachable { .. }) => Reason::StoreUnreachable,
            Error::Backend(BackendError::Sealed { .. }) => Reason::StoreSealed,
            Error::Backend(BackendError::Invalid { .. }) => Reason::StoreInvalid,
            Error::Backend(BackendError::Foreign { .. }) => Reason::PathOwnedElsewhere,
            Error::Backend(_) => Reason::StoreError,
            Error::Content(_) => Reason::InvalidContent,
            Error::Config { reason, .. } => *reason,
            Error::Finalizer(_) => Reason::FinalizerError,
            Error::Panicked { .. } => Reason::ReconcilePanicked,
        }
    }

    pub fn config(reason: Reason, message: impl Into<String>) -> Self {
        Error::Config {
            reason,
            message: message.into(),
        }
    }

    /// Wraps a failed Kubernetes request `verb` on `object`: `.map_err(Error::kube(..))`.
    pub fn kube(verb: Verb, object: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let object = object.into();
        move |source| Error::Kube {
            verb,
            object,
            source,
        }
    }

    /// Whether retrying soon may help (a store or the API server was briefly away) or the
    /// spec must change first.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Kube { .. } => !self.is_repeated(),
            Error::Backend(BackendError::Unreachable { .. } | BackendError::Conflict { .. })
            | Error::Finalizer(_) => true,
            _ => false,
        }
    }

    /// Whether the same request will fail the same way until something changes: the API
    /// server refused it as a client error (413 too large, 422 invalid, 403 forbidden,
    /// 400 bad request, ...; not 404, 408, 409, 410 or 429, which a retry may get past), or
    /// the reconcile panicked. Such failures back off exponentially.
    pub fn is_repeated(&self) -> bool {
        match self {
            Error::Kube {
                source: kube::Error::Api(status),
                ..
            } => {
                (400..500).contains(&status.code)
                    && ![404, 408, 409, 410, 429].contains(&status.code)
            }
            Error::Panicked { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kube_error_says_what_was_done_to_which_object() {
        let source = kube::Error::Api(Box::new(
            kube::core::Status::failure("secrets \"db\" is forbidden", "Forbidden").with_code(403),
        ));
        let e = Error::kube(Verb::Apply, "Secret team-a/db")(source);
        let text = e.to_string();
        assert!(text.starts_with("applying Secret team-a/db: "), "{text}");
        assert_eq!(e.reason(), Reason::KubernetesError);
        assert!(e.is_repeated(), "forbidden stays forbidden");
        assert!(!e.is_transient());
        let unavailable = kube::Error::Api(Box::new(
            kube::core::Status::failure("etcd timeout", "ServiceUnavailable").with_code(503),
        ));
        let e = Error::kube(Verb::ApplyStatus, "ManagedSecret team-a/db")(unavailable);
        assert!(e.is_transient() && !e.is_repeated());
    }
}
