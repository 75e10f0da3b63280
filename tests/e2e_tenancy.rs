//! Tenant isolation on the real bed, with keyhaven installed by its chart (the operator runs
//! as the chart's ServiceAccount, watching every namespace) and people acting through
//! `kubectl --as` under the chart's roles: tenant A's developer tries every way to read,
//! overwrite, roll back, migrate, issue from or delete tenant B's secrets in a store both use
//! (the bed's OpenBao; a kubernetes store over B's namespace), and B's value, versions and
//! native Secret come out byte-identical.
//! Also: one path has one writer (PathOwnedElsewhere), fingerprints of one value differ
//! across namespaces, a path shared read-only with A syncs and refuses A's push, the viewer
//! reads no Secret; and (second test) a profile maps the space elsewhere or disables it.

mod e2e;

use e2e::Testbed;
use e2e::chart::{
    self, apply_as, binding, impersonating_kubeconfig, kubectl_as, viewer_and_developer_roles,
};
use e2e::fixture::{Fixture, wait_until};
use e2e::operator::{Operator, SCOPE_LABEL};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::RoleBinding;
use keyhaven::api::ManagedSecret;
use kube::ResourceExt;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use vaultrs::client::VaultClient;
use vaultrs::kv2;

/// The bed's OpenBao as a store of this test's operator (root token in its namespace).
async fn openbao(fx: &Fixture, bed: &Testbed, name: &str, mount: &str, version: &str) -> String {
    let op_ns = fx.op.namespace.clone();
    fx.secret(&op_ns, "bao-token", &[("token", &bed.vault_token)])
        .await;
    fx.store(
        name,
        json!({"vault": {"server": bed.vault_addr, "mount": mount, "version": version,
            "insecureHTTP": true, "requestTimeout": "5s",
            "auth": {"tokenSecretRef": {"name": "bao-token", "key": "token"}}}}),
    )
    .await
}

/// What OpenBao holds at `path`: the value and its KV version.
async fn held(root: &VaultClient, path: &str) -> (BTreeMap<String, String>, u64) {
    let value: BTreeMap<String, String> = kv2::read(root, "secret", path).await.unwrap();
    let meta = kv2::read_metadata(root, "secret", path).await.unwrap();
    (value, meta.current_version)
}

/// Waits until A's `name` is refused with `reason` and an Event says so, the message naming
/// `path`; its native Secret was never made.
async fn refused(fx: &Fixture, name: &str, reason: &str, path: &str) {
    let ms = fx.wait_not_ready(name, reason).await;
    let ready = ms
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready");
    assert!(ready.unwrap().message.contains(path), "{ready:?}");
    fx.wait_event(reason, path).await;
    assert!(
        fx.secret_data(&fx.ns, name).await.is_none(),
        "{name}: a native Secret was made"
    );
}

/// A ManagedSecret manifest in `namespace`, labelled for this test's operator.
fn managed(fx: &Fixture, namespace: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
        "metadata": {"name": name, "namespace": namespace, "labels": {SCOPE_LABEL: fx.ns}},
        "spec": spec})
}

fn spec(profile: &str, type_: &str, path: Option<&str>, content: Value) -> Value {
    let mut spec = json!({"profile": profile, "type": type_, "content": content,
        "refreshInterval": "2s"});
    if let Some(path) = path {
        spec["path"] = path.into();
    }
    spec
}

/// A Secret manifest with string data.
fn secret(namespace: &str, name: &str, key: &str, value: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace}, "stringData": {key: value}})
}

/// Everything of B's ManagedSecret `name` an attack could change: its history, its native
/// Secret (data and resourceVersion) and what OpenBao holds at its path.
async fn snapshot(fx: &Fixture, root: &VaultClient, ns: &str, name: &str) -> String {
    let ms = fx.ns_api::<ManagedSecret>(ns).get(name).await.unwrap();
    let path = ms.store_path();
    let status = ms.status.unwrap();
    let native = fx.ns_api::<Secret>(ns).get(name).await.unwrap();
    let stored = held(root, &path).await;
    format!(
        "versions {}\ncurrent {:?}\nnative {} {:?}\nopenbao {:?}",
        serde_json::to_string(&status.versions).unwrap(),
        status.current_version,
        native.metadata.resource_version.unwrap_or_default(),
        native.data,
        stored,
    )
}

#[tokio::test]
async fn tenants_under_the_chart_reach_only_their_own_secret_space() {
    let bed = Testbed::load();
    let root = bed.vault_root();
    let mut fx = Fixture::new("tenancy").await;
    fx.op.kill(); // replaced by one installed by the chart
    let (a, b) = (fx.ns.clone(), fx.namespace("b").await);
    let op_ns = fx.namespace("op").await;
    let release = format!("keyhaven-{a}");
    // Its webhook configurations would call a Service no pod backs on the bed (no kubelet),
    // for every ManagedSecret of the cluster: e2e_webhook registers one by URL instead.
    let _release = chart::install(&release, &op_ns, &["webhook.enabled=false".into()]);
    let as_sa = impersonating_kubeconfig(&bed.kubeconfig, &op_ns, &release);
    let op = Operator::start_cluster_wide(&as_sa, &a, "-sa", &["--service-account", &release]);

    // The platform admin's part: stores and profiles both tenants may use.
    let bao = openbao(&fx, &bed, "bao", "secret", "v2").await;
    let kv1 = openbao(&fx, &bed, "kv1", "kv", "v1").await;
    let profile = fx.profile("p", &bao, &[]).await;
    let moving = fx
        .profile_spec("moving", json!({"source": kv1, "migrateFrom": bao}))
        .await;
    let sharing = fx
        .profile_spec(
            "sharing",
            json!({"source": bao, "sharedPaths": [{"path": format!("{b}/shared/"),
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": a}}}]}),
        )
        .await;
    // People: a developer in each namespace, a viewer in A (the chart's roles).
    let [view, edit] = viewer_and_developer_roles(&fx, &release).await;
    let (a_dev, b_dev, a_viewer) = (
        format!("{a}-dev"),
        format!("{b}-dev"),
        format!("{a}-viewer"),
    );
    for (ns, user, role) in [
        (&a, &a_dev, &edit),
        (&b, &b_dev, &edit),
        (&a, &a_viewer, &view),
    ] {
        let rb = binding(&format!("{user}-binding"), Some(ns), role, user);
        fx.apply::<RoleBinding>(fx.ns_api(ns), rb).await;
    }
    // Bindings take effect within moments.
    let bound = wait_until(Duration::from_secs(15), || async {
        let (ok, _) = kubectl_as(&b_dev, &["get", "managedsecrets", "-n", &b], None);
        ok.then_some(())
    })
    .await;
    assert!(bound.is_some(), "B's developer never got the edit role");

    // B's secrets, made by B's developer: a generated password, a CA, a pushed value and a
    // path B shares with A.
    apply_as(
        &b_dev,
        &secret(&b, "same-src", "password", "same-value-e2e-tenancy"),
    );
    apply_as(
        &b_dev,
        &secret(&b, "flags-src", "password", "shared-e2e-tenancy"),
    );
    let b_objects = [
        (
            "db",
            spec(
                &profile,
                "password",
                None,
                json!({"generate": {"length": 24}}),
            ),
        ),
        (
            "ca",
            spec(
                &profile,
                "certificate",
                None,
                json!({"generate": {"isCA": true, "commonName": "b-ca", "validity": "720h"}}),
            ),
        ),
        (
            "same",
            spec(
                &profile,
                "password",
                None,
                json!({"fromSecret": {"name": "same-src"}}),
            ),
        ),
        (
            "flags",
            spec(
                &sharing,
                "password",
                Some(&format!("{b}/shared/flags")),
                json!({"fromSecret": {"name": "flags-src"}}),
            ),
        ),
    ];
    for (name, spec) in &b_objects {
        apply_as(&b_dev, &managed(&fx, &b, name, spec.clone()));
    }
    for (name, _) in &b_objects {
        fx.wait_synced_in(&b, name, 1).await;
    }
    let b_value = fx.secret_data(&b, "db").await.unwrap()["password"].clone();
    let mut before = Vec::new();
    for name in ["db", "ca", "same", "flags"] {
        before.push(snapshot(&fx, &root, &b, name).await);
    }
    let b_db = format!("{b}/db");

    // A's developer, every way at B's password.
    apply_as(
        &a_dev,
        &secret(&a, "mine", "password", "a-chosen-e2e-tenancy"),
    );
    let attacks = [
        (
            "steal",
            spec(&profile, "password", Some(&b_db), json!({"fromStore": {}})),
        ),
        (
            "overwrite",
            spec(
                &profile,
                "password",
                Some(&b_db),
                json!({"fromSecret": {"name": "mine"}}),
            ),
        ),
        (
            "regenerate",
            spec(
                &profile,
                "password",
                Some(&b_db),
                json!({"generate": {"length": 24}}),
            ),
        ),
        ("rotate", {
            let mut s = spec(
                &profile,
                "password",
                Some(&b_db),
                json!({"generate": {"length": 24}}),
            );
            s["rotation"] = json!({"interval": "1m"});
            s
        }),
        ("rollback", {
            let mut s = spec(&profile, "password", Some(&b_db), json!({"fromStore": {}}));
            s["rollbackTo"] = 1.into();
            s
        }),
        (
            "migrate",
            spec(&moving, "password", Some(&b_db), json!({"fromStore": {}})),
        ),
        ("template", {
            let mut s = spec(&profile, "password", Some(&b_db), json!({"fromStore": {}}));
            s["target"] =
                json!({"template": {"data": {"dsn": "postgres://app:{{ .password }}@db"}}});
            s
        }),
        (
            "ca-ref",
            spec(
                &profile,
                "certificate",
                Some(&format!("{b}/ca")),
                json!({"fromStore": {}}),
            ),
        ),
    ];
    for (name, spec) in &attacks {
        apply_as(&a_dev, &managed(&fx, &a, name, spec.clone()));
    }
    let mut rotate = managed(&fx, &a, "rotate", attacks[3].1.clone());
    rotate["metadata"]["annotations"] = json!({"keyhaven.io/rotate": "now"});
    apply_as(&a_dev, &rotate);
    for (name, _) in &attacks[..attacks.len() - 1] {
        refused(&fx, name, "PathNotInNamespace", &b_db).await;
    }
    refused(&fx, "ca-ref", "PathNotInNamespace", &format!("{b}/ca")).await;
    // Issuing from B's CA: the issuer (A's ca-ref) points outside A's space.
    let leaf = spec(
        &profile,
        "certificate",
        None,
        json!({"generate": {"commonName": "a-leaf", "issuerRef": {"name": "ca-ref"}}}),
    );
    apply_as(&a_dev, &managed(&fx, &a, "leaf", leaf));
    refused(&fx, "leaf", "PathNotInNamespace", &format!("{b}/ca")).await;
    let intermediate = spec(
        &profile,
        "certificate",
        None,
        json!({"generate": {"isCA": true, "issuerRef": {"name": "ca-ref"}}}),
    );
    apply_as(&a_dev, &managed(&fx, &a, "intermediate", intermediate));
    fx.wait_not_ready("intermediate", "IntermediateCANotAllowed")
        .await;
    // A kubernetes store over B's namespace: A may not keep versions there (B could read
    // and plant them). In a namespace set aside for stores it touches only Secrets with its
    // labels: a Secret at the name A's path maps to is neither read nor written.
    let kb = fx
        .store("kb", json!({"kubernetes": {"namespace": b}}))
        .await;
    let kprof = fx.profile("kprof", &kb, &[]).await;
    let a_db = format!("{a}/db");
    let b_plain = format!("{a}.db");
    for (name, content) in [
        ("k-read", json!({"fromStore": {}})),
        ("k-write", json!({"fromSecret": {"name": "mine"}})),
    ] {
        let k = spec(&kprof, "password", Some(&a_db), content);
        apply_as(&a_dev, &managed(&fx, &a, name, k));
        refused(
            &fx,
            name,
            "StoreNamespaceNotAllowed",
            &format!("namespace {b}"),
        )
        .await;
    }
    let in_b = fx
        .ns_api::<Secret>(&b)
        .list(&Default::default())
        .await
        .unwrap();
    assert!(
        !in_b
            .items
            .iter()
            .any(|s| s.name_any().starts_with(&b_plain)),
        "A's versions were written into B's namespace"
    );
    let aside = fx.store_namespace("kx").await;
    let kx = fx
        .store("kx", json!({"kubernetes": {"namespace": aside}}))
        .await;
    let kxprof = fx.profile("kxprof", &kx, &[]).await;
    fx.secret(&aside, &b_plain, &[("password", "b-plain-e2e-tenancy")])
        .await;
    let k_read = spec(&kxprof, "password", Some(&a_db), json!({"fromStore": {}}));
    apply_as(&a_dev, &managed(&fx, &a, "kx-read", k_read));
    fx.wait_not_ready("kx-read", "NotFoundInStore").await;
    let k_write = spec(
        &kxprof,
        "password",
        Some(&a_db),
        json!({"fromSecret": {"name": "mine"}}),
    );
    apply_as(&a_dev, &managed(&fx, &a, "kx-write", k_write));
    refused(&fx, "kx-write", "PathOwnedElsewhere", &a_db).await;
    assert_eq!(
        fx.secret_data(&aside, &b_plain).await.unwrap()["password"],
        "b-plain-e2e-tenancy"
    );
    let kop = fx
        .store("kop", json!({"kubernetes": {"namespace": op_ns}}))
        .await;
    fx.wait_store(&kop, "Invalid", Duration::from_secs(30), |s| {
        s.phase.is_some_and(|p| p == "Invalid")
    })
    .await;
    // Kubernetes RBAC keeps A's developer away from B's objects and Secrets.
    for args in [
        vec!["delete", "managedsecret", "db", "-n", &b],
        vec!["get", "secret", "db", "-n", &b],
        vec![
            "patch",
            "managedsecret",
            "db",
            "-n",
            &b,
            "--type=merge",
            "-p",
            r#"{"spec":{"rollbackTo":1}}"#,
        ],
    ] {
        let (ok, out) = kubectl_as(&a_dev, &args, None);
        assert!(!ok && out.contains("forbidden"), "{args:?}: {out}");
    }
    // The viewer sees ManagedSecrets and their history, never a Secret.
    let (ok, out) = kubectl_as(&a_viewer, &["get", "managedsecrets", "-n", &a], None);
    assert!(ok, "{out}");
    let (ok, out) = kubectl_as(&a_viewer, &["get", "secret", "mine", "-n", &a], None);
    assert!(!ok && out.contains("forbidden"), "{out}");

    // One path, one writer: a second ManagedSecret of A on A's path is refused while the
    // first exists, and takes over once it is gone.
    let own = format!("{a}/app/db");
    let first = spec(
        &profile,
        "password",
        Some(&own),
        json!({"fromSecret": {"name": "mine"}}),
    );
    apply_as(&a_dev, &managed(&fx, &a, "first", first));
    fx.wait_synced("first", 1).await;
    apply_as(
        &a_dev,
        &secret(&a, "other", "password", "a-second-e2e-tenancy"),
    );
    let second = spec(
        &profile,
        "password",
        Some(&own),
        json!({"fromSecret": {"name": "other"}}),
    );
    apply_as(&a_dev, &managed(&fx, &a, "second", second));
    refused(&fx, "second", "PathOwnedElsewhere", &own).await;
    assert_eq!(
        held(&root, &own).await.0["password"],
        "a-chosen-e2e-tenancy"
    );
    // A reader of the owned path takes no ownership and writes nothing.
    let reader = spec(&profile, "password", Some(&own), json!({"fromStore": {}}));
    apply_as(&a_dev, &managed(&fx, &a, "own-reader", reader));
    fx.wait_synced("own-reader", 1).await;
    let (ok, out) = kubectl_as(
        &a_dev,
        &["delete", "managedsecret", "first", "-n", &a],
        None,
    );
    assert!(ok, "{out}");
    fx.poke_managed("second").await;
    fx.wait_synced("second", 2).await;
    assert_eq!(
        held(&root, &own).await.0["password"],
        "a-second-e2e-tenancy"
    );

    // One value in two namespaces: unrelated fingerprints.
    apply_as(
        &a_dev,
        &secret(&a, "same-src", "password", "same-value-e2e-tenancy"),
    );
    let same = spec(
        &profile,
        "password",
        None,
        json!({"fromSecret": {"name": "same-src"}}),
    );
    apply_as(&a_dev, &managed(&fx, &a, "same", same));
    let fingerprint = |ms: ManagedSecret| ms.status.unwrap().versions[0].fingerprint.clone();
    let in_a = fingerprint(fx.wait_synced("same", 1).await);
    let in_b = fingerprint(fx.ns_api::<ManagedSecret>(&b).get("same").await.unwrap());
    assert!(in_a.starts_with("hmac-sha256-ns:"), "{in_a}");
    assert_ne!(
        in_a, in_b,
        "fingerprints of one value differ across namespaces"
    );

    // The path B shares with A: A's reader syncs it and writes nothing; A's push is refused.
    let shared = format!("{b}/shared/flags");
    let flags_version = held(&root, &shared).await.1;
    let reader = spec(
        &sharing,
        "password",
        Some(&shared),
        json!({"fromStore": {}}),
    );
    apply_as(&a_dev, &managed(&fx, &a, "reader", reader));
    // (Numbered in A's own history: B's stamp, fingerprinted under B's key, says nothing
    // to A, so A records the next number after it.)
    fx.wait_managed("reader", "Synced", |ms| {
        ms.status
            .as_ref()
            .is_some_and(|s| s.phase.is_some_and(|p| p == "Synced"))
    })
    .await;
    assert_eq!(
        fx.secret_data(&a, "reader").await.unwrap()["password"],
        "shared-e2e-tenancy"
    );
    let pusher = spec(
        &sharing,
        "password",
        Some(&shared),
        json!({"fromSecret": {"name": "mine"}}),
    );
    apply_as(&a_dev, &managed(&fx, &a, "pusher", pusher));
    refused(&fx, "pusher", "PathReadOnly", &shared).await;
    assert_eq!(
        held(&root, &shared).await.1,
        flags_version,
        "nothing written there"
    );

    // B is untouched: history, native Secret, stored value, byte for byte.
    let mut after = Vec::new();
    for name in ["db", "ca", "same", "flags"] {
        after.push(snapshot(&fx, &root, &b, name).await);
    }
    assert_eq!(before, after, "B's secrets changed");
    let log = op.log_text();
    assert!(!log.is_empty());
    for v in [
        b_value.as_str(),
        "same-value-e2e-tenancy",
        "a-chosen-e2e-tenancy",
    ] {
        assert!(
            !log.contains(v),
            "a value in the operator's log {}",
            op.log.display()
        );
    }
    for p in [
        b_db,
        format!("{b}/ca"),
        format!("{b}/same"),
        shared,
        own,
        format!("{a}/same"),
    ] {
        let _ = kv2::delete_metadata(&root, "secret", &p).await;
    }
}

#[tokio::test]
async fn a_profile_maps_the_space_elsewhere_or_says_isolation_is_off() {
    let bed = Testbed::load();
    let fx = Fixture::new("spaces").await;
    fx.namespace("op").await;
    fx.secret(&fx.ns, "mine", &[("password", "a-chosen-e2e-spaces")])
        .await;
    // A profile maps the space elsewhere (a store of its own: OpenBao's KV v1 mount).
    let kv1 = openbao(&fx, &bed, "kv1", "kv", "v1").await;
    let mapped = fx
        .profile_spec(
            "mapped",
            json!({"source": kv1, "secretSpace": {"prefix": "apps/{namespace}/"}}),
        )
        .await;
    let push = json!({"fromSecret": {"name": "mine"}});
    let apps = format!("apps/{}/db", fx.ns);
    fx.managed_secret(
        "mapped",
        spec(&mapped, "password", Some(&apps), push.clone()),
    )
    .await;
    fx.wait_synced("mapped", 1).await;
    let unmapped = format!("{}/db", fx.ns);
    fx.managed_secret("unmapped", spec(&mapped, "password", Some(&unmapped), push))
        .await;
    fx.wait_not_ready("unmapped", "PathNotInNamespace").await;
    // A profile without isolation says so (on a store of its own).
    let scratch = fx.store_namespace("scratch").await;
    let alone = fx
        .store("alone", json!({"kubernetes": {"namespace": scratch}}))
        .await;
    let open = fx
        .profile_spec(
            "open",
            json!({"source": alone, "secretSpace": {"isolation": "Disabled"}}),
        )
        .await;
    let condition = |name: String, type_: &'static str, status: &'static str| {
        let fx = &fx;
        async move { fx.wait_profile_condition(&name, type_, status).await.0 }
    };
    assert_eq!(
        condition(open, "Isolated", "False").await.reason,
        "IsolationDisabled"
    );
    assert_eq!(
        condition(mapped.clone(), "Isolated", "True").await.reason,
        "IsolationEnforced"
    );
    // Another space template over the same mount (another SecretStore object) could overlap
    // the mapped space: both profiles say so and their secrets are refused.
    let kv1_again = openbao(&fx, &bed, "kv1-again", "kv", "v1").await;
    fx.profile_spec(
        "nested",
        json!({"source": kv1_again, "secretSpace": {"prefix": "apps/teams/{namespace}/"}}),
    )
    .await;
    let c = condition(mapped.clone(), "Conflict", "True").await;
    assert_eq!(c.reason, "SecretSpaceConflict", "{}", c.message);
    fx.poke_managed("mapped").await;
    fx.wait_not_ready("mapped", "SecretSpaceConflict").await;
}
