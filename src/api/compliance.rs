//! Compliance: the rules a profile holds every ManagedSecret under it to
//! (`VaultProfile.spec.compliance`), and what the last check found (`status.compliance`).

use super::common::{DURATION_PATTERN, MAX_DURATION_TEXT, MAX_TIME, named_enum};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The rules every ManagedSecret of the profile is checked against, on every new version
/// and whenever the rules change. Each rule applies to the types it names and is skipped
/// for the others.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CompliancePolicy {
    /// `Deny` (the default): a new version that breaks a rule is refused (phase
    /// `NonCompliant`, nothing written). `Warn`: it is written and flagged (`Compliant=False`).
    #[serde(default)]
    pub enforcement: Enforcement,
    /// password (key `password`) and basic-auth (key `password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<PasswordRules>,
    /// private-key, ssh-key, certificate (its key) and keystore (its key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<KeyRules>,
    /// certificate (the leaf of `tls.crt`) and keystore (its certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<CertificateRules>,
    /// api-key (`expires-at`), jwt (`exp`) and certificate (always has one): a value
    /// without an expiry breaks rule `expiry-required`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_expiry: bool,
    /// Every type: the current version must be younger than this (Go duration), i.e.
    /// rotated or replaced within it (rule `max-version-age`). Checked on every sync; an
    /// overdue version is flagged (never deleted or blanked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub max_version_age: Option<String>,
}

/// How a profile treats a value that breaks its rules.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Enforcement {
    Warn,
    #[default]
    Deny,
}

/// What a password must be.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PasswordRules {
    /// At least this many characters (rule `password-min-length`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub min_length: Option<u32>,
    /// At least this many of: lower-case, upper-case, digits, other (rule
    /// `password-min-classes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4))]
    pub min_classes: Option<u8>,
    /// At least this many bits of estimated entropy: length × log2 of the alphabet its
    /// classes span, less for repeated characters (rule `password-min-entropy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub min_entropy_bits: Option<u32>,
}

/// What a key must be.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct KeyRules {
    /// The algorithms allowed (rule `key-algorithm`); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "set"), length(max = 8))]
    pub allowed_algorithms: Vec<KeyKind>,
    /// RSA keys of at least this many bits (rule `rsa-min-bits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 16384))]
    pub min_rsa_bits: Option<u32>,
    /// EC keys on a curve of at least this many bits (rule `ec-min-bits`; P-256 is 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 160, max = 571))]
    pub min_ec_bits: Option<u32>,
}

/// A key algorithm, as compliance rules name it.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum KeyKind {
    Rsa,
    Ec,
    Ed25519,
}

/// What a certificate must be.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRules {
    /// notAfter − notBefore at most this (Go duration; rule `certificate-max-validity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub max_validity: Option<String>,
    /// Refuse a self-signed leaf (subject = issuer and signed by its own key; a CA,
    /// `isCA`, is not a leaf): rule `certificate-self-signed-leaf`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forbid_self_signed_leaf: bool,
}

/// The most failing rules `status.compliance.failing` lists.
pub const MAX_FAILING_RULES: usize = 16;

/// What the last compliance check of a ManagedSecret found (rule names only: never a
/// value, nor a password's length or classes).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComplianceStatus {
    /// Compliant or NonCompliant.
    pub state: ComplianceState,
    /// The rules the current (or refused) value breaks, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_FAILING_RULES), inner(length(max = 64)))]
    pub failing: Vec<String>,
    /// The profile's enforcement at the check.
    pub enforcement: Enforcement,
    /// The profile generation whose rules were checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_generation: Option<i64>,
    /// When.
    #[schemars(length(max = MAX_TIME))]
    pub checked_at: Time,
}

named_enum! {
    /// A ManagedSecret's compliance: Compliant (its value meets every rule of its profile)
    /// or NonCompliant (`failing` names the rules it breaks).
    pub enum ComplianceState {
        Compliant,
        NonCompliant,
    }
}

/// A profile's compliance summary (`VaultProfile.status.compliance`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComplianceSummary {
    /// ManagedSecrets of the profile checked against its current rules.
    pub checked: u64,
    /// Of them, compliant.
    pub compliant: u64,
    /// Of them, breaking at least one rule.
    pub non_compliant: u64,
}
