//! Compliance (pure, no I/O): which of a profile's rules (`spec.compliance`, and its
//! `spec.passwordPolicy`) a value breaks, and when a version becomes too old.
//!
//! Results are rule names only ([`RULES`]), never a value, nor a password's length, class
//! count or entropy. The rules per type:
//!
//! - password (key `password`), basic-auth (key `password`): `password-min-length`
//!   (characters), `password-min-classes` (of lower, upper, digit, other, as
//!   [`content::character_classes`] counts them), `password-min-entropy` ([`entropy_bits`]);
//!   password only: `password-policy`, the profile's `spec.passwordPolicy`, which content
//!   validation already refuses ([`content::password_weakness`]) and which is reported
//!   under this name too;
//! - private-key, ssh-key, certificate (its leaf's public key, which validation holds to be
//!   `tls.key`'s), keystore (its first private key entry): `key-algorithm`, `rsa-min-bits`,
//!   `ec-min-bits`;
//! - certificate (the leaf, first of `tls.crt`), keystore (the leaf of its first private key
//!   entry's chain): `certificate-max-validity` (notAfter − notBefore),
//!   `certificate-self-signed-leaf` (see [`content::CertificateFacts`]; a CA is not a leaf);
//! - api-key (`expires-at`), jwt (`exp`): `expiry-required` (a certificate always has one;
//!   the other types are not judged by it);
//! - every type: `max-version-age`, time-based: [`age_breaks`], [`next_age_check`].
//!
//! A keystore holding only certificates (a truststore) has no private key entry: its key
//! and certificate rules are not judged. A part of a value that does not parse is not judged
//! either: content validation refuses such a value before it is checked here.
//!
//! Parsing keys is CPU-heavy: [`evaluate`] runs on the caller's thread (the reconciler's
//! plan, already on a blocking thread for the heavy types) and spawns nothing. It opens
//! encrypted keys through content's KDF cache: a value validated first derives nothing again.

use crate::api::{
    CertificateRules, CompliancePolicy, KeyKind, KeyRules, PasswordPolicy, PasswordRules,
    SecretType, parse_duration,
};
use crate::content::{self, KeyFacts};
use crate::secret_data::SecretData;
use std::collections::BTreeSet;
use std::time::Duration;

/// A password shorter than `password.minLength` characters.
pub const PASSWORD_MIN_LENGTH: &str = "password-min-length";
/// A password of fewer than `password.minClasses` character classes.
pub const PASSWORD_MIN_CLASSES: &str = "password-min-classes";
/// A password of less than `password.minEntropyBits` estimated bits.
pub const PASSWORD_MIN_ENTROPY: &str = "password-min-entropy";
/// A key whose algorithm is not in `keys.allowedAlgorithms`.
pub const KEY_ALGORITHM: &str = "key-algorithm";
/// An RSA key smaller than `keys.minRsaBits`.
pub const RSA_MIN_BITS: &str = "rsa-min-bits";
/// An EC key on a curve smaller than `keys.minEcBits`.
pub const EC_MIN_BITS: &str = "ec-min-bits";
/// A certificate valid for longer than `certificates.maxValidity`.
pub const CERTIFICATE_MAX_VALIDITY: &str = "certificate-max-validity";
/// A self-signed leaf certificate under `certificates.forbidSelfSignedLeaf`.
pub const CERTIFICATE_SELF_SIGNED_LEAF: &str = "certificate-self-signed-leaf";
/// An api-key or jwt without an expiry under `requireExpiry`.
pub const EXPIRY_REQUIRED: &str = "expiry-required";
/// A current version older than `maxVersionAge`.
pub const MAX_VERSION_AGE: &str = "max-version-age";
/// A password the profile's `spec.passwordPolicy` refuses.
pub const PASSWORD_POLICY: &str = "password-policy";

/// Every rule name, sorted.
pub const RULES: [&str; 11] = [
    CERTIFICATE_MAX_VALIDITY,
    CERTIFICATE_SELF_SIGNED_LEAF,
    EC_MIN_BITS,
    EXPIRY_REQUIRED,
    KEY_ALGORITHM,
    MAX_VERSION_AGE,
    PASSWORD_MIN_CLASSES,
    PASSWORD_MIN_ENTROPY,
    PASSWORD_MIN_LENGTH,
    PASSWORD_POLICY,
    RSA_MIN_BITS,
];

/// The rules the value `data` of `secret_type` breaks, sorted and deduplicated: those of
/// `policy` that judge the value (not `max-version-age`: see [`age_breaks`]) and
/// `password-policy` when `password_policy` (the profile's `spec.passwordPolicy`) refuses a
/// password. Empty: compliant.
pub fn evaluate(
    secret_type: SecretType,
    data: &SecretData,
    policy: &CompliancePolicy,
    password_policy: Option<&PasswordPolicy>,
) -> Vec<&'static str> {
    let mut failing = BTreeSet::new();
    if matches!(secret_type, SecretType::Password | SecretType::BasicAuth)
        && let Some(password) = data
            .get("password")
            .and_then(|p| std::str::from_utf8(p).ok())
    {
        if let Some(rules) = &policy.password {
            password_rules(password, rules, &mut failing);
        }
        // As content validation applies it: to type password only.
        if secret_type == SecretType::Password
            && password_policy.is_some_and(|p| content::password_weakness(password, p).is_some())
        {
            failing.insert(PASSWORD_POLICY);
        }
    }
    let judges_keys = matches!(
        secret_type,
        SecretType::PrivateKey
            | SecretType::SshKey
            | SecretType::Certificate
            | SecretType::Keystore
    ) && policy.keys.is_some();
    let judges_certificate = matches!(secret_type, SecretType::Certificate | SecretType::Keystore)
        && policy.certificates.is_some();
    let judges_expiry =
        policy.require_expiry && matches!(secret_type, SecretType::ApiKey | SecretType::Jwt);
    // Parsing only when a rule needs it: it is the costly part.
    if judges_keys || judges_certificate || judges_expiry {
        let facts = content::facts(secret_type, data);
        if let (Some(rules), Some(key)) = (policy.keys.as_ref().filter(|_| judges_keys), facts.key)
        {
            key_rules(key, rules, &mut failing);
        }
        if let (Some(rules), Some(cert)) = (
            policy.certificates.as_ref().filter(|_| judges_certificate),
            facts.certificate,
        ) {
            certificate_rules(cert, rules, &mut failing);
        }
        if judges_expiry && !facts.has_expiry {
            failing.insert(EXPIRY_REQUIRED);
        }
    }
    failing.into_iter().collect()
}

fn password_rules(password: &str, rules: &PasswordRules, failing: &mut BTreeSet<&'static str>) {
    if let Some(min) = rules.min_length
        && password.chars().count() < min as usize
    {
        failing.insert(PASSWORD_MIN_LENGTH);
    }
    if let Some(min) = rules.min_classes
        && content::character_classes(password)
            .iter()
            .filter(|c| **c)
            .count()
            < usize::from(min)
    {
        failing.insert(PASSWORD_MIN_CLASSES);
    }
    if let Some(min) = rules.min_entropy_bits
        && entropy_bits(password) < f64::from(min)
    {
        failing.insert(PASSWORD_MIN_ENTROPY);
    }
}

/// The sizes of the alphabets of the four character classes, in the order of
/// [`content::character_classes`]: 26 lower-case, 26 upper-case, 10 digits, 33 other (the
/// printable ASCII punctuation and space).
const CLASS_ALPHABETS: [u32; 4] = [26, 26, 10, 33];

/// A password's estimated entropy in bits: `effective length × log2(alphabet)`.
///
/// - alphabet: the sum of the alphabets ([`CLASS_ALPHABETS`]) of the classes the password
///   uses; a character of no class (e.g. a CJK letter) counts as other;
/// - effective length: the length in characters, at most twice the number of distinct
///   characters, so that repeating a few characters earns little (`aaaaaaaa`: 2 × log2 26).
///
/// An estimate of the kind NIST SP 800-63's early guidance made: it rewards length and
/// variety, not dictionary words; a generated password is judged fairly by it.
fn entropy_bits(password: &str) -> f64 {
    let mut classes = content::character_classes(password);
    let classless = password.chars().any(|c| {
        c.is_alphanumeric() && !c.is_lowercase() && !c.is_uppercase() && !c.is_ascii_digit()
    });
    classes[3] |= classless;
    let alphabet: u32 = classes
        .iter()
        .zip(CLASS_ALPHABETS)
        .filter(|(used, _)| **used)
        .map(|(_, size)| size)
        .sum();
    let length = password.chars().count();
    let distinct = password.chars().collect::<BTreeSet<_>>().len();
    let effective = length.min(2 * distinct);
    if alphabet == 0 {
        return 0.0;
    }
    effective as f64 * f64::from(alphabet).log2()
}

fn key_rules(key: KeyFacts, rules: &KeyRules, failing: &mut BTreeSet<&'static str>) {
    let kind = match key {
        KeyFacts::Rsa { .. } => Some(KeyKind::Rsa),
        KeyFacts::Ec { .. } => Some(KeyKind::Ec),
        KeyFacts::Ed25519 => Some(KeyKind::Ed25519),
        KeyFacts::Other => None,
    };
    if !rules.allowed_algorithms.is_empty()
        && !kind.is_some_and(|k| rules.allowed_algorithms.contains(&k))
    {
        failing.insert(KEY_ALGORITHM);
    }
    match key {
        KeyFacts::Rsa { bits } if rules.min_rsa_bits.is_some_and(|min| bits < min) => {
            failing.insert(RSA_MIN_BITS);
        }
        KeyFacts::Ec { bits } if rules.min_ec_bits.is_some_and(|min| bits < min) => {
            failing.insert(EC_MIN_BITS);
        }
        _ => {}
    }
}

fn certificate_rules(
    cert: content::CertificateFacts,
    rules: &CertificateRules,
    failing: &mut BTreeSet<&'static str>,
) {
    if let Some(max) = rules.max_validity.as_deref().and_then(duration)
        && Duration::from_secs(cert.validity_seconds) > max
    {
        failing.insert(CERTIFICATE_MAX_VALIDITY);
    }
    if rules.forbid_self_signed_leaf && cert.self_signed_leaf {
        failing.insert(CERTIFICATE_SELF_SIGNED_LEAF);
    }
}

/// A policy's duration; an unreadable one (the schema's pattern refuses most) judges
/// nothing, and [`policy_problem`] names it.
fn duration(text: &str) -> Option<Duration> {
    parse_duration(text).ok()
}

/// What in `policy` cannot be read (a duration the schema let through but that does not
/// parse, e.g. beyond 100 years), naming the field; `None` when every rule can be applied.
pub fn policy_problem(policy: &CompliancePolicy) -> Option<String> {
    let fields = [
        ("maxVersionAge", policy.max_version_age.as_deref()),
        (
            "certificates.maxValidity",
            policy
                .certificates
                .as_ref()
                .and_then(|c| c.max_validity.as_deref()),
        ),
    ];
    fields.into_iter().find_map(|(field, text)| {
        let problem = parse_duration(text?).err()?;
        Some(format!("compliance.{field}: {problem}"))
    })
}

/// When the current version, created at `created`, becomes older than `maxVersionAge`.
fn age_deadline(policy: &CompliancePolicy, created: jiff::Timestamp) -> Option<jiff::Timestamp> {
    let max = duration(policy.max_version_age.as_deref()?)?;
    created
        .checked_add(jiff::SignedDuration::try_from(max).ok()?)
        .ok()
}

/// Whether the current version (created at `current_created`) breaks `max-version-age` at
/// `now`: it must be younger than `maxVersionAge`. False without the rule or a version.
pub fn age_breaks(
    policy: &CompliancePolicy,
    current_created: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
) -> bool {
    current_created
        .and_then(|created| age_deadline(policy, created))
        .is_some_and(|deadline| now >= deadline)
}

/// When the current version will break `max-version-age`, if it does not yet at `now`: the
/// moment for the reconciler to check again. `None` without the rule or a version, or when
/// it already breaks it (only a new version changes that).
pub fn next_age_check(
    policy: &CompliancePolicy,
    current_created: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
) -> Option<jiff::Timestamp> {
    current_created
        .and_then(|created| age_deadline(policy, created))
        .filter(|deadline| *deadline > now)
}

#[cfg(test)]
#[path = "compliance_tests.rs"]
mod tests;
