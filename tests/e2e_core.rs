//! End-to-end tests of the operator core on the test bed: the real kube-apiserver and
//! kube-controller-manager, the operator as a real process. No mocks.

mod e2e;

use e2e::fixture::{Fixture, versions, wait_until};
use e2e::operator::Work;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use keyhaven::api::{ManagedSecret, SecretStore, StorePhase, VaultProfile};
use keyhaven::backend::{Backend, KubernetesStore};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn schema_and_cel_reject_bad_specs() {
    let fx = Fixture::new("schema").await;
    let stores: Api<SecretStore> = fx.cluster_api();
    let create_store = |provider: serde_json::Value| {
        let stores = stores.clone();
        let name = fx.scoped("bad");
        async move {
            let obj: SecretStore = serde_json::from_value(json!({
                "apiVersion": "keyhaven.io/v1alpha1", "kind": "SecretStore",
                "metadata": {"name": name}, "spec": {"provider": provider}}))
            .unwrap();
            stores.create(&PostParams::default(), &obj).await
        }
    };
    let two = create_store(json!({"internal": {}, "kubernetes": {"namespace": "x"}}))
        .await
        .unwrap_err()
        .to_string();
    assert!(two.contains("exactly one provider must be set"), "{two}");
    let none = create_store(json!({})).await.unwrap_err().to_string();
    assert!(none.contains("exactly one provider must be set"), "{none}");
    let bad_ns = create_store(json!({"kubernetes": {"namespace": "Not_A_Namespace"}}))
        .await
        .unwrap_err()
        .to_string();
    assert!(bad_ns.contains("must be a namespace name"), "{bad_ns}");

    let profiles: Api<VaultProfile> = fx.cluster_api();
    let p: VaultProfile = serde_json::from_value(json!({
        "apiVersion": "keyhaven.io/v1alpha1", "kind": "VaultProfile", "metadata": {"name": fx.scoped("p")},
        "spec": {"source": "a", "syncTargets": ["b", "a"]}})).unwrap();
    let err = profiles
        .create(&PostParams::default(), &p)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the source store cannot also be a sync target"),
        "{err}"
    );

    let managed: Api<ManagedSecret> = fx.ns_api(&fx.ns);
    let create_ms = |spec: serde_json::Value| {
        let managed = managed.clone();
        async move {
            let obj: ManagedSecret = serde_json::from_value(json!({
                "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
                "metadata": {"name": "bad"}, "spec": spec}))
            .unwrap_or_else(|e| panic!("{e}"));
            managed.create(&PostParams::default(), &obj).await
        }
    };
    let both = create_ms(json!({"profile": "p", "type": "generic", "content": {"fromStore": {}, "fromSecret": {"name": "s"}}}))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        both.contains("exactly one content source must be set"),
        "{both}"
    );
    let dur = create_ms(json!({"profile": "p", "type": "generic", "content": {"fromStore": {}}, "refreshInterval": "10 minutes"}))
        .await
        .unwrap_err()
        .to_string();
    assert!(dur.contains("refreshInterval"), "{dur}");
    let path = create_ms(
        json!({"profile": "p", "type": "generic", "content": {"fromStore": {}}, "path": "../etc"}),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(path.contains("path is slash-separated"), "{path}");
    // An unknown type is refused by the schema's enum (sent raw: the Rust type cannot hold it).
    let raw = json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret", "metadata": {"name": "bad-type", "namespace": fx.ns},
        "spec": {"profile": "p", "type": "nonsense", "content": {"fromStore": {}}}});
    let err = fx
        .ns_api::<ManagedSecret>(&fx.ns)
        .patch(
            "bad-type",
            &PatchParams::apply("e2e-test"),
            &Patch::Apply(&raw),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("Unsupported value: \"nonsense\""), "{err}");
    // A valid spec is accepted, and `path` is immutable once set.
    create_ms(
        json!({"profile": "p", "type": "generic", "content": {"fromStore": {}}, "path": "a/b"}),
    )
    .await
    .unwrap();
    let moved = fx
        .ns_api::<ManagedSecret>(&fx.ns)
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"path": "a/c"}})),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(moved.contains("path is immutable"), "{moved}");
}

#[tokio::test]
async fn from_store_syncs_every_target_and_follows_source_updates() {
    let fx = Fixture::new("fromstore").await;
    // The path lies in the namespace's secret space; the kubernetes store names it so.
    let db = format!("{}/app/db", fx.ns);
    let db_name = db.replace('/', ".");
    let src_ns = fx.store_namespace("src").await;
    let mirror_ns = fx.store_namespace("mirror").await;
    let source = fx
        .store("src", json!({"kubernetes": {"namespace": src_ns}}))
        .await;
    let mirror = fx
        .store("mirror", json!({"kubernetes": {"namespace": mirror_ns}}))
        .await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &source, &[&internal, &mirror]).await;
    let (user, pass1, pass2) = (
        "app-user",
        "first-Pa55word-e2e-fromstore",
        "second-Pa55word-e2e-fromstore",
    );
    fx.store_secret(
        &source,
        &src_ns,
        &db_name,
        &[("username", user), ("password", pass1)],
    )
    .await;

    fx.managed_secret(
        "db",
        json!({"profile": profile, "type": "key-value", "path": db,
        "content": {"fromStore": {}}, "refreshInterval": "1s"}),
    )
    .await;
    let ms = fx.wait_synced("db", 1).await;
    let status = ms.status.clone().unwrap();
    assert_eq!(versions(&ms), vec![1]);
    assert_eq!(status.versions[0].store, source);
    assert!(
        status.versions[0]
            .fingerprint
            .starts_with("hmac-sha256-ns:")
    );
    assert_eq!(status.targets.len(), 3);
    assert!(
        status
            .targets
            .iter()
            .all(|t| t.state == "Synced" && t.version == Some(1)),
        "{:?}",
        status.targets
    );
    let native = fx.secret_data(&fx.ns, "db").await.expect("native Secret");
    assert_eq!(native.get("password").map(String::as_str), Some(pass1));
    assert_eq!(native.get("username").map(String::as_str), Some(user));

    // Every sync target holds version 1: the mirror as plain Secrets, the internal store sealed.
    let internal_backend = fx.internal_store(&internal).await;
    let v1 = internal_backend
        .read(&db, None)
        .await
        .unwrap()
        .expect("internal store holds the path");
    assert_eq!(v1.stamp.as_ref().map(|s| s.version), Some(1));
    assert_eq!(v1.data.get("password"), Some(pass1.as_bytes()));
    let mirror_backend = KubernetesStore::new(&mirror, fx.client.clone(), &mirror_ns);
    assert_eq!(
        mirror_backend
            .read(&db, None)
            .await
            .unwrap()
            .unwrap()
            .data
            .get("password"),
        Some(pass1.as_bytes())
    );
    assert_eq!(mirror_backend.list_versions(&db).await.unwrap(), vec![1]);

    // A source update becomes version 2 everywhere; version 1 stays readable.
    fx.store_secret(
        &source,
        &src_ns,
        &db_name,
        &[("username", user), ("password", pass2)],
    )
    .await;
    let ms = fx.wait_synced("db", 2).await;
    assert_eq!(versions(&ms), vec![1, 2]);
    let st = ms.status.clone().unwrap();
    assert_ne!(st.versions[0].fingerprint, st.versions[1].fingerprint);
    assert_eq!(
        fx.secret_data(&fx.ns, "db")
            .await
            .unwrap()
            .get("password")
            .map(String::as_str),
        Some(pass2)
    );
    assert_eq!(
        internal_backend
            .read(&db, None)
            .await
            .unwrap()
            .unwrap()
            .data
            .get("password"),
        Some(pass2.as_bytes())
    );
    assert_eq!(
        internal_backend
            .read(&db, Some(1))
            .await
            .unwrap()
            .unwrap()
            .data
            .get("password"),
        Some(pass1.as_bytes())
    );
    assert_eq!(
        internal_backend.list_versions(&db).await.unwrap(),
        vec![1, 2]
    );
    assert_eq!(mirror_backend.list_versions(&db).await.unwrap(), vec![1, 2]);
    assert_eq!(
        mirror_backend
            .read(&db, Some(1))
            .await
            .unwrap()
            .unwrap()
            .data
            .get("password"),
        Some(pass1.as_bytes())
    );

    // A target edited by hand is repaired, and an Event says so.
    let mirror_secrets: Api<Secret> = fx.ns_api(&mirror_ns);
    mirror_secrets
        .patch(
            &db_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"password": "tampered-by-hand"}})),
        )
        .await
        .unwrap();
    let repaired = wait_until(Duration::from_secs(30), || async {
        let d = mirror_backend.read(&db, None).await.ok()??;
        (d.data.get("password") == Some(pass2.as_bytes())).then_some(())
    })
    .await;
    assert!(repaired.is_some(), "the drifted mirror was not repaired");
    fx.wait_event("DriftRepaired", &mirror).await;
    assert_eq!(
        versions(&fx.wait_synced("db", 2).await),
        vec![1, 2],
        "a repair makes no new version"
    );

    // An unchanged source makes no write anywhere across several refreshes: refreshes that
    // ran (three or more, each reading the source and both targets, counted on /metrics).
    let rv = |s: Option<Secret>| s.and_then(|s| s.metadata.resource_version);
    let window = fx.op.metrics().await;
    let before = (
        rv(fx.ns_api::<Secret>(&fx.ns).get_opt("db").await.unwrap()),
        fx.ns_api::<ManagedSecret>(&fx.ns)
            .get("db")
            .await
            .unwrap()
            .resource_version(),
        rv(mirror_secrets.get_opt(&db_name).await.unwrap()),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    fx.op
        .wait_work(
            &window,
            &[
                (Work::reconciles("ManagedSecret"), 3),
                (Work::store_reads(&source), 3),
                (Work::store_reads(&internal), 3),
                (Work::store_reads(&mirror), 3),
            ],
            Duration::from_secs(30),
        )
        .await;
    let after = (
        rv(fx.ns_api::<Secret>(&fx.ns).get_opt("db").await.unwrap()),
        fx.ns_api::<ManagedSecret>(&fx.ns)
            .get("db")
            .await
            .unwrap()
            .resource_version(),
        rv(mirror_secrets.get_opt(&db_name).await.unwrap()),
    );
    assert_eq!(before, after, "an unchanged resync wrote to the API server");

    // The stores report their health and what they hold.
    let stores: Api<SecretStore> = fx.cluster_api();
    let counted = wait_until(Duration::from_secs(90), || async {
        let s = stores.get(&internal).await.ok()?.status?;
        (s.phase == Some(StorePhase::Active) && s.secrets == Some(1)).then_some(())
    })
    .await;
    assert!(
        counted.is_some(),
        "internal store status: {:?}",
        stores.get(&internal).await.unwrap().status
    );
    let profile_status = wait_until(Duration::from_secs(30), || async {
        let p = fx
            .cluster_api::<VaultProfile>()
            .get(&profile)
            .await
            .ok()?
            .status?;
        (p.phase.is_some_and(|p| p == "Ready")).then_some(p)
    })
    .await;
    assert!(profile_status.is_some(), "profile never Ready");

    fx.assert_values_never_leaked(&[pass1, pass2, "tampered-by-hand"])
        .await;
}

#[tokio::test]
async fn from_secret_types_render_and_bad_content_is_refused() {
    let fx = Fixture::new("types").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &internal, &[]).await;
    let secret_pass = "basic-auth-Pa55-e2e-types";
    fx.secret(
        &fx.ns,
        "login",
        &[("username", "svc"), ("password", secret_pass)],
    )
    .await;
    fx.secret(&fx.ns, "pw", &[("password", "only-a-password-e2e-types")])
        .await;
    fx.secret(
        &fx.ns,
        "key",
        &[
            ("api-key", "ak_live_e2e_types_123"),
            ("expires-at", "2031-05-01T00:00:00Z"),
        ],
    )
    .await;
    fx.secret(
        &fx.ns,
        "blob",
        &[
            ("config.json", "{\"a\": 1}"),
            ("cert", "opaque-bytes-e2e-types"),
        ],
    )
    .await;
    fx.secret(
        &fx.ns,
        "bad-login",
        &[("username", "svc"), ("pass", "wrong-key-name-e2e-types")],
    )
    .await;
    fx.secret(
        &fx.ns,
        "bad-key",
        &[
            ("api-key", "ak_e2e_types_bad"),
            ("expires-at", "next tuesday"),
        ],
    )
    .await;
    let spec = |ty: &str, from: &str| json!({"profile": profile, "type": ty, "content": {"fromSecret": {"name": from}}});
    fx.managed_secret("basic", spec("basic-auth", "login"))
        .await;
    fx.managed_secret("password", spec("password", "pw")).await;
    fx.managed_secret("apikey", spec("api-key", "key")).await;
    fx.managed_secret("generic", spec("generic", "blob")).await;
    fx.managed_secret("kv", spec("key-value", "blob")).await;
    fx.managed_secret("bad-basic", spec("basic-auth", "bad-login"))
        .await;
    fx.managed_secret("bad-apikey", spec("api-key", "bad-key"))
        .await;
    fx.managed_secret("missing", spec("generic", "does-not-exist"))
        .await;

    let secrets: Api<Secret> = fx.ns_api(&fx.ns);
    for (name, type_, keys) in [
        (
            "basic",
            "kubernetes.io/basic-auth",
            vec!["password", "username"],
        ),
        ("password", "Opaque", vec!["password"]),
        ("apikey", "Opaque", vec!["api-key", "expires-at"]),
        ("generic", "Opaque", vec!["cert", "config.json"]),
        ("kv", "Opaque", vec!["cert", "config.json"]),
    ] {
        fx.wait_synced(name, 1).await;
        let s = secrets.get(name).await.unwrap();
        assert_eq!(s.type_.as_deref(), Some(type_), "{name}");
        assert_eq!(
            s.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
            keys,
            "{name}"
        );
        assert_eq!(
            s.labels().get("keyhaven.io/managed").map(String::as_str),
            Some("true")
        );
    }
    assert_eq!(
        fx.secret_data(&fx.ns, "basic").await.unwrap()["password"],
        secret_pass
    );

    // Bad content: a clear condition and Event; nothing stored, no native Secret.
    let bad = fx.wait_not_ready("bad-basic", "InvalidContent").await;
    let message = &bad
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message;
    assert!(message.contains("needs key \"password\""), "{message}");
    let bad_key = fx.wait_not_ready("bad-apikey", "InvalidContent").await;
    assert!(format!("{:?}", bad_key.status).contains("RFC 3339"));
    fx.wait_not_ready("missing", "SourceSecretNotFound").await;
    fx.wait_event("InvalidContent", "needs key \"password\"")
        .await;
    assert!(secrets.get_opt("bad-basic").await.unwrap().is_none());
    let store = fx.internal_store(&internal).await;
    assert!(
        store
            .list_versions(&format!("{}/bad-basic", fx.ns))
            .await
            .unwrap()
            .is_empty(),
        "invalid content was stored"
    );

    // Fixing the source Secret heals it.
    fx.secret(
        &fx.ns,
        "bad-login",
        &[("username", "svc"), ("password", "fixed-Pa55-e2e-types")],
    )
    .await;
    fx.ns_api::<ManagedSecret>(&fx.ns)
        .patch(
            "bad-basic",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"refreshInterval": "1s"}})),
        )
        .await
        .unwrap();
    fx.wait_synced("bad-basic", 1).await;

    fx.assert_values_never_leaked(&[
        secret_pass,
        "only-a-password-e2e-types",
        "ak_live_e2e_types_123",
        "opaque-bytes-e2e-types",
        "wrong-key-name-e2e-types",
        "ak_e2e_types_bad",
        "fixed-Pa55-e2e-types",
    ])
    .await;
}

#[tokio::test]
async fn a_pushed_secret_change_is_a_new_version_in_every_store_at_once() {
    let fx = Fixture::new("pushed").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let target = fx.store("target", json!({"internal": {}})).await;
    let profile = fx.profile("p", &internal, &[&target]).await;
    fx.secret(&fx.ns, "src", &[("token", "pushed-e2e-value-0")])
        .await;
    // Another tenant's Secret of the same name: its changes are not this secret's.
    let other = fx.namespace("other").await;
    fx.secret(&other, "src", &[("token", "other-tenant-e2e-value-0")])
        .await;
    // The default refresh (an hour): only the watch of the pushed Secret brings a change.
    fx.managed_secret(
        "pushed",
        json!({"profile": profile, "type": "generic", "content": {"fromSecret": {"name": "src"}}}),
    )
    .await;
    fx.wait_synced("pushed", 1).await;
    let sources: Api<Secret> = fx.ns_api(&fx.ns);
    for n in 1..=3u64 {
        let value = format!("pushed-e2e-value-{n}");
        fx.register(&value);
        let patch = json!({"stringData": {"token": value}});
        let changed = std::time::Instant::now();
        sources
            .patch("src", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        let ms = fx.wait_synced("pushed", n + 1).await;
        let took = changed.elapsed();
        assert!(took < Duration::from_secs(10), "change {n} took {took:?}");
        let targets = &ms.status.as_ref().unwrap().targets;
        assert_eq!(targets.len(), 2, "{targets:?}");
        assert!(
            targets.iter().all(|t| t.version == Some(n + 1)),
            "every store holds version {}: {targets:?}",
            n + 1
        );
        let native = fx.secret_data(&fx.ns, "pushed").await.unwrap();
        assert_eq!(native.get("token"), Some(&value));
    }
    // The other tenant's Secret changes: nothing here does.
    fx.register("other-tenant-e2e-value-1");
    fx.ns_api::<Secret>(&other)
        .patch(
            "src",
            &PatchParams::default(),
            &Patch::Merge(&json!({"stringData": {"token": "other-tenant-e2e-value-1"}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ms = fx.wait_synced("pushed", 4).await;
    assert_eq!(versions(&ms), [1, 2, 3, 4]);
    let native = fx.secret_data(&fx.ns, "pushed").await.unwrap();
    assert_eq!(
        native.get("token").map(String::as_str),
        Some("pushed-e2e-value-3")
    );
}

#[tokio::test]
async fn deletion_policies_and_garbage_collection() {
    let fx = Fixture::new("deletion").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &internal, &[]).await;
    fx.secret(&fx.ns, "value", &[("token", "t0ken-e2e-deletion")])
        .await;
    fx.secret(&fx.ns, "merge-target", &[("keep", "owned-by-someone-else")])
        .await;
    let spec = |creation: &str, deletion: &str, target: &str| {
        json!({"profile": profile, "type": "generic", "content": {"fromSecret": {"name": "value"}},
               "target": {"name": target, "creationPolicy": creation, "deletionPolicy": deletion}})
    };
    fx.managed_secret("owner-delete", spec("Owner", "Delete", "owner-delete"))
        .await;
    fx.managed_secret("owner-retain", spec("Owner", "Retain", "owner-retain"))
        .await;
    fx.managed_secret("orphan-delete", spec("Orphan", "Delete", "orphan-delete"))
        .await;
    fx.managed_secret("merge-delete", spec("Merge", "Delete", "merge-target"))
        .await;
    for name in [
        "owner-delete",
        "owner-retain",
        "orphan-delete",
        "merge-delete",
    ] {
        fx.wait_synced(name, 1).await;
    }
    let secrets: Api<Secret> = fx.ns_api(&fx.ns);
    let owned = secrets.get("owner-delete").await.unwrap();
    assert_eq!(owned.owner_references().len(), 1);
    assert_eq!(owned.owner_references()[0].controller, Some(true));
    assert!(
        secrets
            .get("orphan-delete")
            .await
            .unwrap()
            .owner_references()
            .is_empty()
    );
    let merged = fx.secret_data(&fx.ns, "merge-target").await.unwrap();
    assert_eq!(merged.keys().collect::<Vec<_>>(), vec!["keep", "token"]);

    let managed: Api<ManagedSecret> = fx.ns_api(&fx.ns);
    for name in [
        "owner-delete",
        "owner-retain",
        "orphan-delete",
        "merge-delete",
    ] {
        managed
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    // Every ManagedSecret goes once its finalizer ran.
    let gone = wait_until(Duration::from_secs(60), || async {
        managed
            .list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "ManagedSecrets still present: finalizer stuck"
    );
    // Owner + Delete: kube-controller-manager's garbage collector deletes the Secret.
    let collected = wait_until(Duration::from_secs(90), || async {
        secrets
            .get_opt("owner-delete")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        collected.is_some(),
        "the owned Secret was not garbage-collected"
    );
    // Orphan + Delete: the finalizer deleted it.
    assert!(secrets.get_opt("orphan-delete").await.unwrap().is_none());
    // Owner + Retain: it stays, ownerless, with its data (give the GC time to act wrongly).
    // The GC did act on this batch's deletion: it collected owner-delete's Secret above.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let retained = secrets
        .get("owner-retain")
        .await
        .expect("retained Secret exists");
    assert!(retained.owner_references().is_empty());
    assert_eq!(
        fx.secret_data(&fx.ns, "owner-retain").await.unwrap()["token"],
        "t0ken-e2e-deletion"
    );
    // Merge + Delete: keyhaven's key is gone, the owner's key stays.
    let merged = fx.secret_data(&fx.ns, "merge-target").await.unwrap();
    assert_eq!(merged.keys().collect::<Vec<_>>(), vec!["keep"]);
    fx.assert_values_never_leaked(&["t0ken-e2e-deletion", "owned-by-someone-else"])
        .await;
}

#[tokio::test]
async fn a_failing_store_never_blanks_the_native_secret() {
    let fx = Fixture::new("failing").await;
    let api = format!("{}/app/api", fx.ns);
    let src_ns = fx.store_namespace("src").await;
    let source = fx
        .store("src", json!({"kubernetes": {"namespace": src_ns}}))
        .await;
    let profile = fx.profile("p", &source, &[]).await;
    fx.store_secret(
        &source,
        &src_ns,
        &api.replace('/', "."),
        &[("api-key", "precious-value-e2e-failing")],
    )
    .await;
    fx.managed_secret(
        "api",
        json!({"profile": profile, "type": "api-key", "path": api,
        "content": {"fromStore": {}}, "refreshInterval": "1s"}),
    )
    .await;
    fx.wait_synced("api", 1).await;
    let intact = || async {
        fx.secret_data(&fx.ns, "api")
            .await
            .and_then(|d| d.get("api-key").cloned())
    };

    // The value disappears from the store: an error condition, the native Secret untouched.
    fx.ns_api::<Secret>(&src_ns)
        .delete(&api.replace('/', "."), &DeleteParams::default())
        .await
        .unwrap();
    fx.wait_not_ready("api", "NotFoundInStore").await;
    fx.wait_event("NotFoundInStore", &api).await;
    assert_eq!(
        intact().await.as_deref(),
        Some("precious-value-e2e-failing")
    );

    // The whole store breaks (its namespace is deleted): store Invalid, profile NotReady,
    // native Secret still intact.
    fx.store_secret(
        &source,
        &src_ns,
        &api.replace('/', "."),
        &[("api-key", "precious-value-e2e-failing")],
    )
    .await;
    fx.wait_synced("api", 1).await;
    fx.cluster_api::<k8s_openapi::api::core::v1::Namespace>()
        .delete(&src_ns, &DeleteParams::default())
        .await
        .unwrap();
    let invalid = wait_until(Duration::from_secs(90), || async {
        let s = fx
            .cluster_api::<SecretStore>()
            .get(&source)
            .await
            .ok()?
            .status?;
        (s.phase == Some(StorePhase::Invalid)).then_some(s)
    })
    .await;
    assert!(invalid.is_some(), "the store never turned Invalid");
    let not_ready = wait_until(Duration::from_secs(30), || async {
        let p = fx
            .cluster_api::<VaultProfile>()
            .get(&profile)
            .await
            .ok()?
            .status?;
        (p.phase.is_some_and(|p| p == "NotReady")).then_some(p)
    })
    .await;
    assert!(not_ready.unwrap().message.unwrap().contains("Invalid"));
    // Failing, the ManagedSecret retries in 30 s: two reconciles made now, each reading
    // the broken store, are the ones that could have blanked the native Secret.
    tokio::time::sleep(Duration::from_secs(3)).await;
    fx.reconcile_managed("api", 2, &[Work::store_reads(&source)])
        .await;
    assert_eq!(
        intact().await.as_deref(),
        Some("precious-value-e2e-failing")
    );
    let ms = fx.ns_api::<ManagedSecret>(&fx.ns).get("api").await.unwrap();
    assert_eq!(
        ms.status.unwrap().current_version,
        Some(1),
        "history kept through the failure"
    );
    fx.assert_values_never_leaked(&["precious-value-e2e-failing"])
        .await;
}

#[tokio::test]
async fn operator_killed_mid_way_creates_no_duplicate_version() {
    let mut fx = Fixture::new("restart").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let mirror_ns = fx.store_namespace("mirror").await;
    let mirror = fx
        .store("mirror", json!({"kubernetes": {"namespace": mirror_ns}}))
        .await;
    let profile = fx.profile("p", &internal, &[&mirror]).await;
    const N: usize = 30;
    for i in 0..N {
        fx.secret(
            &fx.ns,
            &format!("src-{i}"),
            &[("value", &format!("first-{i}-e2e-restart"))],
        )
        .await;
    }
    // All at once (16 in flight), so that the operator has a batch to work through.
    futures::stream::iter(0..N)
        .for_each_concurrent(16, |i| {
            let (fx, profile) = (&fx, &profile);
            async move {
                fx.managed_secret(
                    &format!("ms-{i}"),
                    json!({"profile": profile, "type": "generic",
                    "content": {"fromSecret": {"name": format!("src-{i}")}}, "refreshInterval": "2s"}),
                )
                .await;
            }
        })
        .await;
    // SIGKILL the operator twice while it works through them: each time once some, not
    // all, are synced (by this process, for the second).
    let first = kill_mid_batch(&mut fx, N, 1, 0).await;
    kill_mid_batch(&mut fx, N, 1, first).await;
    for i in 0..N {
        assert_eq!(
            versions(&fx.wait_synced(&format!("ms-{i}"), 1).await),
            vec![1],
            "ms-{i}"
        );
    }
    // Change every value, and kill it again mid-way.
    for i in 0..N {
        fx.secret(
            &fx.ns,
            &format!("src-{i}"),
            &[("value", &format!("second-{i}-e2e-restart"))],
        )
        .await;
    }
    kill_mid_batch(&mut fx, N, 2, 0).await;
    let internal_backend = fx.internal_store(&internal).await;
    let mirror_backend = KubernetesStore::new(&mirror, fx.client.clone(), &mirror_ns);
    for i in 0..N {
        let ms = fx.wait_synced(&format!("ms-{i}"), 2).await;
        assert_eq!(versions(&ms), vec![1, 2], "ms-{i}");
        let path = format!("{}/ms-{i}", fx.ns);
        assert_eq!(
            internal_backend.list_versions(&path).await.unwrap(),
            vec![1, 2],
            "{path} in the internal store"
        );
        assert_eq!(
            mirror_backend.list_versions(&path).await.unwrap(),
            vec![1, 2],
            "{path} in the mirror"
        );
        let second = format!("second-{i}-e2e-restart");
        assert_eq!(
            fx.secret_data(&fx.ns, &format!("ms-{i}")).await.unwrap()["value"],
            second
        );
    }
}

/// How many of the ManagedSecrets are Synced at `version`.
async fn synced_at(fx: &Fixture, version: u64) -> usize {
    fx.ns_api::<ManagedSecret>(&fx.ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|m| {
            m.status.as_ref().is_some_and(|s| {
                s.phase.is_some_and(|p| p == "Synced") && s.current_version == Some(version)
            })
        })
        .count()
}

/// Waits until more than `already` of the `n` ManagedSecrets are Synced at `version`, then
/// SIGKILLs the operator and starts it again; panics if all `n` were done by then (the
/// kill would have tested nothing). The count at the kill.
async fn kill_mid_batch(fx: &mut Fixture, n: usize, version: u64, already: usize) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let synced = synced_at(fx, version).await;
        if synced > already {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no progress past {already}/{n} at version {version} in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fx.op.kill();
    let synced = synced_at(fx, version).await;
    assert!(
        synced < n,
        "every ManagedSecret was at version {version} before the kill: nothing was tested"
    );
    eprintln!("operator SIGKILLed with {synced}/{n} ManagedSecrets at version {version}");
    fx.op.restart();
    synced
}
