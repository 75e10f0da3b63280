//! `SecretStore`: a backend the platform team configures (cluster-scoped).

// Several `printcolumn(..)` in one `#[kube(..)]` repeat `type_ = ..`; clippy reads that as a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use super::common::{
    ClampToSchema, DURATION_PATTERN, MAX_DURATION_TEXT, MAX_MESSAGE, MAX_NAME, MAX_NAMESPACE,
    MAX_PATH, MAX_TIME, SecretKeyRef, clamp_conditions, clamp_opt, clamp_text, conditions_schema,
    named_enum,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A configured secret backend. Exactly one provider is set.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keyhaven.io",
    version = "v1alpha1",
    kind = "SecretStore",
    doc = "A configured secret backend (internal, kubernetes, vault, pkcs11) with its health and the number of secrets it holds.",
    status = "SecretStoreStatus",
    shortname = "khstore",
    category = "keyhaven",
    printcolumn(name = "Type", type_ = "string", json_path = ".status.type"),
    printcolumn(name = "Secrets", type_ = "integer", json_path = ".status.secrets"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 63").message("a SecretStore name has at most 63 characters (it is used as a label value)"),
)]
#[serde(rename_all = "camelCase")]
pub struct SecretStoreSpec {
    /// The backend. Exactly one of its fields is set.
    pub provider: Provider,
}

/// The backend of a store: exactly one of `internal`, `kubernetes`, `vault` or `pkcs11`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.internal), has(self.kubernetes), has(self.vault), has(self.pkcs11)].filter(x, x).size() == 1").message("exactly one provider must be set"),
)]
pub struct Provider {
    /// keyhaven's own software-encrypted store, the zero-dependency default: every version
    /// is encrypted with AES-256-GCM under a fresh data key, which a master key held in a
    /// Secret of the operator's namespace wraps; ciphertexts are kept in Secrets there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal: Option<InternalProvider>,
    /// Plain Kubernetes Secrets in a namespace of the operator's cluster. The current
    /// value of a path lives in a Secret named after the path (`/` becomes `.`), each
    /// version in an immutable copy named `<name>.v<N>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesProvider>,
    /// A HashiCorp Vault or OpenBao KV secrets engine (version 2 or 1). A path holds one
    /// secret object, its key/values written and read as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vault: Option<VaultProvider>,
    /// A PKCS#11 token (an HSM): envelope encryption as in the internal store, but every
    /// data key is wrapped by an AES-256 key-encryption key that never leaves the token.
    /// Ciphertexts and wrapped keys are kept in Secrets of the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11: Option<Pkcs11Provider>,
}

/// Settings of the internal store (none yet).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
pub struct InternalProvider {}

/// Settings of the kubernetes store.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesProvider {
    /// The namespace holding the store's Secrets. It must exist and must not be the
    /// operator's namespace. The store reads, replaces and deletes only Secrets carrying its
    /// labels (`app.kubernetes.io/managed-by: keyhaven`, `keyhaven.io/store: <store>`).
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self) <= 63").message("must be a namespace name"))]
    #[schemars(length(max = MAX_NAMESPACE))]
    pub namespace: String,
}

/// Settings of a Vault / OpenBao store.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.insecureHTTP) || !self.insecureHTTP || self.server.startsWith('http://')").message("insecureHTTP is for an http:// server only"),
)]
pub struct VaultProvider {
    /// The server's address, e.g. `https://vault.example.com:8200`. `https://` is required:
    /// an `http://` server is refused (the store is Invalid) unless `insecureHTTP` is set.
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#]+$')").message("server is https://host[:port] (or http:// with insecureHTTP), without a path"))]
    #[schemars(length(max = 512))]
    pub server: String,
    /// Allow an `http://` server: the token and every secret value then cross the network
    /// in plaintext. For a development server on loopback only. The store shows the
    /// condition `Insecure=True` (reason `PlaintextHTTP`) while it is set. Default false;
    /// only allowed with an `http://` server.
    #[serde(
        default,
        rename = "insecureHTTP",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub insecure_http: bool,
    /// The KV secrets engine's mount path. Default `secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$')").message("mount is a path without leading or trailing '/'"))]
    #[schemars(length(max = MAX_PATH))]
    pub mount: Option<String>,
    /// The KV engine's version: `v2` (versioned; the default) or `v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<KvVersion>,
    /// The Vault Enterprise / OpenBao namespace, sent as `X-Vault-Namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PATH))]
    pub namespace: Option<String>,
    /// The PEM bundle of CAs that sign the server's certificate, from a Secret or a ConfigMap.
    /// The system's roots are used without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_provider: Option<CaProvider>,
    /// How long one request may take (Go duration). Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub request_timeout: Option<String>,
    /// How keyhaven logs in. Exactly one method is set.
    pub auth: VaultAuth,
    /// Log in afresh on this schedule (Go duration, e.g. `24h`) even when the token could
    /// still be renewed. Without it the token is renewed until it cannot be, then replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub token_rotate: Option<String>,
}

/// Settings of a PKCS#11 (HSM) store.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.tokenLabel) != has(self.slotId)").message("exactly one of tokenLabel and slotId must be set"),
)]
pub struct Pkcs11Provider {
    /// Absolute path of the PKCS#11 module (a shared library) in the operator's filesystem,
    /// e.g. `/usr/lib/softhsm/libsofthsm2.so`. It must be on the operator's `--pkcs11-modules`
    /// list (the store is Invalid otherwise, and nothing is loaded); it is loaded once per
    /// operator process.
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("module is an absolute path"))]
    #[schemars(length(max = 1024))]
    pub module: String,
    /// The label of the token holding the key-encryption key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("size(self) >= 1 && size(self) <= 32").message("a token label has 1 to 32 characters"))]
    #[schemars(length(max = 32))]
    pub token_label: Option<String>,
    /// The slot of the token, where labels are ambiguous. Prefer `tokenLabel`: slot ids
    /// may change when tokens are added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_id: Option<u64>,
    /// The user PIN of the token, from a key of a Secret (namespace: the operator's by
    /// default). Re-read while the store runs: a changed PIN is tried once, and a PIN the
    /// token refused is not tried again until the Secret changes, so keyhaven never locks
    /// the token by retrying a wrong PIN.
    pub pin_secret_ref: SecretKeyRef,
    /// The label of the AES-256 key-encryption key (KEK) on the token. Created on first
    /// use (sensitive, non-extractable) when no key has this label. Changing it rotates the
    /// KEK: every data key of the store is re-wrapped under the new key, and the old key is
    /// then reported unused in `status.kekRotation`; keyhaven never deletes a key.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$')").message("kekLabel has 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"))]
    #[schemars(length(max = MAX_KEK_LABEL))]
    pub kek_label: String,
    /// Sessions keyhaven keeps open on the token at most (shared by every store on the
    /// same token; the largest setting wins). Default 16, the operator's default number of
    /// concurrent reconciles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1024").message("maxSessions is between 1 and 1024"))]
    pub max_sessions: Option<u32>,
}

/// The KV secrets engine version.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum KvVersion {
    #[serde(rename = "v1")]
    V1,
    #[default]
    #[serde(rename = "v2")]
    V2,
}

/// Where a CA bundle is kept.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaProvider {
    /// `Secret` or `ConfigMap`.
    #[serde(rename = "type")]
    pub type_: CaProviderType,
    /// The object's name.
    #[schemars(length(max = MAX_NAME))]
    pub name: String,
    /// The object's namespace; default the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_NAMESPACE))]
    pub namespace: Option<String>,
    /// The key holding the PEM bundle.
    #[schemars(length(max = MAX_NAME))]
    pub key: String,
}

/// The kind of object holding a CA bundle.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum CaProviderType {
    Secret,
    ConfigMap,
}

/// How keyhaven authenticates to Vault: exactly one of `tokenSecretRef`, `kubernetes`,
/// `appRole`. One login per store is shared by every reconcile, renewed before it expires.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("[has(self.tokenSecretRef), has(self.kubernetes), has(self.appRole)].filter(x, x).size() == 1").message("exactly one auth method must be set"),
)]
pub struct VaultAuth {
    /// A static token, from a key of a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
    /// The kubernetes auth method: a ServiceAccount token from the TokenRequest API, which
    /// Vault checks with the cluster's TokenReview.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<VaultKubernetesAuth>,
    /// The AppRole auth method: a role id and a secret id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_role: Option<VaultAppRoleAuth>,
}

/// Settings of the kubernetes auth method.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultKubernetesAuth {
    /// Where the method is mounted. Default `kubernetes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PATH))]
    pub mount_path: Option<String>,
    /// The Vault role to log in as.
    #[schemars(length(max = MAX_NAME))]
    pub role: String,
    /// The ServiceAccount whose token is presented. Default: the operator's own
    /// (`--service-account` in the operator's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_ref: Option<ServiceAccountRef>,
    /// Audiences of the requested token. Default: `[vault]`, so the token is of no use to
    /// the API server or any other service; set it to what the Vault role's `audience`
    /// expects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 512)))]
    pub audiences: Vec<String>,
}

/// A ServiceAccount.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    #[schemars(length(max = MAX_NAME))]
    pub name: String,
    /// Default: the operator's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_NAMESPACE))]
    pub namespace: Option<String>,
}

/// Settings of the AppRole auth method.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.roleId) != has(self.roleRef)").message("exactly one of roleId and roleRef must be set"),
)]
pub struct VaultAppRoleAuth {
    /// Where the method is mounted. Default `approle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PATH))]
    pub path: Option<String>,
    /// The role id, inline (it is not a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_NAME))]
    pub role_id: Option<String>,
    /// The role id, from a key of a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_ref: Option<SecretKeyRef>,
    /// The secret id, from a key of a Secret.
    pub secret_ref: SecretKeyRef,
}

named_enum! {
    /// The store's health, as `juju secret-backends` shows it: Active (reachable and
    /// usable), Draining (being emptied by a migration; still readable), Sealed (reachable
    /// but locked: a sealed Vault, an HSM token that refuses the PIN), Unreachable (does not
    /// answer) or Invalid (misconfigured: the spec or the credentials are wrong).
    pub enum StorePhase {
        Active,
        Draining,
        Sealed,
        Unreachable,
        Invalid,
    }
}

/// Observed state of a SecretStore.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretStoreStatus {
    /// Active, Draining, Sealed, Unreachable or Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<StorePhase>,
    /// The provider kind: internal, kubernetes, vault or pkcs11.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    #[schemars(length(max = 16))]
    pub type_: Option<String>,
    /// How many secret objects (paths) the store holds for keyhaven.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<u64>,
    /// Why the store is in its phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_MESSAGE))]
    pub message: Option<String>,
    /// When the health was last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_TIME))]
    pub last_checked: Option<Time>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` is True when the store is Active; `Insecure` is True while a vault store
    /// talks plaintext `http://` (`insecureHTTP`); `DeletionBlocked` while its deletion waits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// pkcs11 stores: the label of the key-encryption key that wraps new data keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_KEK_LABEL))]
    pub active_kek: Option<String>,
    /// pkcs11 stores: the key-encryption key rotation in progress, or the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kek_rotation: Option<KekRotationStatus>,
}

/// Progress of a key-encryption key rotation: every data key of the store is re-wrapped,
/// one sealed version at a time, from the keys in `from` to the key `to`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KekRotationStatus {
    /// Labels of the keys data keys are moved off.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_KEK_LABELS), inner(length(max = MAX_KEK_LABEL)))]
    pub from: Vec<String>,
    /// Label of the key data keys are moved to (`spec.provider.pkcs11.kekLabel`).
    #[schemars(length(max = MAX_KEK_LABEL))]
    pub to: String,
    /// `Rotating` or `Complete`.
    pub phase: KekRotationPhase,
    /// Data keys (sealed versions) re-wrapped under `to` so far.
    pub rewrapped: u64,
    /// Data keys to re-wrap in all: those found under another key, counting any that
    /// appeared during the rotation.
    pub total: u64,
    /// Keys of `from` that wrap no data key of this store any more. They stay on the
    /// token (keyhaven never deletes a key): delete them once no backup needs them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_KEK_LABELS), inner(length(max = MAX_KEK_LABEL)))]
    pub unused_keys: Vec<String>,
    /// Why the rotation is where it is (e.g. versions that could not be re-wrapped yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_MESSAGE))]
    pub message: Option<String>,
    /// When the rotation started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_TIME))]
    pub started_at: Option<Time>,
    /// When the last data key was re-wrapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_TIME))]
    pub completed_at: Option<Time>,
}

/// The longest key-encryption key label (`kekLabel`'s rule).
pub const MAX_KEK_LABEL: usize = 64;
/// The most key labels a rotation lists in `from` and in `unusedKeys`.
pub const MAX_KEK_LABELS: usize = 64;

impl ClampToSchema for SecretStoreStatus {
    fn clamp_to_schema(&mut self) {
        clamp_opt(&mut self.message, MAX_MESSAGE);
        clamp_conditions(&mut self.conditions);
        clamp_opt(&mut self.active_kek, MAX_KEK_LABEL);
        if let Some(r) = &mut self.kek_rotation {
            r.from.truncate(MAX_KEK_LABELS);
            r.unused_keys.truncate(MAX_KEK_LABELS);
            for label in r.from.iter_mut().chain(&mut r.unused_keys) {
                clamp_text(label, MAX_KEK_LABEL);
            }
            clamp_text(&mut r.to, MAX_KEK_LABEL);
            clamp_opt(&mut r.message, MAX_MESSAGE);
        }
    }
}

/// The state of a key-encryption key rotation.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum KekRotationPhase {
    /// Data keys under another key remain; they are being re-wrapped.
    #[default]
    Rotating,
    /// Every data key is under `to`.
    Complete,
}

impl VaultProvider {
    /// Whether `server` is a plaintext `http://` address (the scheme compared without
    /// regard to case, as URLs have it).
    pub fn is_plaintext(&self) -> bool {
        self.server
            .trim()
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"))
    }
}

impl SecretStoreSpec {
    /// Where the store keeps its data, as far as two stores can share it: a Vault server's
    /// mount (and Vault namespace), a Kubernetes namespace; None for stores whose records
    /// are their own (internal, pkcs11: keyed by the store's name).
    pub fn backend_identity(&self) -> Option<String> {
        if let Some(v) = &self.provider.vault {
            let server = v.server.trim_end_matches('/');
            let mount = v.mount.as_deref().unwrap_or("secret").trim_matches('/');
            let ns = v.namespace.as_deref().unwrap_or("");
            return Some(format!("vault {server} {ns} {mount}"));
        }
        self.provider
            .kubernetes
            .as_ref()
            .map(|k| format!("kubernetes {}", k.namespace))
    }

    /// The provider kind's name, as shown in the TYPE column.
    pub fn provider_type(&self) -> &'static str {
        match &self.provider {
            Provider {
                internal: Some(_), ..
            } => "internal",
            Provider {
                kubernetes: Some(_),
                ..
            } => "kubernetes",
            Provider { vault: Some(_), .. } => "vault",
            Provider {
                pkcs11: Some(_), ..
            } => "pkcs11",
            _ => "none",
        }
    }
}
