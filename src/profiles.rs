//! Which VaultProfile a ManagedSecret uses: a pure function of the ManagedSecret's
//! `spec.profile`, its namespace's labels and annotations, and the profiles that exist.
//! Shared by the controller and the `kubectl-keyhaven` plugin (`profile-for`). No I/O.
//!
//! The rules, in order:
//! 1. `spec.profile: NAME` names the profile. It must exist and its `namespaceSelector`
//!    (when set) must select the namespace: namespaces cannot reach each other's stores.
//! 2. Otherwise the namespace annotation `keyhaven.io/profile: NAME` names it, under the
//!    same checks.
//! 3. Otherwise the profile with `default: true` whose `namespaceSelector` selects the
//!    namespace. Two or more such profiles are a conflict: refused, never resolved silently.
//! 4. Otherwise the profile with `fallback: true` (when its selector, if any, selects the
//!    namespace). Two fallbacks are a conflict too.
//! 5. Otherwise there is no profile.

use crate::api::{Reason, VaultProfile};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use std::collections::BTreeMap;

/// The namespace annotation naming the profile of ManagedSecrets without `spec.profile`.
pub use crate::labels::PROFILE_ANNOTATION;

/// What resolution needs of a namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl NamespaceInfo {
    /// A namespace `name` with `labels` (tests).
    #[cfg(test)]
    pub fn labelled(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: Default::default(),
        }
    }

    /// From any object's metadata (a Namespace, or its metadata-only form).
    pub fn from_meta(meta: &kube::api::ObjectMeta) -> NamespaceInfo {
        NamespaceInfo {
            name: meta.name.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
        }
    }
}

/// How the profile was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `spec.profile`.
    Spec,
    /// The namespace's `keyhaven.io/profile` annotation.
    Annotation,
    /// The one `default: true` profile selecting the namespace.
    Default,
    /// The cluster-wide `fallback: true` profile.
    Fallback,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Spec => "spec.profile",
            Via::Annotation => "namespace annotation keyhaven.io/profile",
            Via::Default => "namespace default",
            Via::Fallback => "cluster fallback",
        }
    }
}

/// A resolved profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub profile: String,
    pub via: Via,
}

/// Why no profile can be used: a condition reason and a message (no secret values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub reason: Reason,
    pub message: String,
}

/// Whether `selector` selects an object with `labels`. No selector selects everything, as
/// does an empty one. An invalid selector (unknown operator, `In` without values) is an error.
pub fn selects(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    let Some(selector) = selector else {
        return Ok(true);
    };
    for (k, v) in selector.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return Ok(false);
        }
    }
    for expr in selector.match_expressions.iter().flatten() {
        let values = expr.values.as_deref().unwrap_or_default();
        let value = labels.get(&expr.key);
        let ok = match expr.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!(
                    "matchExpressions: {} {} needs values",
                    expr.key, expr.operator
                ));
            }
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => return Err(format!("matchExpressions: unknown operator {other:?}")),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether `profile` may be used from `ns` (its selector, when set, selects the namespace).
/// An invalid selector allows nothing.
pub fn allows(profile: &VaultProfile, ns: &NamespaceInfo) -> bool {
    selects(profile.spec.namespace_selector.as_ref(), &ns.labels).unwrap_or(false)
}

/// The `default: true` profiles selecting `ns`, sorted by name. A default profile needs a
/// selector (the CRD refuses one without); should one slip through, it selects nothing.
pub fn defaults_for<'a>(
    ns: &NamespaceInfo,
    profiles: impl IntoIterator<Item = &'a VaultProfile>,
) -> Vec<String> {
    let mut names: Vec<String> = profiles
        .into_iter()
        .filter(|p| p.spec.default && p.spec.namespace_selector.is_some() && allows(p, ns))
        .map(|p| p.name_any())
        .collect();
    names.sort();
    names
}

/// Every `fallback: true` profile, sorted by name.
pub fn fallbacks<'a>(profiles: impl IntoIterator<Item = &'a VaultProfile>) -> Vec<String> {
    let mut names: Vec<String> = profiles
        .into_iter()
        .filter(|p| p.spec.fallback)
        .map(|p| p.name_any())
        .collect();
    names.sort();
    names
}

/// The profile a ManagedSecret in `ns` asking for `requested` (its `spec.profile`) uses.
pub fn resolve<'a>(
    requested: Option<&str>,
    ns: &NamespaceInfo,
    profiles: impl IntoIterator<Item = &'a VaultProfile>,
) -> Result<Resolved, Refused> {
    let profiles: Vec<&VaultProfile> = profiles.into_iter().collect();
    let named = |name: &str, via: Via| -> Result<Resolved, Refused> {
        let from = match via {
            Via::Annotation => format!(
                " (named by the annotation {PROFILE_ANNOTATION} of namespace {})",
                ns.name
            ),
            _ => String::new(),
        };
        let Some(profile) = profiles.iter().find(|p| p.name_any() == name) else {
            return Err(Refused {
                reason: Reason::ProfileNotFound,
                message: format!("VaultProfile {name} does not exist{from}"),
            });
        };
        if !allows(profile, ns) {
            return Err(Refused {
                reason: Reason::ProfileNotAllowed,
                message: format!(
                    "VaultProfile {name}{from} does not select namespace {}: its namespaceSelector does not match the namespace's labels",
                    ns.name
                ),
            });
        }
        Ok(Resolved {
            profile: name.to_owned(),
            via,
        })
    };
    if let Some(name) = requested {
        return named(name, Via::Spec);
    }
    if let Some(name) = ns
        .annotations
        .get(PROFILE_ANNOTATION)
        .filter(|n| !n.is_empty())
    {
        return named(name, Via::Annotation);
    }
    let defaults = defaults_for(ns, profiles.iter().copied());
    match defaults.as_slice() {
        [one] => {
            return Ok(Resolved {
                profile: one.clone(),
                via: Via::Default,
            });
        }
        [] => {}
        many => {
            return Err(Refused {
                reason: Reason::DefaultProfileConflict,
                message: format!(
                    "namespace {} is selected by more than one default VaultProfile ({}): set spec.profile, annotate the namespace with {PROFILE_ANNOTATION}, or make the selectors disjoint",
                    ns.name,
                    many.join(", ")
                ),
            });
        }
    }
    let fallbacks = fallbacks(profiles.iter().copied());
    match fallbacks.as_slice() {
        [] => Err(Refused {
            reason: Reason::NoProfile,
            message: format!(
                "spec.profile is not set, namespace {} has no {PROFILE_ANNOTATION} annotation, no default VaultProfile selects it and there is no fallback profile",
                ns.name
            ),
        }),
        [one] => named(one, Via::Fallback).map_err(|_| Refused {
            reason: Reason::ProfileNotAllowed,
            message: format!(
                "the fallback VaultProfile {one} does not select namespace {} (its namespaceSelector), and no default profile does",
                ns.name
            ),
        }),
        many => Err(Refused {
            reason: Reason::FallbackProfileConflict,
            message: format!(
                "more than one VaultProfile is the fallback ({}): keep fallback: true on one",
                many.join(", ")
            ),
        }),
    }
}

/// The conflicts `profile` is part of, as one message per kind, for its status: namespaces
/// it and another default profile both select, and other fallback profiles.
pub fn conflicts<'a>(
    profile: &VaultProfile,
    namespaces: &[NamespaceInfo],
    profiles: impl IntoIterator<Item = &'a VaultProfile> + Clone,
) -> Vec<Refused> {
    let name = profile.name_any();
    let mut out = vec![];
    if profile.spec.default {
        // Other default profile -> the namespaces both select.
        let mut shared: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for ns in namespaces {
            let defaults = defaults_for(ns, profiles.clone());
            if defaults.len() > 1 && defaults.contains(&name) {
                for other in defaults.into_iter().filter(|d| *d != name) {
                    shared.entry(other).or_default().push(ns.name.clone());
                }
            }
        }
        if !shared.is_empty() {
            let parts: Vec<String> = shared
                .into_iter()
                .map(|(other, mut nss)| {
                    nss.sort();
                    let shown = nss.len().min(5);
                    let more = if nss.len() > shown {
                        format!(" and {} more", nss.len() - shown)
                    } else {
                        String::new()
                    };
                    format!(
                        "with VaultProfile {other} on namespace(s) {}{more}",
                        nss[..shown].join(", ")
                    )
                })
                .collect();
            out.push(Refused {
                reason: Reason::DefaultProfileConflict,
                message: format!(
                    "default conflict {}: ManagedSecrets there without spec.profile are refused",
                    parts.join("; ")
                ),
            });
        }
    }
    if profile.spec.fallback {
        let others: Vec<String> = fallbacks(profiles)
            .into_iter()
            .filter(|f| *f != name)
            .collect();
        if !others.is_empty() {
            out.push(Refused {
                reason: Reason::FallbackProfileConflict,
                message: format!(
                    "fallback conflict with VaultProfile(s) {}: no fallback is used",
                    others.join(", ")
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use serde_json::json;

    fn profile(name: &str, spec: serde_json::Value) -> VaultProfile {
        let mut spec = spec;
        spec["source"] = json!("s");
        serde_json::from_value(json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "VaultProfile",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap()
    }

    fn ns(name: &str, labels: &[(&str, &str)], profile: Option<&str>) -> NamespaceInfo {
        NamespaceInfo {
            annotations: profile
                .map(|p| (PROFILE_ANNOTATION.to_owned(), p.to_owned()))
                .into_iter()
                .collect(),
            ..NamespaceInfo::labelled(name, labels)
        }
    }

    fn tier(t: &str) -> serde_json::Value {
        json!({"matchLabels": {"tier": t}})
    }

    fn bed() -> Vec<VaultProfile> {
        vec![
            profile(
                "dev",
                json!({"default": true, "namespaceSelector": tier("dev")}),
            ),
            profile(
                "prod",
                json!({"default": true, "namespaceSelector": tier("prod")}),
            ),
            profile("shared", json!({})),
            profile("fallback", json!({"fallback": true})),
            profile("prod-hsm", json!({"namespaceSelector": tier("prod")})),
        ]
    }

    fn ok(profile: &str, via: Via) -> Result<Resolved, Refused> {
        Ok(Resolved {
            profile: profile.into(),
            via,
        })
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let labels: BTreeMap<String, String> = [("tier".to_owned(), "prod".to_owned())]
            .into_iter()
            .collect();
        let expr = |op: &str, values: &[&str]| LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: op.into(),
                values: (!values.is_empty())
                    .then(|| values.iter().map(|v| v.to_string()).collect()),
            }]),
            match_labels: None,
        };
        assert_eq!(selects(None, &labels), Ok(true));
        assert_eq!(selects(Some(&LabelSelector::default()), &labels), Ok(true));
        assert_eq!(
            selects(Some(&expr("In", &["prod", "dev"])), &labels),
            Ok(true)
        );
        assert_eq!(selects(Some(&expr("In", &["dev"])), &labels), Ok(false));
        assert_eq!(selects(Some(&expr("NotIn", &["dev"])), &labels), Ok(true));
        assert_eq!(selects(Some(&expr("NotIn", &["prod"])), &labels), Ok(false));
        assert_eq!(selects(Some(&expr("Exists", &[])), &labels), Ok(true));
        assert_eq!(
            selects(Some(&expr("DoesNotExist", &[])), &labels),
            Ok(false)
        );
        assert_eq!(
            selects(Some(&expr("DoesNotExist", &[])), &BTreeMap::new()),
            Ok(true)
        );
        assert!(selects(Some(&expr("In", &[])), &labels).is_err());
        assert!(selects(Some(&expr("Near", &["x"])), &labels).is_err());
        let both = LabelSelector {
            match_labels: Some([("tier".to_owned(), "prod".to_owned())].into()),
            ..expr("Exists", &[])
        };
        assert_eq!(selects(Some(&both), &labels), Ok(true));
        assert_eq!(selects(Some(&both), &BTreeMap::new()), Ok(false));
    }

    #[test]
    fn defaults_route_namespaces_by_labels() {
        let p = bed();
        assert_eq!(
            resolve(None, &ns("a", &[("tier", "dev")], None), &p),
            ok("dev", Via::Default)
        );
        assert_eq!(
            resolve(None, &ns("b", &[("tier", "prod")], None), &p),
            ok("prod", Via::Default)
        );
        // Selected by no default: the fallback.
        assert_eq!(
            resolve(None, &ns("c", &[("tier", "qa")], None), &p),
            ok("fallback", Via::Fallback)
        );
    }

    #[test]
    fn spec_profile_wins_but_must_select_the_namespace() {
        let p = bed();
        let prod = ns("b", &[("tier", "prod")], None);
        let dev = ns("a", &[("tier", "dev")], None);
        assert_eq!(
            resolve(Some("prod-hsm"), &prod, &p),
            ok("prod-hsm", Via::Spec)
        );
        // No selector: every namespace may use it (profiles made before issue 9 keep working).
        assert_eq!(resolve(Some("shared"), &dev, &p), ok("shared", Via::Spec));
        let refused = resolve(Some("prod-hsm"), &dev, &p).unwrap_err();
        assert_eq!(refused.reason, "ProfileNotAllowed");
        assert!(refused.message.contains("prod-hsm") && refused.message.contains("namespace a"));
        // A default profile of other namespaces is no exception.
        assert_eq!(
            resolve(Some("prod"), &dev, &p).unwrap_err().reason,
            "ProfileNotAllowed"
        );
        assert_eq!(
            resolve(Some("nope"), &dev, &p).unwrap_err().reason,
            "ProfileNotFound"
        );
    }

    #[test]
    fn annotation_names_another_allowed_profile() {
        let p = bed();
        assert_eq!(
            resolve(None, &ns("b", &[("tier", "prod")], Some("prod-hsm")), &p),
            ok("prod-hsm", Via::Annotation)
        );
        assert_eq!(
            resolve(None, &ns("b", &[("tier", "prod")], Some("shared")), &p),
            ok("shared", Via::Annotation)
        );
        // The annotation cannot reach a profile that does not select the namespace.
        let refused =
            resolve(None, &ns("a", &[("tier", "dev")], Some("prod-hsm")), &p).unwrap_err();
        assert_eq!(refused.reason, "ProfileNotAllowed");
        assert!(
            refused.message.contains(PROFILE_ANNOTATION),
            "{}",
            refused.message
        );
        // A missing profile is refused, not replaced by the default.
        let refused = resolve(None, &ns("a", &[("tier", "dev")], Some("gone")), &p).unwrap_err();
        assert_eq!(refused.reason, "ProfileNotFound");
        // spec.profile wins over the annotation.
        assert_eq!(
            resolve(
                Some("shared"),
                &ns("b", &[("tier", "prod")], Some("prod-hsm")),
                &p
            ),
            ok("shared", Via::Spec)
        );
    }

    #[test]
    fn two_defaults_are_refused_and_reported_on_both() {
        let mut p = bed();
        p.push(profile(
            "prod-too",
            json!({"default": true, "namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["prod", "staging"]}]}}),
        ));
        let prod = ns("b", &[("tier", "prod")], None);
        let refused = resolve(None, &prod, &p).unwrap_err();
        assert_eq!(refused.reason, "DefaultProfileConflict");
        assert!(
            refused.message.contains("prod, prod-too"),
            "{}",
            refused.message
        );
        // spec.profile and the annotation still work there.
        assert_eq!(resolve(Some("prod"), &prod, &p), ok("prod", Via::Spec));
        assert_eq!(
            resolve(None, &ns("b", &[("tier", "prod")], Some("prod-too")), &p),
            ok("prod-too", Via::Annotation)
        );
        // Only staging: no conflict.
        assert_eq!(
            resolve(None, &ns("s", &[("tier", "staging")], None), &p),
            ok("prod-too", Via::Default)
        );
        let namespaces = vec![
            prod.clone(),
            ns("s", &[("tier", "staging")], None),
            ns("a", &[("tier", "dev")], None),
        ];
        let on = |name: &str| {
            let me = p.iter().find(|x| x.name_any() == name).unwrap();
            conflicts(me, &namespaces, &p)
        };
        let prod_c = on("prod");
        assert_eq!(prod_c.len(), 1);
        assert_eq!(prod_c[0].reason, "DefaultProfileConflict");
        assert!(
            prod_c[0]
                .message
                .contains("VaultProfile prod-too on namespace(s) b"),
            "{}",
            prod_c[0].message
        );
        let too_c = on("prod-too");
        assert!(
            too_c[0]
                .message
                .contains("VaultProfile prod on namespace(s) b"),
            "{}",
            too_c[0].message
        );
        assert!(on("dev").is_empty());
        assert!(on("shared").is_empty());
    }

    #[test]
    fn fallback_rules() {
        let mut p = bed();
        // The fallback's own selector still applies.
        p[3] = profile(
            "fallback",
            json!({"fallback": true, "namespaceSelector": tier("qa")}),
        );
        assert_eq!(
            resolve(None, &ns("c", &[("tier", "qa")], None), &p),
            ok("fallback", Via::Fallback)
        );
        assert_eq!(
            resolve(None, &ns("c", &[], None), &p).unwrap_err().reason,
            "ProfileNotAllowed"
        );
        // Two fallbacks: refused, and reported on both.
        p.push(profile("fallback-2", json!({"fallback": true})));
        assert_eq!(
            resolve(None, &ns("c", &[("tier", "qa")], None), &p)
                .unwrap_err()
                .reason,
            "FallbackProfileConflict"
        );
        // A default still wins over the conflicting fallbacks.
        assert_eq!(
            resolve(None, &ns("a", &[("tier", "dev")], None), &p),
            ok("dev", Via::Default)
        );
        let c = conflicts(&p[3], &[], &p);
        assert_eq!(c[0].reason, "FallbackProfileConflict");
        assert!(c[0].message.contains("fallback-2"));
        // No fallback at all.
        let none: Vec<VaultProfile> = bed().into_iter().filter(|x| !x.spec.fallback).collect();
        assert_eq!(
            resolve(None, &ns("c", &[], None), &none)
                .unwrap_err()
                .reason,
            "NoProfile"
        );
    }

    #[test]
    fn a_default_without_selector_selects_nothing() {
        // The CRD refuses it; resolution must not make it everyone's default.
        let p = vec![profile("d", json!({"default": true}))];
        assert_eq!(
            resolve(None, &ns("x", &[], None), &p).unwrap_err().reason,
            "NoProfile"
        );
    }
}
