//! `ManagedSecret`: one typed secret object, its versions and its Kubernetes Secret
//! (namespaced).

// Several `printcolumn(..)` in one `#[kube(..)]` repeat `type_ = ..`; clippy reads that as a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use super::common::{
    ClampToSchema, DURATION_PATTERN, MAX_DURATION_TEXT, MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_NAME,
    MAX_PATH, MAX_REASON, MAX_STORE_NAME, MAX_TARGET_MESSAGE, MAX_TIME, MAX_USER, clamp_conditions,
    clamp_opt, clamp_text, conditions_schema, named_enum, string_map_schema,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A typed secret kept in a profile's stores and materialized as a native Secret.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keyhaven.io",
    version = "v1alpha1",
    kind = "ManagedSecret",
    doc = "A typed secret under a VaultProfile: versioned in its stores and materialized as a native Secret.",
    namespaced,
    status = "ManagedSecretStatus",
    shortname = "khsecret",
    shortname = "ms",
    category = "keyhaven",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Profile", type_ = "string", json_path = ".status.profile"),
    printcolumn(
        name = "Version",
        type_ = "integer",
        json_path = ".status.currentVersion"
    ),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.content.generate) || self.type in ['password', 'secret-key', 'api-key', 'ssh-key', 'private-key', 'certificate']").message("content.generate supports the types password, secret-key, api-key, ssh-key, private-key and certificate"))]
#[x_kube(validation = Rule::new("!has(self.rotation) || has(self.content.generate)").message("rotation needs content.generate: only generated values can be rotated"))]
#[x_kube(validation = Rule::new("has(oldSelf.path) == has(self.path)").message("path is immutable: it can be neither added nor removed"))]
pub struct ManagedSecretSpec {
    /// The VaultProfile whose stores hold this secret. Not set: the namespace's annotation
    /// `keyhaven.io/profile`, else the default profile selecting the namespace, else the
    /// fallback profile (`status.profile` records the one used). The profile's
    /// namespaceSelector must select this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_NAME))]
    pub profile: Option<String>,
    /// What the secret is; decides validation and the native Secret's type and keys.
    #[serde(rename = "type")]
    pub type_: SecretType,
    /// The secret object's name in the stores. Defaults to `<namespace>/<name>`. It must
    /// lie in the namespace's secret space of the profile (`<namespace>/` unless the profile's
    /// `secretSpace` maps it elsewhere), or be a path the profile shares with the namespace
    /// (read-only: `content.fromStore` only); any other path is refused
    /// (`PathNotInNamespace`) before anything is read or written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$') && size(self) <= 200").message("path is slash-separated segments of letters, digits, '_', '.' and '-' (a segment may not start with '.' or '-'), at most 200 characters"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("path is immutable"))]
    #[schemars(length(max = MAX_PATH))]
    pub path: Option<String>,
    /// Where the value comes from.
    pub content: ContentSource,
    /// How often the source is read again (Go duration, e.g. `1h`). Default 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub refresh_interval: Option<String>,
    /// The native Secret pods consume.
    #[serde(default)]
    pub target: TargetSpec,
    /// Recorded in the version history as the reason of the next new version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_REASON))]
    pub reason: Option<String>,
    /// Generated values only: make a new generated version on a schedule. The annotation
    /// `keyhaven.io/rotate` (any new value) rotates now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationSpec>,
    /// Make a NEW version holding version N's content, read from the store N was written
    /// to. While set, it wins over the content source; history is never rewritten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub rollback_to: Option<u64>,
    /// Workloads restarted (as `kubectl rollout restart` does) when the native Secret's
    /// content changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub rollout_restart_targets: Vec<RolloutRestartTarget>,
    /// api-key, certificate and jwt: warn (condition `Expiring`, Event) when the value
    /// expires within this window (Go duration). Default 720h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub expiry_warning: Option<String>,
}

/// When a generated value is replaced by a new one.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// Age of the current version after which a new one is generated (Go duration, e.g. `720h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub interval: Option<String>,
}

/// A workload restarted when the native Secret changes.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRestartTarget {
    /// Deployment, StatefulSet or DaemonSet.
    pub kind: WorkloadKind,
    /// Its name, in the ManagedSecret's namespace.
    #[schemars(length(max = MAX_NAME))]
    pub name: String,
}

/// The workload kinds that can be restarted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

/// The secret types. Each decides what keys are required and how the native Secret looks.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SecretType {
    /// Any non-empty set of keys; an `Opaque` Secret with the same keys.
    KeyValue,
    /// Any set of keys, kept as-is; an `Opaque` Secret.
    Generic,
    /// `username` and `password`; a `kubernetes.io/basic-auth` Secret.
    BasicAuth,
    /// `password`; an `Opaque` Secret with key `password`.
    Password,
    /// `api-key` (and optionally `expires-at`, RFC 3339); an `Opaque` Secret.
    ApiKey,
    /// `token`: a JWT (three base64url parts, JSON header and claims; `exp` is reported);
    /// an `Opaque` Secret.
    Jwt,
    /// `private-key`: PEM (PKCS#1, PKCS#8, SEC1; RSA, EC P-256/P-384, Ed25519); an
    /// encrypted PKCS#8 key needs `passphrase`. `Opaque` with `private-key` and the derived
    /// `public-key`.
    PrivateKey,
    /// `key`: raw bytes (of the declared `content.generate.bytes` length when generated);
    /// an `Opaque` Secret.
    SecretKey,
    /// `keystore.p12` (PKCS#12) and its `password`; an `Opaque` Secret.
    Keystore,
    /// `tls.crt` (PEM chain, leaf first), `tls.key` (its private key), optional `ca.crt`;
    /// a `kubernetes.io/tls` Secret.
    Certificate,
    /// `ssh-privatekey` (OpenSSH; RSA, ECDSA, Ed25519), optional `passphrase`; a
    /// `kubernetes.io/ssh-auth` Secret with the derived `ssh-publickey`.
    SshKey,
}

impl SecretType {
    /// The name used in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            SecretType::KeyValue => "key-value",
            SecretType::Generic => "generic",
            SecretType::BasicAuth => "basic-auth",
            SecretType::Password => "password",
            SecretType::ApiKey => "api-key",
            SecretType::Jwt => "jwt",
            SecretType::PrivateKey => "private-key",
            SecretType::SecretKey => "secret-key",
            SecretType::Keystore => "keystore",
            SecretType::Certificate => "certificate",
            SecretType::SshKey => "ssh-key",
        }
    }
}

/// Where a ManagedSecret's value comes from: exactly one field is set.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.fromStore), has(self.fromSecret), has(self.generate)].filter(x, x).size() == 1").message("exactly one content source must be set"))]
pub struct ContentSource {
    /// The value is already in the profile's source store at `path` (like an ExternalSecret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_store: Option<FromStore>,
    /// The value is pushed from a Secret in this namespace (like a PushSecret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_secret: Option<FromSecret>,
    /// keyhaven generates the value (written to the source store first, then materialized);
    /// the fields that apply depend on the type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<Generate>,
}

/// How to generate a value. Each type reads its own fields and ignores the rest.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Generate {
    /// password: number of characters (default 32); api-key: random characters after the
    /// prefix (default 40).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8, max = 1024))]
    pub length: Option<u32>,
    /// password: the character classes to use, each at least once (default all four).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub classes: Vec<CharClass>,
    /// password: characters never used (at most 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub exclude: Option<String>,
    /// api-key: text put before the random part, e.g. `kh_live_`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.-]{0,32}$"), length(max = 32))]
    pub prefix: Option<String>,
    /// secret-key: number of random bytes (default 32); also the declared length checked
    /// on every value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 1024))]
    pub bytes: Option<u32>,
    /// ssh-key: ed25519 (default), ecdsa-p256 or rsa; private-key: ec (P-256, default),
    /// ed25519 or rsa. certificate: its key's algorithm, ec (default) or ed25519.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<KeyAlgorithm>,
    /// rsa key size: 3072 (default) or 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == 3072 || self == 4096").message("bits must be 3072 or 4096"))]
    pub bits: Option<u32>,
    /// ssh-key: the public key's comment (at most 256 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub comment: Option<String>,
    /// certificate: the subject's common name (default: the first DNS name, else the
    /// ManagedSecret's name). At most 64 characters, X.509's upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub common_name: Option<String>,
    /// certificate: subject alternative DNS names (at most 100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), inner(length(max = MAX_NAME)))]
    pub dns_names: Vec<String>,
    /// certificate: how long it is valid (Go duration, default 8760h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub validity: Option<String>,
    /// certificate: make a CA certificate (self-signed, may sign others through `issuerRef`).
    #[serde(default, rename = "isCA", skip_serializing_if = "std::ops::Not::not")]
    pub is_ca: bool,
    /// certificate: signed by the CA held by this ManagedSecret (type certificate, same
    /// namespace) instead of self-signed; its chain follows the leaf in `tls.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
}

/// A ManagedSecret of type certificate, in the same namespace, holding a CA.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Its name.
    #[schemars(length(max = MAX_NAME))]
    pub name: String,
}

/// Password character classes.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CharClass {
    Lowercase,
    Uppercase,
    Digits,
    Symbols,
}

/// Key algorithms keyhaven generates.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    Ed25519,
    EcdsaP256,
    Ec,
    Rsa,
}

/// Read the value from the source store.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
pub struct FromStore {}

/// Push the value of a Secret of the ManagedSecret's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FromSecret {
    /// Name of the Secret.
    #[schemars(length(max = MAX_NAME))]
    pub name: String,
}

/// The native Secret.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TargetSpec {
    /// Name of the Secret. Defaults to the ManagedSecret's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_NAME))]
    pub name: Option<String>,
    /// Extra labels on the Secret: at most 64.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "string_map_schema::<64, MAX_LABEL_KEY, MAX_LABEL_VALUE>")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the Secret: at most 64, each value at most 4096 characters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "string_map_schema::<64, MAX_LABEL_KEY, 4096>")]
    pub annotations: BTreeMap<String, String>,
    /// Owner (default): keyhaven creates the Secret and owns it. Merge: the Secret exists
    /// already; keyhaven adds its keys and owns only those. Orphan: keyhaven creates the
    /// Secret without an owner reference.
    #[serde(default)]
    pub creation_policy: CreationPolicy,
    /// What happens to the Secret when the ManagedSecret is deleted. Delete (default):
    /// it goes too (Merge: keyhaven's keys are removed). Retain: it stays, ownerless.
    /// The stores keep every version either way.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Keys built from the value's keys, e.g. a DSN, or a key under another name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TargetTemplate>,
}

/// Keys of the native Secret built from the value.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TargetTemplate {
    /// Key name to text, where `{{ .name }}` stands for the value of key `name`, e.g.
    /// `postgres://{{ .username }}:{{ .password }}@db:5432/app`. At most 64 keys (of at
    /// most 253 characters), each text at most 64 KiB.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "string_map_schema::<64, 253, 65536>")]
    pub data: BTreeMap<String, String>,
    /// Merge (default): the template's keys are added to the type's keys. Replace: the
    /// native Secret holds only the template's keys (types rendered as `Opaque` only).
    #[serde(default)]
    pub merge_policy: TemplateMergePolicy,
}

/// How template keys combine with the type's keys.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum TemplateMergePolicy {
    #[default]
    Merge,
    Replace,
}

/// How the native Secret is created and owned.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum CreationPolicy {
    #[default]
    Owner,
    Merge,
    Orphan,
}

/// What deleting the ManagedSecret does to the native Secret.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Retain,
}

/// Observed state of a ManagedSecret. Every text and list in it is bounded: whatever the
/// history, it is at most about 382 KiB of JSON.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedSecretStatus {
    /// Synced, Degraded, Error, PendingApproval, Rejected, ApprovalExpired, NonCompliant, QuotaExceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ManagedSecretPhase>,
    /// The version the native Secret holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
    /// The newest versions, oldest first (the profile's `history.keep` of them, at most 100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_VERSIONS))]
    pub versions: Vec<VersionRecord>,
    /// Where each store of the profile stands.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_TARGETS))]
    pub targets: Vec<TargetStatus>,
    /// The native Secret's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_NAME))]
    pub secret_name: Option<String>,
    /// The VaultProfile in use: `spec.profile`, or the one resolved for the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_NAME))]
    pub profile: Option<String>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the current value expires (api-key `expires-at`, certificate notAfter, jwt `exp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_TIME))]
    pub expires_at: Option<Time>,
    /// The last `keyhaven.io/rotate` annotation value acted on (see
    /// [`rotate_request_record`]: a value longer than 253 characters is recorded by its
    /// SHA-256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_ROTATE_REQUEST))]
    pub rotate_request: Option<String>,
    /// The version the rolloutRestartTargets were last restarted (or first seen) for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_version: Option<u64>,
    /// The store this secret's versions were all moved out of by the profile's
    /// `migrateFrom` (verified in the new source, then deleted from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_STORE_NAME))]
    pub migrated_from: Option<String>,
    /// The change waiting for approval, or the last one decided (profiles with
    /// `approval` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<super::ApprovalRequest>,
    /// The content source the current version came from (`fromStore`, `fromSecret/<name>`,
    /// `generate`) under `status.profile`: a change of either is a `changeSource`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 300))]
    pub source: Option<String>,
    /// The last compliance check (profiles with `compliance` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliance: Option<super::ComplianceStatus>,
    /// Which versions the stores keep (the profile's `retention`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<super::RetentionStatus>,
    /// New versions counted against the profile's `quota.versionsPerHour`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_rate: Option<super::VersionRate>,
    /// `Ready`, `Synced`, (for expiring types) `Expiring` and (while the profile migrates)
    /// `Migrated`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// One version of a secret. Its content is never rewritten; a migration changes only where
/// it is kept (`store`, `storeVersion`) and records where from (`movedFrom`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionRecord {
    /// The version number, from 1.
    pub version: u64,
    /// HMAC-SHA256 of the type and the canonical key/values, keyed by an operator-held
    /// key: identifies the content without revealing it.
    #[schemars(length(max = 80))]
    pub fingerprint: String,
    /// The store holding the version: the one it was first written to or read from, or
    /// the one a migration moved it to.
    #[schemars(length(max = MAX_STORE_NAME))]
    pub store: String,
    /// When keyhaven recorded the version.
    #[schemars(length(max = MAX_TIME))]
    pub created_at: Time,
    /// Who made the version (a longer user name is cut to 512 characters).
    #[schemars(length(max = MAX_USER))]
    pub created_by: String,
    /// Why the version was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_REASON))]
    pub reason: Option<String>,
    /// The store's own version number of this content, where the store has one (the KV v2
    /// version in Vault/OpenBao).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_version: Option<u64>,
    /// The store a migration moved this version out of (verified by fingerprint first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_STORE_NAME))]
    pub moved_from: Option<String>,
}

/// Where one store of the profile stands for this secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// The SecretStore.
    #[schemars(length(max = MAX_STORE_NAME))]
    pub store: String,
    /// Source or SyncTarget.
    pub role: TargetRole,
    /// The version it holds, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Synced, Pending or Error.
    pub state: TargetState,
    /// When it was last written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_TIME))]
    pub synced_at: Option<Time>,
    /// Why it is not Synced (at most 1024 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_TARGET_MESSAGE))]
    pub message: Option<String>,
}

named_enum! {
    /// Where a ManagedSecret stands: Synced (every store of the profile and the native
    /// Secret hold the current version), Degraded (the native Secret holds it, some sync
    /// target does not), Error (the last sync failed: condition Ready says why; what
    /// existed is left as it was), PendingApproval (a change waits for approval: nothing
    /// is written meanwhile), Rejected (the change was rejected: the previous version, if
    /// any, stays in force), ApprovalExpired (the request expired undecided) or NonCompliant
    /// (the profile's compliance rules, enforced with Deny, refused the new value: nothing
    /// was written) or QuotaExceeded (the profile's `quota` refused a new version).
    pub enum ManagedSecretPhase {
        Synced,
        Degraded,
        Error,
        PendingApproval,
        Rejected,
        ApprovalExpired,
        NonCompliant,
        QuotaExceeded,
    }
}

named_enum! {
    /// What a store is to a ManagedSecret: Source (the profile's source: versions are read
    /// or written there first) or SyncTarget (a copy that receives every version).
    pub enum TargetRole {
        Source,
        SyncTarget,
    }
}

named_enum! {
    /// Where one store stands for a ManagedSecret: Synced (it holds the current version),
    /// Pending (a source that holds no version yet after a switch: the next version goes
    /// there) or Error (writing the current version failed; the message says why).
    pub enum TargetState {
        Synced,
        Pending,
        Error,
    }
}

/// The most versions `status.versions` lists: the largest `history.keep`.
pub const MAX_VERSIONS: usize = 100;
/// The most stores `status.targets` lists (a profile has a source and at most 32 sync
/// targets).
pub const MAX_TARGETS: usize = 64;
/// The longest `keyhaven.io/rotate` value recorded as it is in `status.rotateRequest`.
pub const MAX_ROTATE_REQUEST: usize = 253;

/// How a `keyhaven.io/rotate` annotation value is recorded in `status.rotateRequest`: as it
/// is, or, longer than [`MAX_ROTATE_REQUEST`] (stored) bytes (annotations may hold 256 KiB),
/// as `sha256:<hex>` of it, so the record stays within the schema and still tells a new
/// request from one acted on.
pub fn rotate_request_record(value: &str) -> String {
    if super::common::stored_text_len(value) <= MAX_ROTATE_REQUEST {
        value.to_owned()
    } else {
        use sha2::Digest;
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(value.as_bytes()))
        )
    }
}

/// The worst case, computed from the CRD's schema by `tests/crds.rs` (which holds it below
/// 512 KiB): every field present and at its maximum, the status is 390,693 bytes (382 KiB)
/// of JSON:
///
/// | part | at most | each (bytes) | in all |
/// | --- | --- | --- | --- |
/// | `versions` | [`MAX_VERSIONS`] = 100 | 1,959 (`createdBy` 512, `reason` 1024, fingerprint 80, stores 63, ...) | 195,900 |
/// | `targets` | [`MAX_TARGETS`] = 64 | 1,259 (`message` 1024) | 80,576 |
/// | `conditions` | 16 | 5,630 (`message` 4096, `reason` 1024, `type` 316) | 90,080 |
/// | `approval` | 1 request, 10 decisions | about 22,000 (`comment` 1024, `by` 512 each) | about 22,800 |
/// | the rest | | | about 1,300 |
///
/// The bounds are in characters; keyhaven cuts every text it writes here that is not
/// ASCII by construction (fingerprints, timestamps) to its bound in stored bytes
/// ([`clamp_text`](super::clamp_text)), so the figure holds in bytes too.
impl ClampToSchema for ManagedSecretStatus {
    fn clamp_to_schema(&mut self) {
        let extra = self.versions.len().saturating_sub(MAX_VERSIONS);
        self.versions.drain(..extra);
        // Names are cut too: a valid one is ASCII and within its bound already; one that is
        // not (a profile naming a store that cannot exist) must not make the status larger.
        for v in &mut self.versions {
            clamp_text(&mut v.created_by, MAX_USER);
            clamp_opt(&mut v.reason, MAX_REASON);
            clamp_text(&mut v.store, MAX_STORE_NAME);
            clamp_opt(&mut v.moved_from, MAX_STORE_NAME);
        }
        self.targets.truncate(MAX_TARGETS);
        for t in &mut self.targets {
            clamp_opt(&mut t.message, MAX_TARGET_MESSAGE);
            clamp_text(&mut t.store, MAX_STORE_NAME);
        }
        if let Some(r) = &mut self.rotate_request {
            *r = rotate_request_record(r);
        }
        clamp_opt(&mut self.secret_name, MAX_NAME);
        clamp_opt(&mut self.profile, MAX_NAME);
        clamp_opt(&mut self.migrated_from, MAX_STORE_NAME);
        clamp_opt(&mut self.source, 300);
        if let Some(a) = &mut self.approval {
            clamp_text(&mut a.summary, MAX_REASON);
            clamp_text(&mut a.requested_by, MAX_USER);
            let extra = a.decisions.len().saturating_sub(10);
            a.decisions.drain(..extra);
            for d in &mut a.decisions {
                clamp_text(&mut d.by, MAX_USER);
                clamp_text(&mut d.name, MAX_NAME);
                clamp_opt(&mut d.comment, MAX_REASON);
            }
        }
        if let Some(c) = &mut self.compliance {
            c.failing.truncate(super::MAX_FAILING_RULES);
        }
        clamp_conditions(&mut self.conditions);
    }
}

impl ManagedSecret {
    /// The secret object's path in the stores: `spec.path` or `<namespace>/<name>`.
    pub fn store_path(&self) -> String {
        match &self.spec.path {
            Some(p) => p.clone(),
            None => format!(
                "{}/{}",
                self.metadata.namespace.as_deref().unwrap_or_default(),
                self.metadata.name.as_deref().unwrap_or_default()
            ),
        }
    }

    /// The `keyhaven.io/rotate` annotation as `status.rotateRequest` records it once acted
    /// on ([`rotate_request_record`]).
    pub fn rotate_request(&self) -> Option<String> {
        self.metadata
            .annotations
            .as_ref()?
            .get(crate::labels::ROTATE_ANNOTATION)
            .map(|v| rotate_request_record(v))
    }

    /// The native Secret's name: `spec.target.name` or the ManagedSecret's name.
    pub fn secret_name(&self) -> String {
        self.spec
            .target
            .name
            .clone()
            .unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn a_clamped_status_keeps_the_newest_versions_and_short_texts() {
        let record = |version| VersionRecord {
            version,
            fingerprint: "hmac-sha256-ns:00".into(),
            store: "s".into(),
            created_at: Time(jiff::Timestamp::UNIX_EPOCH),
            created_by: "<".repeat(1000),
            reason: Some("😀".repeat(2000)),
            store_version: None,
            moved_from: None,
        };
        let mut status = ManagedSecretStatus {
            versions: (1..=150).map(record).collect(),
            rotate_request: Some("r".repeat(300)),
            ..Default::default()
        };
        status.clamp_to_schema();
        assert_eq!(status.versions.len(), MAX_VERSIONS);
        assert_eq!(status.versions[0].version, 51);
        let v = &status.versions[99];
        assert!(super::super::stored_text_len(&v.created_by) <= MAX_USER);
        assert!(super::super::stored_text_len(v.reason.as_ref().unwrap()) <= MAX_REASON);
        let digest = status.rotate_request.unwrap();
        assert!(
            digest.starts_with("sha256:") && digest.len() == 71,
            "{digest}"
        );
        assert_eq!(rotate_request_record("now"), "now");
    }
}
