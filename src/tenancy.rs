//! Secret spaces (pure): which paths of a profile's stores the ManagedSecrets of a namespace
//! may use. A namespace owns the paths under its space's prefix (`{namespace}/` unless the
//! profile maps it elsewhere); it may read, never write, the paths the profile shares with
//! it; every other path is refused before anything is read. Within a space, a path has one
//! writer: the ManagedSecret each store records as its owner ([`ownership`]).

use crate::api::{Generate, Isolation, Reason, SecretSpace, VaultProfile};
use crate::backend::Owner;
use crate::profiles::{NamespaceInfo, selects};
use kube::ResourceExt;

/// What a namespace may do at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// In its own space: read and write.
    Own,
    /// A path the profile shares with the namespace: read only.
    SharedRead,
    /// The profile turns isolation off: any path.
    Unisolated,
}

impl Access {
    pub fn may_write(self) -> bool {
        !matches!(self, Access::SharedRead)
    }
}

/// Why a path is refused; never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

/// The prefix of `namespace`'s space in `profile`, or None when isolation is off.
pub fn space(profile: &VaultProfile, namespace: &str) -> Option<String> {
    let default = SecretSpace::default();
    let space = profile.spec.secret_space.as_ref().unwrap_or(&default);
    (space.isolation == Isolation::Enforced).then(|| space.prefix.replace("{namespace}", namespace))
}

/// The first path segment keyhaven keeps its own bookkeeping under in a store (the vault
/// store's version records and history): no ManagedSecret may use it, whatever its space.
pub const RESERVED_SEGMENT: &str = "keyhaven";

/// What the namespace `ns` may do at `path` of `profile`'s stores.
pub fn access(profile: &VaultProfile, ns: &NamespaceInfo, path: &str) -> Result<Access, Refusal> {
    if path.split('/').next() == Some(RESERVED_SEGMENT) {
        return Err(Refusal {
            reason: Reason::PathReserved,
            message: format!(
                "path {path}: paths under {RESERVED_SEGMENT}/ hold keyhaven's own bookkeeping in the stores and are never a ManagedSecret's"
            ),
        });
    }
    let Some(prefix) = space(profile, &ns.name) else {
        return Ok(Access::Unisolated);
    };
    if path.starts_with(&prefix) {
        return Ok(Access::Own);
    }
    let shared = profile.spec.shared_paths.iter().any(|s| {
        let covers = match s.path.strip_suffix('/') {
            Some(dir) => path.starts_with(&s.path) || path == dir,
            None => path == s.path,
        };
        // An invalid selector selects nothing.
        covers && selects(Some(&s.namespace_selector), &ns.labels) == Ok(true)
    });
    if shared {
        return Ok(Access::SharedRead);
    }
    Err(Refusal {
        reason: Reason::PathNotInNamespace,
        message: format!(
            "path {path} is outside the secret space {prefix} of namespace {} (VaultProfile {}); nothing was read or written",
            ns.name,
            profile.name_any()
        ),
    })
}

/// The refusal of a write (push, generation, rotation, rollback) to a shared read-only path.
pub fn read_only(profile: &VaultProfile, ns: &str, path: &str) -> Refusal {
    Refusal {
        reason: Reason::PathReadOnly,
        message: format!(
            "path {path} is shared read-only with namespace {ns} by VaultProfile {}: only content.fromStore may use it (no push, generation, rotation or rollback)",
            profile.name_any()
        ),
    }
}

/// The profiles sharing a store with `profile` whose secret spaces could overlap its own:
/// a different prefix template (namespace `x` of `{namespace}/` owns every space of
/// `x/{namespace}/`), or isolation turned off (any path). Secrets of a profile with such a
/// conflict are refused until the platform team gives the profiles one template or
/// separate stores.
/// `backend` says where a store keeps its data (two SecretStores over one Vault mount share
/// it); a store it knows nothing of is only itself.
pub fn space_conflicts<'a>(
    profile: &VaultProfile,
    all: impl IntoIterator<Item = &'a VaultProfile>,
    backend: impl Fn(&str) -> Option<String>,
) -> Vec<Refusal> {
    let name = profile.name_any();
    let ours = template(profile);
    let data_of = |store: &str| backend(store).unwrap_or_else(|| format!("store {store}"));
    // The store a profile migrates from counts too: a migration reads and deletes there.
    let touched = |p: &'a VaultProfile| p.spec.stores().chain(p.spec.migrate_from.as_deref());
    let mine: Vec<(String, String)> = profile
        .spec
        .stores()
        .chain(profile.spec.migrate_from.as_deref())
        .map(|s| (s.to_owned(), data_of(s)))
        .collect();
    let mut out: Vec<Refusal> = all
        .into_iter()
        .filter(|other| other.name_any() != name)
        .filter_map(|other| {
            let shared = mine.iter().find_map(|(store, data)| {
                touched(other)
                    .any(|o| data_of(o) == *data)
                    .then_some(store.clone())
            })?;
            let theirs = template(other);
            (theirs != ours).then(|| Refusal {
                reason: Reason::SecretSpaceConflict,
                message: format!(
                    "VaultProfile {} shares store {shared} with this profile and keeps namespaces' secrets under {} (this one: {}): their secret spaces could overlap; give them one secretSpace or separate stores",
                    other.name_any(),
                    theirs.as_deref().unwrap_or("any path (isolation Disabled)"),
                    ours.as_deref().unwrap_or("any path (isolation Disabled)"),
                ),
            })
        })
        .collect();
    out.sort_by(|a, b| a.message.cmp(&b.message));
    out
}

/// A profile's space template, or None when its isolation is off.
fn template(profile: &VaultProfile) -> Option<String> {
    space(profile, "{namespace}")
}

/// Whether `profile` lets a generated certificate be what `generate` asks: an intermediate
/// CA (`isCA` with `issuerRef`) only with the profile's `allowIntermediateCAs`.
pub fn issuance(profile: &VaultProfile, generate: &Generate) -> Result<(), Refusal> {
    if generate.is_ca && generate.issuer_ref.is_some() && !profile.spec.allow_intermediate_cas {
        return Err(Refusal {
            reason: Reason::IntermediateCANotAllowed,
            message: format!(
                "isCA with issuerRef makes an intermediate CA, and VaultProfile {} does not allow them (allowIntermediateCAs)",
                profile.name_any()
            ),
        });
    }
    Ok(())
}

/// Whether `me` may write `path` in `store`, which records `recorded` as the path's owner:
/// yes when it records none, records `me`, or records a ManagedSecret that is gone
/// (`alive` says whether one with that uid exists); a live other owner is refused.
pub fn ownership(
    store: &str,
    path: &str,
    me: &Owner,
    recorded: Option<&Owner>,
    alive: impl Fn(&Owner) -> bool,
) -> Result<(), Refusal> {
    match recorded {
        Some(owner) if owner.uid != me.uid && alive(owner) => Err(Refusal {
            reason: Reason::PathOwnedElsewhere,
            message: format!(
                "path {path} in store {store} is written by {owner}; a second writer is refused until it is deleted (read it with content.fromStore)"
            ),
        }),
        _ => Ok(()),
    }
}

/// Whether a ManagedSecret of `namespace` may keep versions in the kubernetes store `store`,
/// whose Secrets live in `store_ns` (with `labels`): its own namespace, or one a platform
/// admin set aside for stores ([`crate::labels::STORE_NAMESPACE_LABEL`]`=true`). Anyone who
/// may read Secrets in a tenant's namespace would otherwise read every other tenant's
/// versions kept there, and could plant values or owners.
pub fn store_namespace(
    store: &str,
    store_ns: &str,
    namespace: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), Refusal> {
    let set_aside = labels
        .get(crate::labels::STORE_NAMESPACE_LABEL)
        .is_some_and(|v| v == "true");
    match store_ns == namespace || set_aside {
        true => Ok(()),
        false => Err(Refusal {
            reason: Reason::StoreNamespaceNotAllowed,
            message: format!(
                "store {store} keeps its Secrets in namespace {store_ns}, another tenant's: \
                 ManagedSecrets of {namespace} may use a kubernetes store only in their own \
                 namespace or in one labelled {}=true (set aside for stores)",
                crate::labels::STORE_NAMESPACE_LABEL
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(spec: serde_json::Value) -> VaultProfile {
        let mut full = serde_json::json!({"source": "s"});
        full.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        serde_json::from_value(serde_json::json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "VaultProfile",
            "metadata": {"name": "p"}, "spec": full,
        }))
        .unwrap()
    }

    fn ns(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo::labelled(name, labels)
    }

    #[test]
    fn a_namespace_owns_its_space_and_nothing_else() {
        let p = profile(serde_json::json!({}));
        let a = ns("team-a", &[]);
        assert_eq!(access(&p, &a, "team-a/db"), Ok(Access::Own));
        assert_eq!(access(&p, &a, "team-a/x/y"), Ok(Access::Own));
        for other in ["team-b/db", "team-a", "team-ab/db", "db", "app/db"] {
            let refused = access(&p, &a, other).unwrap_err();
            assert_eq!(refused.reason, Reason::PathNotInNamespace, "{other}");
            assert!(refused.message.contains(other) && refused.message.contains("team-a/"));
        }
    }

    #[test]
    fn a_profile_maps_the_space_elsewhere() {
        let p = profile(serde_json::json!({"secretSpace": {"prefix": "apps/{namespace}/"}}));
        let a = ns("a", &[]);
        assert_eq!(access(&p, &a, "apps/a/db"), Ok(Access::Own));
        assert!(access(&p, &a, "a/db").is_err());
        assert!(access(&p, &a, "apps/ab/db").is_err(), "a whole segment");
    }

    #[test]
    fn shared_paths_are_read_only_and_only_for_the_namespaces_selected() {
        let p = profile(serde_json::json!({"sharedPaths": [
            {"path": "shared/ca", "namespaceSelector": {"matchLabels": {"tier": "prod"}}},
            {"path": "shared/certs/", "namespaceSelector": {"matchLabels": {"tier": "prod"}}},
        ]}));
        let prod = ns("a", &[("tier", "prod")]);
        let dev = ns("b", &[("tier", "dev")]);
        assert_eq!(access(&p, &prod, "shared/ca"), Ok(Access::SharedRead));
        assert_eq!(
            access(&p, &prod, "shared/certs/web"),
            Ok(Access::SharedRead)
        );
        assert!(
            access(&p, &prod, "shared/cab").is_err(),
            "an exact path, not a prefix"
        );
        assert!(access(&p, &dev, "shared/ca").is_err(), "not selected");
        assert!(!Access::SharedRead.may_write());
        assert!(Access::Own.may_write());
    }

    #[test]
    fn an_intermediate_ca_needs_the_profiles_permission() {
        let generate = |v: serde_json::Value| -> Generate { serde_json::from_value(v).unwrap() };
        let intermediate =
            generate(serde_json::json!({"isCA": true, "issuerRef": {"name": "root"}}));
        let refused = issuance(&profile(serde_json::json!({})), &intermediate).unwrap_err();
        assert_eq!(refused.reason, Reason::IntermediateCANotAllowed);
        let allowing = profile(serde_json::json!({"allowIntermediateCAs": true}));
        assert_eq!(issuance(&allowing, &intermediate), Ok(()));
        let root = generate(serde_json::json!({"isCA": true}));
        assert_eq!(issuance(&profile(serde_json::json!({})), &root), Ok(()));
        let leaf = generate(serde_json::json!({"issuerRef": {"name": "root"}}));
        assert_eq!(issuance(&profile(serde_json::json!({})), &leaf), Ok(()));
    }

    fn named(name: &str, spec: serde_json::Value) -> VaultProfile {
        let mut p = profile(spec);
        p.metadata.name = Some(name.into());
        p
    }

    #[test]
    fn profiles_sharing_a_store_must_share_one_space_template() {
        let a = named("a", serde_json::json!({"source": "bao"}));
        let same = named(
            "same",
            serde_json::json!({"source": "other", "syncTargets": ["bao"]}),
        );
        let nested = named(
            "nested",
            serde_json::json!({"source": "bao",
            "secretSpace": {"prefix": "teams/{namespace}/"}}),
        );
        let open = named(
            "open",
            serde_json::json!({"source": "bao",
            "secretSpace": {"isolation": "Disabled"}}),
        );
        let apart = named(
            "apart",
            serde_json::json!({"source": "hsm",
            "secretSpace": {"prefix": "teams/{namespace}/"}}),
        );
        let none = |_: &str| None;
        assert!(space_conflicts(&a, [&a, &same, &apart], none).is_empty());
        let found = space_conflicts(&a, [&a, &nested, &open, &apart], none);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found
                .iter()
                .all(|r| r.reason == Reason::SecretSpaceConflict)
        );
        assert!(
            found[0].message.contains("VaultProfile nested")
                || found[1].message.contains("VaultProfile nested")
        );
        assert_eq!(
            space_conflicts(&nested, [&a], none).len(),
            1,
            "said on both"
        );
        // Two SecretStores over one Vault mount are one place.
        let elsewhere = named(
            "elsewhere",
            serde_json::json!({"source": "bao-again",
            "secretSpace": {"prefix": "teams/{namespace}/"}}),
        );
        assert!(space_conflicts(&a, [&elsewhere], none).is_empty());
        let one_mount = |s: &str| {
            s.starts_with("bao")
                .then(|| "vault http://bao secret".to_owned())
        };
        assert_eq!(space_conflicts(&a, [&elsewhere], one_mount).len(), 1);
        // A profile migrating off a store another template still uses: a conflict (a
        // migration reads and deletes there), said on both.
        let legacy = named(
            "legacy",
            serde_json::json!({"source": "bao-old",
            "secretSpace": {"prefix": "teams/{namespace}/"}}),
        );
        let moving = named(
            "moving",
            serde_json::json!({"source": "bao-new", "migrateFrom": "bao-old"}),
        );
        assert_eq!(space_conflicts(&moving, [&legacy], none).len(), 1);
        assert_eq!(space_conflicts(&legacy, [&moving], none).len(), 1);
    }

    #[test]
    fn keyhavens_bookkeeping_is_nobodys_space() {
        let open = profile(serde_json::json!({"secretSpace": {"isolation": "Disabled"}}));
        let default = profile(serde_json::json!({}));
        let ns_keyhaven = ns("keyhaven", &[]);
        for (p, path) in [
            (&open, "keyhaven/objects/abc"),
            (&default, "keyhaven/history/abc"),
            (&default, "keyhaven"),
        ] {
            let refused = access(p, &ns_keyhaven, path).unwrap_err();
            assert_eq!(refused.reason, Reason::PathReserved, "{path}");
        }
        assert_eq!(
            access(&open, &ns_keyhaven, "keyhavenx/a"),
            Ok(Access::Unisolated)
        );
    }

    #[test]
    fn isolation_off_is_said_in_the_spec() {
        let p = profile(serde_json::json!({"secretSpace": {"isolation": "Disabled"}}));
        assert_eq!(
            access(&p, &ns("a", &[]), "anything/at/all"),
            Ok(Access::Unisolated)
        );
        assert_eq!(space(&p, "a"), None);
    }

    #[test]
    fn a_path_has_one_live_writer() {
        let owner = |name: &str, uid: &str| Owner {
            namespace: "a".into(),
            name: name.into(),
            uid: uid.into(),
        };
        let me = owner("second", "u2");
        let first = owner("first", "u1");
        let alive = |o: &Owner| o.uid == "u1";
        assert!(ownership("s", "a/db", &me, None, alive).is_ok(), "unowned");
        assert!(
            ownership("s", "a/db", &me, Some(&me), alive).is_ok(),
            "mine"
        );
        let refused = ownership("s", "a/db", &me, Some(&first), alive).unwrap_err();
        assert_eq!(refused.reason, Reason::PathOwnedElsewhere);
        assert!(
            refused.message.contains("ManagedSecret a/first"),
            "{}",
            refused.message
        );
        assert!(refused.message.contains("a/db"));
        // Once the first is gone (no live object with its uid), the path is free.
        assert!(ownership("s", "a/db", &me, Some(&first), |_| false).is_ok());
    }

    #[test]
    fn a_kubernetes_store_serves_its_own_namespace_or_one_set_aside() {
        let none = std::collections::BTreeMap::new();
        let aside = std::collections::BTreeMap::from([(
            crate::labels::STORE_NAMESPACE_LABEL.to_owned(),
            "true".to_owned(),
        )]);
        assert!(store_namespace("k", "team-a", "team-a", &none).is_ok());
        assert!(store_namespace("k", "secrets", "team-a", &aside).is_ok());
        let r = store_namespace("k", "team-b", "team-a", &none).unwrap_err();
        assert_eq!(r.reason, Reason::StoreNamespaceNotAllowed);
        assert!(r.message.contains("namespace team-b"), "{}", r.message);
    }
}
