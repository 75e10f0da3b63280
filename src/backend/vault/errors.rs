//! How the vault store reports a Vault client error: the phase it implies, and a message
//! naming the path (Vault's messages name paths and policies, never values).

use crate::backend::BackendError;
use vaultrs::error::ClientError;

/// Classifies a Vault client error. Vault's messages name paths and policies, not values.
pub(super) fn classify(store: &str, path: &str, e: ClientError) -> BackendError {
    let store = store.to_owned();
    match e {
        ClientError::APIError { code: 503, errors } => BackendError::Sealed {
            store,
            message: if errors.is_empty() {
                "Vault is sealed".into()
            } else {
                errors.join("; ")
            },
        },
        ClientError::APIError {
            code: code @ (401 | 403),
            errors,
        } => BackendError::Invalid {
            store,
            message: format!(
                "{path}: permission denied (HTTP {code}): {}",
                errors.join("; ")
            ),
        },
        ClientError::APIError { code, errors } if code >= 500 => BackendError::Unreachable {
            store,
            message: format!("{path}: HTTP {code}: {}", errors.join("; ")),
        },
        ClientError::APIError { code, errors } => BackendError::Invalid {
            store,
            message: format!("{path}: HTTP {code}: {}", errors.join("; ")),
        },
        ClientError::RestClientError { source } => BackendError::Unreachable {
            store,
            message: format!("{path}: {}", error_chain(&source)),
        },
        other => BackendError::Invalid {
            store,
            message: format!("{path}: {}", error_chain(&other)),
        },
    }
}

/// An error and its causes on one line ("connection refused" is usually a cause).
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}
