//! What the admission webhook refuses that the CRD schema and CEL cannot (pure): a profile
//! that does not exist or does not admit the namespace, a path outside the namespace's
//! secret space (the tenancy rules the reconciler applies), an `issuerRef` the namespace may
//! not use, generate parameters and durations out of range. Every refusal names the field
//! and the rule.

use crate::api::{ManagedSecret, SecretType, VaultProfile, parse_duration};
use crate::profiles::{self, NamespaceInfo};
use crate::tenancy;
use kube::ResourceExt;
use std::time::Duration;

/// Ten years: the longest any duration may be.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A hundred years: the longest a certificate may be valid.
pub const MAX_VALIDITY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// The shortest `refreshInterval`, unless the profile sets a lower one (not below 1 s).
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
/// The shortest `rotation.interval`, unless the profile sets a lower one (not below 1 min).
pub const MIN_ROTATION: Duration = Duration::from_secs(3600);
/// The longest `spec.reason` (recorded with every version it makes).
pub const MAX_REASON_CHARS: usize = 1024;
const FLOOR_REFRESH: Duration = Duration::from_secs(1);
const FLOOR_ROTATION: Duration = Duration::from_secs(60);

/// One refusal: the field and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// What the checks look at besides the object: its namespace, the profiles, and the
/// ManagedSecret its `issuerRef` names (None: it does not exist).
pub struct Facts<'a> {
    pub namespace: &'a NamespaceInfo,
    pub profiles: &'a [VaultProfile],
    pub issuer: Option<&'a ManagedSecret>,
}

/// What is wrong with `ms`, and warnings (things that may be right later, e.g. an issuer
/// not created yet).
pub fn managed_secret(ms: &ManagedSecret, facts: &Facts<'_>) -> (Vec<Refusal>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    let refuse = |out: &mut Vec<Refusal>, field: &str, message: String| {
        out.push(Refusal {
            field: field.to_owned(),
            message,
        })
    };
    let resolved = profiles::resolve(ms.spec.profile.as_deref(), facts.namespace, facts.profiles);
    let profile = match resolved {
        Ok(r) => facts.profiles.iter().find(|p| p.name_any() == r.profile),
        Err(r) => {
            refuse(&mut out, "spec.profile", r.message);
            None
        }
    };
    if let Some(profile) = profile {
        space(ms, profile, facts.namespace, &mut out);
        durations(ms, profile, &mut out);
    }
    generate(ms, &mut out);
    // Copied into every version record: bounded so the status stays small.
    if let Some(reason) = &ms.spec.reason
        && reason.chars().count() > MAX_REASON_CHARS
    {
        refuse(
            &mut out,
            "spec.reason",
            format!(
                "{} characters is over the maximum {MAX_REASON_CHARS}",
                reason.chars().count()
            ),
        );
    }
    if ms.spec.rollback_to == Some(0) {
        refuse(
            &mut out,
            "spec.rollbackTo",
            "versions are numbered from 1".into(),
        );
    }
    if let Some(issuer) = ms
        .spec
        .content
        .generate
        .as_ref()
        .and_then(|g| g.issuer_ref.as_ref())
    {
        let field = "spec.content.generate.issuerRef.name";
        match facts.issuer {
            None => warnings.push(format!(
                "{field}: ManagedSecret {} does not exist (yet) in namespace {}: the certificate is issued once it does",
                issuer.name, facts.namespace.name
            )),
            Some(ca) if ca.spec.type_ != SecretType::Certificate => refuse(
                &mut out,
                field,
                format!("ManagedSecret {} is of type {}, not certificate", issuer.name, ca.spec.type_.as_str()),
            ),
            Some(ca) => {
                let mut theirs = Vec::new();
                let resolved =
                    profiles::resolve(ca.spec.profile.as_deref(), facts.namespace, facts.profiles);
                match resolved
                    .ok()
                    .and_then(|r| facts.profiles.iter().find(|p| p.name_any() == r.profile))
                {
                    Some(p) => space(ca, p, facts.namespace, &mut theirs),
                    None => refuse(
                        &mut theirs,
                        field,
                        "its profile does not admit this namespace".into(),
                    ),
                }
                for r in theirs {
                    refuse(
                        &mut out,
                        field,
                        format!("the issuer {} may not be used: {}", issuer.name, r.message),
                    );
                }
            }
        }
    }
    (out, warnings)
}

/// The path is in the namespace's space (or a shared path, read only); an intermediate CA
/// needs the profile's permission.
fn space(ms: &ManagedSecret, profile: &VaultProfile, ns: &NamespaceInfo, out: &mut Vec<Refusal>) {
    let path = ms.store_path();
    let field = "spec.path";
    match tenancy::access(profile, ns, &path) {
        Err(r) => out.push(Refusal {
            field: field.into(),
            message: r.message,
        }),
        Ok(access) => {
            let reads_only = ms.spec.rollback_to.is_none() && ms.spec.content.from_store.is_some();
            if !access.may_write() && !reads_only {
                out.push(Refusal {
                    field: field.into(),
                    message: tenancy::read_only(profile, &ns.name, &path).message,
                });
            }
        }
    }
    if let Some(g) = &ms.spec.content.generate
        && let Err(r) = tenancy::issuance(profile, g)
    {
        out.push(Refusal {
            field: "spec.content.generate.isCA".into(),
            message: r.message,
        });
    }
}

/// A duration field: parses, and lies in `min..=max`.
fn duration(
    out: &mut Vec<Refusal>,
    field: &str,
    text: Option<&str>,
    min: Duration,
    max: Duration,
    why_min: &str,
) {
    let Some(text) = text else { return };
    let refuse = |out: &mut Vec<Refusal>, message: String| {
        out.push(Refusal {
            field: field.into(),
            message,
        })
    };
    match parse_duration(text) {
        Err(e) => refuse(out, e),
        Ok(d) if d > max => refuse(
            out,
            format!("{text} is longer than the maximum {}", human(max)),
        ),
        Ok(d) if d < min => refuse(
            out,
            format!(
                "{text} is shorter than the minimum {} ({why_min})",
                human(min)
            ),
        ),
        Ok(_) => {}
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % (365 * 24 * 3600) == 0 => format!("{} years", s / (365 * 24 * 3600)),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The profile's minimum for `text` (a duration in its `limits`), not below `floor`, else
/// `default`.
fn minimum(text: Option<&str>, default: Duration, floor: Duration) -> Duration {
    text.and_then(|t| parse_duration(t).ok())
        .map_or(default, |d| d.max(floor))
}

fn durations(ms: &ManagedSecret, profile: &VaultProfile, out: &mut Vec<Refusal>) {
    let limits = profile.spec.limits.clone().unwrap_or_default();
    let min_refresh = minimum(
        limits.min_refresh_interval.as_deref(),
        MIN_REFRESH,
        FLOOR_REFRESH,
    );
    let min_rotation = minimum(
        limits.min_rotation_interval.as_deref(),
        MIN_ROTATION,
        FLOOR_ROTATION,
    );
    let why = format!("VaultProfile {} limits", profile.name_any());
    duration(
        out,
        "spec.refreshInterval",
        ms.spec.refresh_interval.as_deref(),
        min_refresh,
        MAX_DURATION,
        &why,
    );
    duration(
        out,
        "spec.rotation.interval",
        ms.spec
            .rotation
            .as_ref()
            .and_then(|r| r.interval.as_deref()),
        min_rotation,
        MAX_DURATION,
        &why,
    );
    duration(
        out,
        "spec.expiryWarning",
        ms.spec.expiry_warning.as_deref(),
        Duration::ZERO,
        MAX_DURATION,
        "",
    );
}

/// Generate parameters in range (the schema bounds most; these are the ones it cannot).
fn generate(ms: &ManagedSecret, out: &mut Vec<Refusal>) {
    let Some(g) = &ms.spec.content.generate else {
        return;
    };
    let mut refuse = |field: &str, message: String| {
        out.push(Refusal {
            field: format!("spec.content.generate.{field}"),
            message,
        })
    };
    if let Some(n) = g.length
        && !(8..=1024).contains(&n)
    {
        refuse("length", format!("{n} is outside 8–1024"));
    }
    if let Some(bits) = g.bits
        && !(2048..=8192).contains(&bits)
    {
        refuse("bits", format!("{bits} is outside 2048–8192"));
    }
    if let Some(bytes) = g.bytes
        && !(16..=1024 * 1024).contains(&bytes)
    {
        refuse("bytes", format!("{bytes} is outside 16–1048576"));
    }
    if let Some(v) = g.validity.as_deref() {
        match parse_duration(v) {
            Err(e) => refuse("validity", e),
            Ok(d) if d > MAX_VALIDITY => refuse(
                "validity",
                format!("{v} is longer than the maximum 100 years"),
            ),
            Ok(d) if d < Duration::from_secs(60) => {
                refuse("validity", format!("{v} is shorter than the minimum 1m"))
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(name: &str, spec: serde_json::Value) -> VaultProfile {
        let mut full = serde_json::json!({"source": "s"});
        full.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "VaultProfile",
            "metadata": {"name": name}, "spec": full,
        }))
        .unwrap()
    }

    fn ms(name: &str, spec: serde_json::Value) -> ManagedSecret {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": name, "namespace": "team-a"}, "spec": spec,
        }))
        .unwrap()
    }

    fn check(
        m: &ManagedSecret,
        profiles: &[VaultProfile],
        issuer: Option<&ManagedSecret>,
    ) -> Vec<String> {
        let ns = NamespaceInfo::labelled("team-a", &[]);
        let facts = Facts {
            namespace: &ns,
            profiles,
            issuer,
        };
        managed_secret(m, &facts)
            .0
            .iter()
            .map(|r| r.to_string())
            .collect()
    }

    #[test]
    fn a_sound_spec_passes() {
        let p = [profile("p", serde_json::json!({}))];
        let m = ms(
            "db",
            serde_json::json!({"profile": "p", "type": "password",
            "refreshInterval": "1h", "rotation": {"interval": "720h"},
            "content": {"generate": {"length": 32}}}),
        );
        assert_eq!(check(&m, &p, None), Vec::<String>::new());
    }

    #[test]
    fn refusals_name_the_field_and_the_rule() {
        let p = [profile("p", serde_json::json!({}))];
        let cases = [
            (
                serde_json::json!({"profile": "missing", "type": "password",
                "content": {"fromStore": {}}}),
                "spec.profile: ",
            ),
            (
                serde_json::json!({"profile": "p", "type": "password", "path": "team-b/db",
                "content": {"fromStore": {}}}),
                "spec.path: ",
            ),
            (
                serde_json::json!({"profile": "p", "type": "password", "refreshInterval": "1s",
                "content": {"fromStore": {}}}),
                "spec.refreshInterval: 1s is shorter than the minimum 10s",
            ),
            (
                serde_json::json!({"profile": "p", "type": "password",
                "refreshInterval": "18446744073709551615s", "content": {"fromStore": {}}}),
                "spec.refreshInterval: ",
            ),
            (
                serde_json::json!({"profile": "p", "type": "password",
                "rotation": {"interval": "1ms"}, "content": {"generate": {}}}),
                "spec.rotation.interval: 1ms is shorter than the minimum 1h",
            ),
            (
                serde_json::json!({"profile": "p", "type": "password",
                "rotation": {"interval": "100000h"}, "content": {"generate": {}}}),
                "spec.rotation.interval: 100000h is longer than the maximum 10 years",
            ),
            (
                serde_json::json!({"profile": "p", "type": "certificate",
                "content": {"generate": {"validity": "1000000000000h"}}}),
                "spec.content.generate.validity: ",
            ),
            (
                serde_json::json!({"profile": "p", "type": "password", "rollbackTo": 0,
                "content": {"fromStore": {}}}),
                "spec.rollbackTo: versions are numbered from 1",
            ),
            (
                serde_json::json!({"profile": "p", "type": "certificate",
                "content": {"generate": {"isCA": true, "issuerRef": {"name": "ca"}}}}),
                "spec.content.generate.isCA: ",
            ),
        ];
        for (spec, expected) in cases {
            let found = check(&ms("x", spec.clone()), &p, None);
            assert!(
                found.iter().any(|f| f.starts_with(expected)),
                "{spec}: {found:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn a_profile_may_lower_the_minimums_not_below_the_floors() {
        let p = [profile(
            "fast",
            serde_json::json!({"limits": {"minRefreshInterval": "0s", "minRotationInterval": "1m"}}),
        )];
        let m = |refresh: &str| {
            ms(
                "x",
                serde_json::json!({"profile": "fast", "type": "password",
                "refreshInterval": refresh, "rotation": {"interval": "1m"},
                "content": {"generate": {}}}),
            )
        };
        assert!(check(&m("2s"), &p, None).is_empty());
        let found = check(&m("500ms"), &p, None);
        assert!(
            found[0].contains("shorter than the minimum 1s"),
            "{found:?}"
        );
    }

    #[test]
    fn an_issuer_must_be_a_certificate_in_the_namespaces_space() {
        let p = [profile("p", serde_json::json!({}))];
        let leaf = ms(
            "leaf",
            serde_json::json!({"profile": "p", "type": "certificate",
            "content": {"generate": {"issuerRef": {"name": "ca"}}}}),
        );
        let pw = ms(
            "ca",
            serde_json::json!({"profile": "p", "type": "password",
            "content": {"fromStore": {}}}),
        );
        assert!(check(&leaf, &p, Some(&pw))[0].contains("not certificate"));
        let far = ms(
            "ca",
            serde_json::json!({"profile": "p", "type": "certificate",
            "path": "team-b/ca", "content": {"fromStore": {}}}),
        );
        let found = check(&leaf, &p, Some(&far));
        assert!(
            found[0]
                .starts_with("spec.content.generate.issuerRef.name: the issuer ca may not be used"),
            "{found:?}"
        );
        let own = ms(
            "ca",
            serde_json::json!({"profile": "p", "type": "certificate",
            "content": {"generate": {"isCA": true}}}),
        );
        assert!(check(&leaf, &p, Some(&own)).is_empty());
        // Not there yet: a warning, not a refusal (GitOps applies both in any order).
        let ns = NamespaceInfo::labelled("team-a", &[]);
        let facts = Facts {
            namespace: &ns,
            profiles: &p,
            issuer: None,
        };
        let (refused, warned) = managed_secret(&leaf, &facts);
        assert!(refused.is_empty());
        assert!(warned[0].contains("does not exist (yet)"));
    }
}
