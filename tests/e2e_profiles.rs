//! End-to-end tests of profile resolution (issue 9) on the test bed: default profiles chosen
//! by namespace labels, the namespace annotation, the cluster fallback, conflicts reported on
//! both profiles, and profiles that do not select a namespace refused.
//!
//! Each test's operator watches one namespace (the fixture's), so the namespace whose labels
//! and annotations a test changes is the fixture's own.

mod e2e;

use e2e::fixture::{Fixture, wait_until};
use e2e::plugin;
use keyhaven::api::{ManagedSecret, VaultProfile};
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use std::time::Duration;

fn tier(t: &str) -> Value {
    json!({"matchLabels": {"tier": t}})
}

fn status_profile(ms: &ManagedSecret) -> Option<&str> {
    ms.status.as_ref().and_then(|s| s.profile.as_deref())
}

fn source_store(ms: &ManagedSecret) -> Option<&str> {
    ms.status
        .as_ref()?
        .targets
        .iter()
        .find(|t| t.role == "Source")
        .map(|t| t.store.as_str())
}

fn ready_message(ms: &ManagedSecret) -> String {
    ms.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// Waits until the ManagedSecret is Synced through `profile`, its source being `store`.
async fn wait_profile(fx: &Fixture, name: &str, profile: &str, store: &str) -> ManagedSecret {
    fx.wait_managed(name, &format!("Synced through {profile}"), |ms| {
        ms.status
            .as_ref()
            .is_some_and(|s| s.phase.is_some_and(|p| p == "Synced"))
            && status_profile(ms) == Some(profile)
            && source_store(ms) == Some(store)
    })
    .await
}

/// The profile's condition `type_`, once it has `status`.
async fn wait_profile_condition(
    fx: &Fixture,
    profile: &str,
    type_: &str,
    status: &str,
) -> (String, String) {
    let (c, message) = fx.wait_profile_condition(profile, type_, status).await;
    (c.message, message)
}

#[tokio::test]
async fn default_profiles_route_namespaces_by_labels_and_annotation() {
    let fx = Fixture::new("prof-route").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let kube_ns = fx.store_namespace("kstore").await;
    let kstore = fx
        .store("kstore", json!({"kubernetes": {"namespace": kube_ns}}))
        .await;
    let dev = fx
        .profile_spec(
            "dev",
            json!({"source": internal, "default": true, "namespaceSelector": tier("dev")}),
        )
        .await;
    let prod = fx
        .profile_spec(
            "prod",
            json!({"source": kstore, "default": true, "namespaceSelector": tier("prod")}),
        )
        .await;
    // A second profile prod namespaces may choose by annotation, and one only dev may use.
    let prod_alt = fx
        .profile_spec(
            "prod-alt",
            json!({"source": internal, "namespaceSelector": tier("prod")}),
        )
        .await;
    let dev_only = fx
        .profile_spec(
            "dev-only",
            json!({"source": internal, "namespaceSelector": tier("dev")}),
        )
        .await;

    fx.label_namespace(json!({"tier": "dev"}), json!({})).await;
    fx.secret(
        &fx.ns,
        "login",
        &[("username", "svc"), ("password", "pw-e2e-profiles-1")],
    )
    .await;
    // No spec.profile: the namespace's default decides.
    fx.managed_secret(
        "db",
        json!({"type": "basic-auth", "refreshInterval": "1s", "content": {"fromSecret": {"name": "login"}}}),
    )
    .await;
    let ms = wait_profile(&fx, "db", &dev, &internal).await;
    assert!(ms.spec.profile.is_none());
    let ready = ready_message(&ms);
    assert!(
        ready.contains(&dev) && ready.contains("by namespace default"),
        "{ready}"
    );
    assert_eq!(
        fx.secret_data(&fx.ns, "db").await.unwrap()["password"],
        "pw-e2e-profiles-1"
    );

    // Relabelling the namespace re-reconciles its ManagedSecrets: prod's store is the source
    // now, and gets the next version (the current one stays where it was written).
    fx.label_namespace(json!({"tier": "prod"}), json!({})).await;
    let ms = wait_profile(&fx, "db", &prod, &kstore).await;
    let source = &ms.status.as_ref().unwrap().targets[0];
    assert_eq!(
        (source.store.as_str(), source.state.as_str()),
        (kstore.as_str(), "Pending"),
        "{source:?}"
    );
    fx.secret(
        &fx.ns,
        "login",
        &[("username", "svc"), ("password", "pw-e2e-profiles-2")],
    )
    .await;
    fx.wait_synced("db", 2).await;
    let in_kstore = wait_until(Duration::from_secs(30), || async {
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = fx.ns_api(&kube_ns);
        let list = secrets.list(&Default::default()).await.ok()?;
        (!list.items.is_empty()).then_some(list.items.len())
    })
    .await;
    assert!(in_kstore.is_some(), "the prod store holds nothing");

    // The annotation names another profile that selects the namespace.
    fx.label_namespace(json!({}), json!({"keyhaven.io/profile": prod_alt}))
        .await;
    let ms = wait_profile(&fx, "db", &prod_alt, &internal).await;
    assert!(
        ready_message(&ms).contains("by namespace annotation keyhaven.io/profile"),
        "{}",
        ready_message(&ms)
    );

    // ... but not one that does not: refused, with a condition that says why.
    fx.label_namespace(json!({}), json!({"keyhaven.io/profile": dev_only}))
        .await;
    let ms = fx.wait_not_ready("db", "ProfileNotAllowed").await;
    let ready = ms
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(
        ready.message.contains(&dev_only)
            && ready.message.contains(&fx.ns)
            && ready.message.contains("keyhaven.io/profile"),
        "{}",
        ready.message
    );
    assert_eq!(
        status_profile(&ms),
        None,
        "a refused profile is not recorded"
    );
    // The native Secret is left as it was.
    assert_eq!(
        fx.secret_data(&fx.ns, "db").await.unwrap()["password"],
        "pw-e2e-profiles-2"
    );

    // Annotation removed: back to the default of the labels.
    fx.label_namespace(json!({}), json!({"keyhaven.io/profile": null}))
        .await;
    wait_profile(&fx, "db", &prod, &kstore).await;

    // The profile counts the ManagedSecrets resolved to it.
    let api: Api<VaultProfile> = fx.cluster_api();
    let counted = wait_until(Duration::from_secs(60), || async {
        let p = api.get(&prod).await.ok()?;
        (p.status?.secrets == Some(1)).then_some(())
    })
    .await;
    assert!(counted.is_some(), "VaultProfile {prod} does not count db");
    fx.assert_values_never_leaked(&["pw-e2e-profiles-1", "pw-e2e-profiles-2"])
        .await;
}

#[tokio::test]
async fn conflicting_defaults_are_reported_on_both_and_refused() {
    let fx = Fixture::new("prof-conflict").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    fx.label_namespace(json!({"tier": "prod"}), json!({})).await;
    let a = fx
        .profile_spec(
            "a",
            json!({"source": internal, "default": true, "namespaceSelector": tier("prod")}),
        )
        .await;
    let b = fx
        .profile_spec(
            "b",
            json!({"source": internal, "default": true,
                   "namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["prod", "staging"]}]}}),
        )
        .await;
    fx.secret(&fx.ns, "pw", &[("password", "pw-e2e-profiles-2")])
        .await;
    fx.managed_secret(
        "app",
        json!({"type": "password", "content": {"fromSecret": {"name": "pw"}}}),
    )
    .await;
    let ms = fx.wait_not_ready("app", "DefaultProfileConflict").await;
    let ready = ms
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message
        .clone();
    assert!(
        ready.contains(&a) && ready.contains(&b),
        "the refusal names both profiles: {ready}"
    );
    assert!(
        fx.secret_data(&fx.ns, "app").await.is_none(),
        "nothing is materialized under a conflict"
    );
    // Both profiles report the conflict, naming the other and the namespace.
    for (me, other) in [(&a, &b), (&b, &a)] {
        let (condition, message) = wait_profile_condition(&fx, me, "Conflict", "True").await;
        assert!(
            condition.contains(other.as_str()) && condition.contains(&fx.ns),
            "{me}: {condition}"
        );
        assert!(message.contains("default conflict"), "{me}: {message}");
    }
    fx.wait_event("DefaultProfileConflict", &fx.ns).await;

    // spec.profile settles it for one ManagedSecret, whatever the defaults.
    fx.managed_secret(
        "pinned",
        json!({"profile": a, "type": "password", "content": {"fromSecret": {"name": "pw"}}}),
    )
    .await;
    wait_profile(&fx, "pinned", &a, &internal).await;

    // b stops being a default: the conflict clears on both, and app resolves to a.
    fx.profile_spec(
        "b",
        json!({"source": internal, "namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["prod", "staging"]}]}}),
    )
    .await;
    wait_profile(&fx, "app", &a, &internal).await;
    for p in [&a, &b] {
        wait_profile_condition(&fx, p, "Conflict", "False").await;
    }
}

#[tokio::test]
async fn unselected_profiles_are_refused_and_the_fallback_applies() {
    let fx = Fixture::new("prof-fallback").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let restricted = fx
        .profile_spec(
            "restricted",
            json!({"source": internal, "namespaceSelector": tier("prod")}),
        )
        .await;
    fx.secret(&fx.ns, "pw", &[("password", "pw-e2e-profiles-3")])
        .await;
    // The namespace is not labelled tier=prod: it cannot reach the restricted profile.
    fx.managed_secret(
        "named",
        json!({"profile": restricted, "type": "password", "content": {"fromSecret": {"name": "pw"}}}),
    )
    .await;
    let ms = fx.wait_not_ready("named", "ProfileNotAllowed").await;
    let message = &ms.status.as_ref().unwrap().conditions[0].message;
    assert!(message.contains(&restricted), "{message}");
    assert!(fx.secret_data(&fx.ns, "named").await.is_none());

    // No profile, no default, no fallback: NoProfile.
    fx.managed_secret(
        "loose",
        json!({"type": "password", "content": {"fromSecret": {"name": "pw"}}}),
    )
    .await;
    fx.wait_not_ready("loose", "NoProfile").await;

    // A fallback profile appears: the loose one resolves to it.
    let fallback = fx
        .profile_spec("fallback", json!({"source": internal, "fallback": true}))
        .await;
    wait_profile(&fx, "loose", &fallback, &internal).await;

    // Labelling the namespace lets it use the restricted profile.
    fx.label_namespace(json!({"tier": "prod"}), json!({})).await;
    wait_profile(&fx, "named", &restricted, &internal).await;

    // A second fallback: reported on both, and the loose ManagedSecret is refused.
    let fallback2 = fx
        .profile_spec("fallback-2", json!({"source": internal, "fallback": true}))
        .await;
    fx.wait_not_ready("loose", "FallbackProfileConflict").await;
    for (me, other) in [(&fallback, &fallback2), (&fallback2, &fallback)] {
        let (condition, _) = wait_profile_condition(&fx, me, "Conflict", "True").await;
        assert!(condition.contains(other.as_str()), "{me}: {condition}");
    }

    // The CRD refuses a default without a namespaceSelector.
    let bad: VaultProfile = serde_json::from_value(json!({
        "apiVersion": "keyhaven.io/v1alpha1", "kind": "VaultProfile",
        "metadata": {"name": fx.scoped("bad")},
        "spec": {"source": internal, "default": true}}))
    .unwrap();
    let err = fx
        .cluster_api::<VaultProfile>()
        .create(&PostParams::default(), &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("default: true needs a namespaceSelector"),
        "{err}"
    );
}

#[tokio::test]
async fn kubectl_plugin_reads_and_patches() {
    let fx = Fixture::new("prof-plugin").await;
    let scope = format!("{}={}", e2e::operator::SCOPE_LABEL, fx.ns);
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let dev = fx
        .profile_spec(
            "dev",
            json!({"source": internal, "default": true, "namespaceSelector": tier("dev")}),
        )
        .await;
    fx.label_namespace(json!({"tier": "dev"}), json!({})).await;
    fx.managed_secret(
        "gen",
        json!({"type": "password", "content": {"generate": {"length": 24}}}),
    )
    .await;
    let v1 = fx.wait_synced("gen", 1).await;
    let fp1 = v1.status.as_ref().unwrap().versions[0].fingerprint.clone();

    // stores: the table and JSON.
    wait_until(Duration::from_secs(60), || async {
        let (code, out) = plugin(&["stores", "-l", &scope]);
        (code == 0 && out.contains("Active")).then_some(())
    })
    .await
    .expect("the store becomes Active in `stores`");
    let (code, out) = plugin(&["stores", "-l", &scope]);
    assert_eq!(code, 0, "{out}");
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "TYPE", "SECRETS", "STATUS", "MESSAGE"]);
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..2], [internal.as_str(), "internal"], "{out}");
    assert_eq!(row[3], "Active", "{out}");
    let (code, out) = plugin(&["stores", "-l", &scope, "-o", "json"]);
    assert_eq!(code, 0, "{out}");
    let stores: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stores[0]["metadata"]["name"], internal.as_str());
    let (code, out) = plugin(&["stores", "-l", &scope, "-o", "yaml"]);
    assert_eq!(code, 0, "{out}");
    let stores: Value = serde_yaml::from_str(&out).unwrap();
    assert_eq!(stores[0]["spec"]["provider"]["internal"], json!({}));

    // versions.
    let (code, out) = plugin(&["versions", "gen", "-n", &fx.ns]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("VERSION"), "{out}");
    assert!(out.lines().nth(1).unwrap().starts_with("1*"), "{out}");
    assert!(
        out.contains(&internal) && out.contains("generated"),
        "{out}"
    );

    // rotate: a new generated version.
    let (code, out) = plugin(&["rotate", "gen", "-n", &fx.ns]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rotation requested"), "{out}");
    let v2 = fx.wait_synced("gen", 2).await;
    assert!(
        v2.annotations()
            .contains_key(keyhaven::controller::ROTATE_ANNOTATION)
    );
    assert_ne!(v2.status.as_ref().unwrap().versions[1].fingerprint, fp1);

    // rollback: version 3 holds version 1's content, with the reason given.
    let (code, out) = plugin(&[
        "rollback",
        "gen",
        "1",
        "--reason",
        "plugin rollback",
        "-n",
        &fx.ns,
    ]);
    assert_eq!(code, 0, "{out}");
    let v3 = fx.wait_synced("gen", 3).await;
    assert_eq!(v3.spec.rollback_to, Some(1));
    let last = v3.status.as_ref().unwrap().versions.last().unwrap().clone();
    assert_eq!(last.fingerprint, fp1);
    assert_eq!(last.reason.as_deref(), Some("plugin rollback"));
    let (code, out) = plugin(&["versions", "gen", "-n", &fx.ns, "-o", "json"]);
    assert_eq!(code, 0, "{out}");
    let versions: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(versions.as_array().unwrap().len(), 3, "{out}");
    assert_eq!(versions[2]["reason"], "plugin rollback");

    // profile-for: the same resolution as the operator's.
    let (code, out) = plugin(&["profile-for", &fx.ns, "-l", &scope, "-o", "json"]);
    assert_eq!(code, 0, "{out}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["profile"], dev.as_str());
    assert_eq!(doc["via"], "namespace default");
    assert_eq!(
        v3.status.as_ref().unwrap().profile.as_deref(),
        Some(dev.as_str())
    );
    let (code, out) = plugin(&["profile-for", &fx.ns, "-l", &scope]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&dev) && out.contains("namespace default"),
        "{out}"
    );
    // A namespace nothing selects: no profile, exit code 2, the reason shown.
    let other = fx.namespace("other").await;
    let (code, out) = plugin(&["profile-for", &other, "-l", &scope, "-o", "yaml"]);
    assert_eq!(code, 2, "{out}");
    let doc: Value = serde_yaml::from_str(&out).unwrap();
    assert_eq!(doc["reason"], "NoProfile");
    // A ManagedSecret that does not exist: a clear error, exit code 1.
    let (code, out) = plugin(&["rotate", "nope", "-n", &fx.ns]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("nope"), "{out}");
}

#[tokio::test]
async fn a_store_profiles_reference_is_not_removed_until_released_or_forced() {
    let fx = Fixture::new("prof-guard").await;
    let stores: Api<keyhaven::api::SecretStore> = fx.cluster_api();
    let held = fx.store("held", json!({"internal": {}})).await;
    let forced = fx.store("forced", json!({"internal": {}})).await;
    let free = fx.store("free", json!({"internal": {}})).await;
    let p = fx.profile("p", &held, &[&forced]).await;
    for s in [&held, &forced, &free] {
        let has = wait_until(Duration::from_secs(60), || async {
            let st = stores.get(s).await.ok()?;
            st.finalizers()
                .iter()
                .any(|f| f == keyhaven::controller::STORE_FINALIZER)
                .then_some(())
        })
        .await;
        assert!(has.is_some(), "SecretStore {s} never got the finalizer");
    }
    let gone = |name: String| {
        let stores = stores.clone();
        async move {
            wait_until(Duration::from_secs(60), || async {
                matches!(stores.get_opt(&name).await, Ok(None)).then_some(())
            })
            .await
            .is_some()
        }
    };
    // Referenced by no profile: deleted at once.
    stores.delete(&free, &Default::default()).await.unwrap();
    assert!(gone(free.clone()).await, "an unreferenced store stays");

    // Referenced (as source, as sync target): held, and the status says by whom.
    for s in [&held, &forced] {
        stores.delete(s, &Default::default()).await.unwrap();
    }
    for s in [&held, &forced] {
        let message = wait_until(Duration::from_secs(60), || async {
            let st = stores.get(s).await.ok()?.status?;
            let c = st
                .conditions
                .iter()
                .find(|c| c.type_ == "DeletionBlocked" && c.status == "True")?;
            Some((c.message.clone(), st.message.clone().unwrap_or_default()))
        })
        .await
        .unwrap_or_else(|| panic!("SecretStore {s}: no DeletionBlocked condition"));
        assert!(
            message.0.contains(&p) && message.1.contains("deletion held"),
            "{message:?}"
        );
        assert!(
            message.0.contains("keyhaven.io/force-delete"),
            "{message:?}"
        );
    }
    fx.wait_event("DeletionBlocked", &p).await;
    // Held across reconciles, not just for a while: two made now (a held store is
    // otherwise looked at every 10 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    fx.reconcile_store(&held, 2, &[]).await;
    assert!(stores.get_opt(&held).await.unwrap().is_some());

    // Forced: released although the profile still names it.
    stores
        .patch(
            &forced,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"annotations": {"keyhaven.io/force-delete": "true"}}}),
            ),
        )
        .await
        .unwrap();
    assert!(gone(forced.clone()).await, "a forced store stays");
    assert!(stores.get_opt(&held).await.unwrap().is_some());

    // The profile goes: the store is released.
    fx.cluster_api::<VaultProfile>()
        .delete(&p, &Default::default())
        .await
        .unwrap();
    assert!(gone(held.clone()).await, "a released store stays");
}
