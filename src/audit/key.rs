//! The audit key: 32 random bytes in a Secret of the operator's namespace of its own, so
//! that an auditor may be given read access to it (to verify the log) without the keys that
//! decrypt stores. Created on first start; never rotated by keyhaven.

use super::AuditKey;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::collections::BTreeMap;

/// The Secret holding the audit key.
pub const AUDIT_KEY_SECRET: &str = "keyhaven-audit-key";
/// Its data key.
pub const AUDIT_KEY: &str = "audit-key";

/// Reads the audit key from `namespace`, creating it when absent (two operators starting at
/// once race on create; the loser reads the winner's key).
pub async fn load_or_create_key(client: Client, namespace: &str) -> Result<AuditKey, kube::Error> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let secret = match api.get_opt(AUDIT_KEY_SECRET).await? {
        Some(s) => s,
        None => match api.create(&PostParams::default(), &new_key_secret()).await {
            Ok(s) => s,
            Err(kube::Error::Api(e)) if e.code == 409 => api.get(AUDIT_KEY_SECRET).await?,
            Err(e) => return Err(e),
        },
    };
    key_of(&secret).ok_or_else(|| {
        kube::Error::Service(
            format!("Secret {namespace}/{AUDIT_KEY_SECRET} key {AUDIT_KEY:?} is not 32 bytes")
                .into(),
        )
    })
}

/// Reads the audit key from `namespace` (to verify a log).
pub async fn read_key(client: Client, namespace: &str) -> Result<AuditKey, kube::Error> {
    let secret = Api::<Secret>::namespaced(client, namespace)
        .get(AUDIT_KEY_SECRET)
        .await?;
    key_of(&secret).ok_or_else(|| {
        kube::Error::Service(
            format!("Secret {namespace}/{AUDIT_KEY_SECRET} holds no 32-byte {AUDIT_KEY:?}").into(),
        )
    })
}

/// The key a Secret holds, if it holds one.
pub fn key_of(secret: &Secret) -> Option<AuditKey> {
    let bytes = secret.data.as_ref()?.get(AUDIT_KEY)?;
    let key: [u8; 32] = bytes.0.as_slice().try_into().ok()?;
    Some(AuditKey::new(key))
}

fn new_key_secret() -> Secret {
    let mut key = vec![0u8; 32];
    rand::fill(&mut key[..]);
    Secret {
        metadata: ObjectMeta {
            name: Some(AUDIT_KEY_SECRET.into()),
            labels: Some(BTreeMap::from([(
                crate::labels::MANAGED_BY.into(),
                crate::labels::MANAGED_BY_VALUE.into(),
            )])),
            annotations: Some(BTreeMap::from([(
                crate::labels::DESCRIPTION_ANNOTATION.into(),
                "keyhaven's audit key: MACs every audit record (kubectl keyhaven audit verify). Give auditors read access to this Secret only.".into(),
            )])),
            ..Default::default()
        },
        immutable: Some(true),
        data: Some(BTreeMap::from([(AUDIT_KEY.into(), ByteString(key))])),
        ..Default::default()
    }
}

/// An audit key file: 32 raw bytes, or their hex or base64 (a trailing newline allowed).
pub fn key_from_file(path: &std::path::Path) -> Result<AuditKey, String> {
    use base64::Engine;
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes).trim().to_owned();
    let key = match bytes.len() {
        32 => Some(bytes.clone()),
        _ => hex::decode(&text)
            .ok()
            .or_else(|| base64::engine::general_purpose::STANDARD.decode(&text).ok()),
    };
    let key: [u8; 32] = key
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| format!("{}: not a 32-byte key (raw, hex or base64)", path.display()))?;
    Ok(AuditKey::new(key))
}
