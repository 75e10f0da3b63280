//! Secret types: what each requires of a value, and how it becomes a native Secret.

use crate::api::SecretType;
use crate::secret_data::SecretData;
use std::collections::BTreeMap;

/// A value does not fit its type. Names keys, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    #[error("a {type_} secret needs key {key:?}; it has keys {present:?}")]
    MissingKey {
        type_: &'static str,
        key: &'static str,
        present: Vec<String>,
    },
    #[error("a {type_} secret's key {key:?} must not be empty")]
    EmptyKey {
        type_: &'static str,
        key: &'static str,
    },
    #[error("a {type_} secret's key {key:?} must be UTF-8 text")]
    NotText {
        type_: &'static str,
        key: &'static str,
    },
    #[error("a {type_} secret needs at least one key")]
    NoKeys { type_: &'static str },
    #[error("a {type_} secret's key {key:?} {problem}")]
    Invalid {
        type_: &'static str,
        key: &'static str,
        problem: String,
    },
    #[error("key name {0:?} is not a valid Secret key (letters, digits, '-', '_', '.')")]
    BadKeyName(String),
}

/// Checks `data` against the rules of `secret_type`.
pub fn validate(secret_type: SecretType, data: &SecretData) -> Result<(), ContentError> {
    let type_ = secret_type.as_str();
    for key in data.keys() {
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(ContentError::BadKeyName(key.to_owned()));
        }
    }
    let text = |key: &'static str| -> Result<&str, ContentError> {
        let value = data.get(key).ok_or_else(|| ContentError::MissingKey {
            type_,
            key,
            present: data.keys().map(str::to_owned).collect(),
        })?;
        let text = std::str::from_utf8(value).map_err(|_| ContentError::NotText { type_, key })?;
        if text.is_empty() {
            return Err(ContentError::EmptyKey { type_, key });
        }
        Ok(text)
    };
    match secret_type {
        SecretType::KeyValue | SecretType::Generic => {
            if data.is_empty() {
                return Err(ContentError::NoKeys { type_ });
            }
        }
        SecretType::BasicAuth => {
            text("username")?;
            text("password")?;
        }
        SecretType::Password => {
            text("password")?;
        }
        SecretType::ApiKey => {
            text("api-key")?;
            if data.get("expires-at").is_some() {
                let at = text("expires-at")?;
                at.parse::<jiff::Timestamp>()
                    .map_err(|_| ContentError::Invalid {
                        type_,
                        key: "expires-at",
                        problem: "must be an RFC 3339 timestamp".into(),
                    })?;
            }
        }
    }
    Ok(())
}

/// A native Secret's type and data for a value of `secret_type`.
pub struct Rendered {
    pub type_: &'static str,
    pub data: SecretData,
}

/// The native Secret for a value: basic-auth becomes `kubernetes.io/basic-auth`; the other
/// types become `Opaque` Secrets with the value's keys.
pub fn render(secret_type: SecretType, data: &SecretData) -> Rendered {
    let type_ = match secret_type {
        SecretType::BasicAuth => "kubernetes.io/basic-auth",
        _ => "Opaque",
    };
    Rendered {
        type_,
        data: data.clone(),
    }
}

/// Labels keyhaven puts on every native Secret it manages; the controller watches Secrets
/// through this selector only.
pub fn native_secret_labels(managed_secret: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_LABEL.to_owned(), MANAGED_LABEL_VALUE.to_owned()),
        (MANAGED_SECRET_LABEL.to_owned(), managed_secret.to_owned()),
    ])
}

/// The label selecting native Secrets keyhaven manages.
pub const MANAGED_LABEL: &str = "keyhaven.io/managed";
pub const MANAGED_LABEL_VALUE: &str = "true";
/// The label naming the ManagedSecret behind a native Secret.
pub const MANAGED_SECRET_LABEL: &str = "keyhaven.io/managed-secret";

#[cfg(test)]
mod tests {
    use super::*;

    fn data(kv: &[(&str, &[u8])]) -> SecretData {
        kv.iter().map(|(k, v)| (*k, v.to_vec())).collect()
    }

    #[test]
    fn basic_auth() {
        assert!(
            validate(
                SecretType::BasicAuth,
                &data(&[("username", b"u"), ("password", b"p")])
            )
            .is_ok()
        );
        let err = validate(
            SecretType::BasicAuth,
            &data(&[("username", b"u"), ("pass", b"s3cr3t")]),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            ContentError::MissingKey {
                key: "password",
                ..
            }
        ));
        assert!(!err.to_string().contains("s3cr3t"));
        assert!(
            validate(
                SecretType::BasicAuth,
                &data(&[("username", b""), ("password", b"p")])
            )
            .is_err()
        );
        assert!(
            validate(
                SecretType::BasicAuth,
                &data(&[("username", b"\xff"), ("password", b"p")])
            )
            .is_err()
        );
        assert_eq!(
            render(SecretType::BasicAuth, &data(&[])).type_,
            "kubernetes.io/basic-auth"
        );
    }

    #[test]
    fn password_api_key_key_value_generic() {
        assert!(validate(SecretType::Password, &data(&[("password", b"x")])).is_ok());
        assert!(validate(SecretType::Password, &data(&[("pw", b"x")])).is_err());
        assert!(validate(SecretType::ApiKey, &data(&[("api-key", b"k")])).is_ok());
        assert!(
            validate(
                SecretType::ApiKey,
                &data(&[("api-key", b"k"), ("expires-at", b"2030-01-01T00:00:00Z")])
            )
            .is_ok()
        );
        assert!(
            validate(
                SecretType::ApiKey,
                &data(&[("api-key", b"k"), ("expires-at", b"tomorrow")])
            )
            .is_err()
        );
        assert!(validate(SecretType::KeyValue, &data(&[])).is_err());
        assert!(validate(SecretType::KeyValue, &data(&[("a", b"\x00\x01")])).is_ok());
        assert!(validate(SecretType::Generic, &data(&[("bad key", b"x")])).is_err());
        assert_eq!(
            render(SecretType::KeyValue, &data(&[("a", b"1")])).type_,
            "Opaque"
        );
    }
}
