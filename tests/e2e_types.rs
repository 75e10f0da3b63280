//! End-to-end tests of the secret types, generation, rotation, rollback and rollout
//! restarts on the test bed (real kube-apiserver and kube-controller-manager, the operator
//! as a real process).

mod e2e;

use base64::Engine as _;
use e2e::fixture::{Fixture, versions, wait_until};
use e2e::operator::Work;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Secret;
use keyhaven::api::{Generate, ManagedSecret, SecretType};
use keyhaven::backend::Backend;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// A Secret with binary values.
async fn bytes_secret(fx: &Fixture, name: &str, values: &[(&str, Vec<u8>)]) {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(fx.ns.clone()),
            ..Default::default()
        },
        data: Some(
            values
                .iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.clone())))
                .collect(),
        ),
        ..Default::default()
    };
    fx.ns_api::<Secret>(&fx.ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap_or_else(|e| panic!("create Secret {name}: {e}"));
}

fn generated(t: SecretType) -> Vec<(&'static str, Vec<u8>)> {
    let data = keyhaven::content::generate(t, &Generate::default(), "e2e").unwrap();
    data.iter()
        .map(|(k, v)| {
            let k: &'static str = Box::leak(k.to_owned().into_boxed_str());
            (k, v.to_vec())
        })
        .collect()
}

fn jwt(exp: i64) -> String {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        b.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        b.encode(format!(r#"{{"sub":"e2e","exp":{exp}}}"#)),
        b.encode("e2e-signature")
    )
}

fn p12(password: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["e2e.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let chain = p12_keystore::PrivateKeyChain::new(
        vec![1u8; 20],
        p12_keystore::PrivateKey::from_der(&key.serialize_der()).unwrap(),
        [p12_keystore::Certificate::from_der(cert.der()).unwrap()],
    );
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry("e2e", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    store.writer(password).write().unwrap()
}

#[tokio::test]
async fn every_new_type_renders_its_native_secret_and_bad_content_is_refused() {
    let fx = Fixture::new("newtypes").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &internal, &[]).await;

    let soon = jiff::Timestamp::now().as_second() + 86400;
    let token = jwt(soon);
    bytes_secret(&fx, "jwt", &[("token", token.clone().into_bytes())]).await;
    bytes_secret(&fx, "pk", &generated(SecretType::PrivateKey)).await;
    bytes_secret(&fx, "sk", &[("key", vec![0x5a; 32])]).await;
    bytes_secret(
        &fx,
        "ks",
        &[
            ("keystore.p12", p12("e2e-changeit")),
            ("password", b"e2e-changeit".to_vec()),
        ],
    )
    .await;
    let cert = generated(SecretType::Certificate);
    let cert_only: Vec<_> = cert
        .iter()
        .filter(|(k, _)| *k != "ca.crt")
        .cloned()
        .collect();
    bytes_secret(&fx, "cert", &cert_only).await;
    bytes_secret(&fx, "ssh", &generated(SecretType::SshKey)).await;
    // Bad: a certificate with another key; a JWT with two parts.
    let other_key = generated(SecretType::PrivateKey)[0].1.clone();
    let mismatched: Vec<_> = cert_only
        .iter()
        .map(|(k, v)| {
            (
                *k,
                if *k == "tls.key" {
                    other_key.clone()
                } else {
                    v.clone()
                },
            )
        })
        .collect();
    bytes_secret(&fx, "bad-cert", &mismatched).await;
    bytes_secret(&fx, "bad-jwt", &[("token", b"e2e.notajwt".to_vec())]).await;

    let spec = |ty: &str, from: &str| json!({"profile": profile, "type": ty, "content": {"fromSecret": {"name": from}}});
    for (name, ty) in [
        ("jwt", "jwt"),
        ("pk", "private-key"),
        ("sk", "secret-key"),
        ("ks", "keystore"),
        ("cert", "certificate"),
        ("ssh", "ssh-key"),
        ("bad-cert", "certificate"),
        ("bad-jwt", "jwt"),
    ] {
        fx.managed_secret(&format!("ms-{name}"), spec(ty, name))
            .await;
    }

    let secrets: Api<Secret> = fx.ns_api(&fx.ns);
    for (name, type_, keys) in [
        ("jwt", "Opaque", vec!["token"]),
        ("pk", "Opaque", vec!["private-key", "public-key"]),
        ("sk", "Opaque", vec!["key"]),
        ("ks", "Opaque", vec!["keystore.p12", "password"]),
        (
            "cert",
            "kubernetes.io/tls",
            vec!["ca.crt", "tls.crt", "tls.key"],
        ),
        (
            "ssh",
            "kubernetes.io/ssh-auth",
            vec!["ssh-privatekey", "ssh-publickey"],
        ),
    ] {
        let ms_name = format!("ms-{name}");
        fx.wait_synced(&ms_name, 1).await;
        let s = secrets.get(&ms_name).await.unwrap();
        assert_eq!(s.type_.as_deref(), Some(type_), "{name}");
        assert_eq!(
            s.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
            keys,
            "{name}"
        );
    }
    let ssh = fx.secret_data(&fx.ns, "ms-ssh").await.unwrap();
    assert!(ssh["ssh-publickey"].starts_with("ssh-ed25519 "));
    let cert_native = fx.secret_data(&fx.ns, "ms-cert").await.unwrap();
    assert_eq!(
        cert_native["ca.crt"], cert_native["tls.crt"],
        "self-signed: ca.crt is the leaf"
    );

    // Expiry: the certificate's notAfter is reported; the JWT expiring tomorrow warns.
    let cert_ms = fx.wait_synced("ms-cert", 1).await;
    let cert_status = cert_ms.status.unwrap();
    assert!(cert_status.expires_at.is_some());
    assert!(
        cert_status
            .conditions
            .iter()
            .any(|c| c.type_ == "Expiring" && c.status == "False")
    );
    let jwt_ms = fx.wait_synced("ms-jwt", 1).await;
    let jwt_status = jwt_ms.status.unwrap();
    assert_eq!(
        jwt_status.expires_at.as_ref().map(|t| t.0.as_second()),
        Some(soon)
    );
    assert!(
        jwt_status
            .conditions
            .iter()
            .any(|c| c.type_ == "Expiring" && c.status == "True" && c.reason == "ExpiresSoon"),
        "{:?}",
        jwt_status.conditions
    );
    fx.wait_event("ExpiresSoon", "expires at").await;

    // Bad content: a clear condition and Event; nothing stored, no native Secret.
    let bad = fx.wait_not_ready("ms-bad-cert", "InvalidContent").await;
    let message = format!("{:?}", bad.status);
    assert!(message.contains("does not match the leaf"), "{message}");
    fx.wait_not_ready("ms-bad-jwt", "InvalidContent").await;
    fx.wait_event("InvalidContent", "three '.'-separated parts")
        .await;
    assert!(secrets.get_opt("ms-bad-cert").await.unwrap().is_none());
    let store = fx.internal_store(&internal).await;
    for name in ["ms-bad-cert", "ms-bad-jwt"] {
        assert!(
            store
                .list_versions(&format!("{}/{name}", fx.ns))
                .await
                .unwrap()
                .is_empty(),
            "invalid content was stored"
        );
    }
    fx.assert_values_never_leaked(&[&token, "e2e-changeit"])
        .await;
}

#[tokio::test]
async fn generated_password_and_ssh_key_are_stored_then_materialized() {
    let mut fx = Fixture::new("generate").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &internal, &[]).await;
    fx.managed_secret(
        "pw",
        json!({"profile": profile, "type": "password",
            "content": {"generate": {"length": 24, "classes": ["lowercase", "digits"], "exclude": "0o"}}}),
    )
    .await;
    fx.managed_secret(
        "ssh",
        json!({"profile": profile, "type": "ssh-key",
            "content": {"generate": {"algorithm": "ecdsa-p256", "comment": "e2e"}}}),
    )
    .await;

    let ms = fx.wait_synced("pw", 1).await;
    assert_eq!(
        ms.status.unwrap().versions[0].reason.as_deref(),
        Some("generated")
    );
    let native = fx.secret_data(&fx.ns, "pw").await.unwrap();
    let password = native["password"].clone();
    assert_eq!(password.len(), 24);
    assert!(
        password
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    );
    assert!(!password.contains(['0', 'o']));
    // The source store holds the same value, as version 1.
    let store = fx.internal_store(&internal).await;
    let stored = store
        .read(&format!("{}/pw", fx.ns), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.stamp.map(|s| s.version), Some(1));
    assert_eq!(stored.data.get("password"), Some(password.as_bytes()));

    fx.wait_synced("ssh", 1).await;
    let s = fx.ns_api::<Secret>(&fx.ns).get("ssh").await.unwrap();
    assert_eq!(s.type_.as_deref(), Some("kubernetes.io/ssh-auth"));
    let ssh = fx.secret_data(&fx.ns, "ssh").await.unwrap();
    assert!(ssh["ssh-privatekey"].starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    assert!(
        ssh["ssh-publickey"].starts_with("ecdsa-sha2-nistp256 ")
            && ssh["ssh-publickey"].trim_end().ends_with(" e2e")
    );

    // A restart of the operator keeps the stored values: no new version. The restarted
    // process reconciles pw again and again (refreshed every second), each time reading
    // the store (three reconciles and reads at least, ssh's one included, on /metrics).
    fx.ns_api::<ManagedSecret>(&fx.ns)
        .patch(
            "pw",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"refreshInterval": "1s"}})),
        )
        .await
        .unwrap();
    fx.op.restart();
    let restarted = fx.op.metrics().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    fx.op
        .wait_work(
            &restarted,
            &[
                (Work::reconciles("ManagedSecret"), 3),
                (Work::store_reads(&internal), 3),
            ],
            Duration::from_secs(30),
        )
        .await;
    let ms = fx.wait_synced("pw", 1).await;
    assert_eq!(versions(&ms), vec![1]);
    assert_eq!(
        fx.secret_data(&fx.ns, "pw").await.unwrap()["password"],
        password
    );
    fx.assert_values_never_leaked(&[&password, ssh["ssh-privatekey"].lines().nth(3).unwrap()])
        .await;
}

#[tokio::test]
async fn rotation_and_rollback_make_new_versions() {
    let fx = Fixture::new("rotate").await;
    let src_ns = fx.store_namespace("src").await;
    let source = fx
        .store("src", json!({"kubernetes": {"namespace": src_ns}}))
        .await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &source, &[&internal]).await;
    let api: Api<ManagedSecret> = fx.ns_api(&fx.ns);
    fx.managed_secret(
        "key",
        json!({"profile": profile, "type": "api-key", "content": {"generate": {"prefix": "kh_e2e_"}}}),
    )
    .await;
    let v1 = fx.wait_synced("key", 1).await;
    let key1 = fx.secret_data(&fx.ns, "key").await.unwrap()["api-key"].clone();
    assert!(key1.starts_with("kh_e2e_"));

    // The annotation rotates now: version 2, new content, written to every store.
    api.patch(
        "key",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"keyhaven.io/rotate": "e2e-1"}}})),
    )
    .await
    .unwrap();
    let v2 = fx.wait_synced("key", 2).await;
    let key2 = fx.secret_data(&fx.ns, "key").await.unwrap()["api-key"].clone();
    assert_ne!(key1, key2);
    let st = v2.status.clone().unwrap();
    assert_eq!(st.rotate_request.as_deref(), Some("e2e-1"));
    assert!(
        st.versions[1]
            .reason
            .as_deref()
            .unwrap()
            .contains("rotated")
    );
    assert_eq!(st.versions[0], v1.status.as_ref().unwrap().versions[0]);
    // Only once per annotation value: two reconciles later (made now: key refreshes hourly),
    // each reading the source, still version 2.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fx.reconcile_managed("key", 2, &[Work::store_reads(&source)])
        .await;
    assert_eq!(versions(&fx.wait_synced("key", 2).await), vec![1, 2]);

    // Rollback to 1: a NEW version 3 with version 1's content; history kept as it was.
    api.patch(
        "key",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rollbackTo": 1, "reason": "e2e rollback"}})),
    )
    .await
    .unwrap();
    let v3 = fx.wait_synced("key", 3).await;
    assert_eq!(
        fx.secret_data(&fx.ns, "key").await.unwrap()["api-key"],
        key1
    );
    let st3 = v3.status.unwrap();
    assert_eq!(versions_of(&st3.versions), vec![1, 2, 3]);
    assert_eq!(st3.versions[2].fingerprint, st3.versions[0].fingerprint);
    assert_eq!(st3.versions[2].reason.as_deref(), Some("e2e rollback"));
    assert_eq!(st3.versions[..2], st.versions[..]);
    let store = fx.internal_store(&internal).await;
    let path = format!("{}/key", fx.ns);
    assert_eq!(store.list_versions(&path).await.unwrap(), vec![1, 2, 3]);
    let held = store.read(&path, None).await.unwrap().unwrap();
    assert_eq!(held.data.get("api-key"), Some(key1.as_bytes()));

    // A rollback to a version that does not exist is refused.
    api.patch(
        "key",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rollbackTo": 9}})),
    )
    .await
    .unwrap();
    fx.wait_not_ready("key", "RollbackVersionNotFound").await;

    // Scheduled rotation: rotation.interval makes new versions on its own.
    fx.managed_secret(
        "timed",
        json!({"profile": profile, "type": "secret-key",
            "content": {"generate": {"bytes": 16}}, "rotation": {"interval": "3s"}}),
    )
    .await;
    fx.wait_synced("timed", 1).await;
    let timed = fx.wait_synced("timed", 2).await;
    let st = timed.status.unwrap();
    assert!(
        st.versions[1]
            .reason
            .as_deref()
            .unwrap()
            .contains("rotation.interval")
    );
    let timed_secret = fx.ns_api::<Secret>(&fx.ns).get("timed").await.unwrap();
    assert_eq!(timed_secret.data.unwrap()["key"].0.len(), 16);
    fx.assert_values_never_leaked(&[&key1, &key2]).await;
}

fn versions_of(v: &[keyhaven::api::VersionRecord]) -> Vec<u64> {
    v.iter().map(|r| r.version).collect()
}

async fn replica_sets_of(fx: &Fixture, deployment: &str) -> Vec<ReplicaSet> {
    fx.ns_api::<ReplicaSet>(&fx.ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|rs| {
            rs.owner_references()
                .iter()
                .any(|o| o.kind == "Deployment" && o.name == deployment)
        })
        .collect()
}

#[tokio::test]
async fn rollout_restart_makes_a_new_replica_set() {
    let fx = Fixture::new("rollout").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &internal, &[]).await;
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "app", "namespace": fx.ns},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app"}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1",
                    "envFrom": [{"secretRef": {"name": "cfg"}}]}]}
            }
        }
    }))
    .unwrap();
    fx.ns_api::<Deployment>(&fx.ns)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let first = wait_until(Duration::from_secs(60), || async {
        let rs = replica_sets_of(&fx, "app").await;
        (rs.len() == 1).then_some(rs)
    })
    .await
    .expect("kube-controller-manager creates the first ReplicaSet");

    fx.secret(&fx.ns, "cfg-src", &[("MODE", "e2e-rollout-one")])
        .await;
    fx.managed_secret(
        "cfg",
        json!({"profile": profile, "type": "key-value", "refreshInterval": "1s",
            "content": {"fromSecret": {"name": "cfg-src"}},
            "rolloutRestartTargets": [{"kind": "Deployment", "name": "app"}, {"kind": "StatefulSet", "name": "absent"}]}),
    )
    .await;
    let v1 = fx.wait_synced("cfg", 1).await;
    assert_eq!(v1.status.unwrap().restarted_version, Some(1));
    // Creating the Secret restarts nothing.
    let d = fx.ns_api::<Deployment>(&fx.ns).get("app").await.unwrap();
    let annotations = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default()
    };
    assert!(!annotations(&d).contains_key("keyhaven.io/restartedAt"));

    // New content: the Deployment's pod template is annotated and a new ReplicaSet appears.
    fx.secret(&fx.ns, "cfg-src", &[("MODE", "e2e-rollout-two")])
        .await;
    let v2 = fx.wait_synced("cfg", 2).await;
    assert_eq!(v2.status.unwrap().restarted_version, Some(2));
    let d = fx.ns_api::<Deployment>(&fx.ns).get("app").await.unwrap();
    assert!(annotations(&d).contains_key("keyhaven.io/restartedAt"));
    let after = wait_until(Duration::from_secs(60), || async {
        let rs = replica_sets_of(&fx, "app").await;
        (rs.len() == 2).then_some(rs)
    })
    .await
    .expect("a new ReplicaSet for the restarted Deployment");
    let old: BTreeMap<_, _> = first.iter().map(|r| (r.name_any(), ())).collect();
    assert!(after.iter().any(|r| !old.contains_key(&r.name_any())));
    fx.wait_event("RolloutRestarted", "Deployment/app").await;
    fx.wait_event("RolloutTargetNotFound", "StatefulSet/absent")
        .await;
    fx.assert_values_never_leaked(&["e2e-rollout-one", "e2e-rollout-two"])
        .await;
}

#[tokio::test]
async fn schema_rules_for_generate_and_rotation() {
    let fx = Fixture::new("genschema").await;
    let managed: Api<ManagedSecret> = fx.ns_api(&fx.ns);
    let create = |spec: serde_json::Value| {
        let managed = managed.clone();
        async move {
            let obj: ManagedSecret = serde_json::from_value(json!({
                "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
                "metadata": {"name": "bad"}, "spec": spec}))
            .unwrap_or_else(|e| panic!("{e}"));
            managed
                .create(&PostParams::default(), &obj)
                .await
                .map_err(|e| e.to_string())
        }
    };
    let two = create(json!({"profile": "p", "type": "password",
        "content": {"generate": {}, "fromStore": {}}}))
    .await
    .unwrap_err();
    assert!(
        two.contains("exactly one content source must be set"),
        "{two}"
    );
    let jwt = create(json!({"profile": "p", "type": "jwt", "content": {"generate": {}}}))
        .await
        .unwrap_err();
    assert!(jwt.contains("content.generate supports the types"), "{jwt}");
    let rot = create(json!({"profile": "p", "type": "password",
        "content": {"fromStore": {}}, "rotation": {"interval": "1h"}}))
    .await
    .unwrap_err();
    assert!(rot.contains("rotation needs content.generate"), "{rot}");
    let bits = create(json!({"profile": "p", "type": "ssh-key",
        "content": {"generate": {"algorithm": "rsa", "bits": 1024}}}))
    .await
    .unwrap_err();
    assert!(bits.contains("bits must be 3072 or 4096"), "{bits}");
    let rollback = create(json!({"profile": "p", "type": "password",
        "content": {"fromStore": {}}, "rollbackTo": 0}))
    .await
    .unwrap_err();
    assert!(rollback.contains("rollbackTo"), "{rollback}");
    create(json!({"profile": "p", "type": "ssh-key",
        "content": {"generate": {"algorithm": "rsa", "bits": 3072}}, "rotation": {"interval": "720h"},
        "rolloutRestartTargets": [{"kind": "DaemonSet", "name": "x"}]}))
    .await
    .unwrap();
}

/// Version 1 was written to the old source; after the profile's source moves, a rollback to
/// 1 reads it from the old one, and the new version goes to the new source.
#[tokio::test]
async fn rollback_reads_the_store_the_version_was_written_to() {
    let fx = Fixture::new("rbstore").await;
    let old_ns = fx.store_namespace("old").await;
    let old = fx
        .store("old", json!({"kubernetes": {"namespace": old_ns}}))
        .await;
    let new = fx.store("new", json!({"internal": {}})).await;
    let profile = fx.profile("p", &old, &[]).await;
    fx.secret(&fx.ns, "src", &[("password", "e2e-rbstore-first")])
        .await;
    fx.managed_secret(
        "db",
        json!({"profile": profile, "type": "password", "refreshInterval": "1s",
            "content": {"fromSecret": {"name": "src"}}}),
    )
    .await;
    fx.wait_synced("db", 1).await;
    fx.profile("p", &new, &[]).await;
    // The operator sees the new source before the value changes: the source shows Pending,
    // version 1 staying in the old store. (A refresh between the profile's apply and its
    // watch event would otherwise write version 2 to the old source.)
    fx.wait_managed("db", "the new source Pending", |m| {
        m.status.as_ref().is_some_and(|s| {
            s.targets
                .iter()
                .any(|t| t.store == new && t.state == "Pending")
        })
    })
    .await;
    fx.secret(&fx.ns, "src", &[("password", "e2e-rbstore-second")])
        .await;
    let v2 = fx.wait_synced("db", 2).await;
    let st = v2.status.unwrap();
    assert_eq!(st.versions[0].store, old);
    assert_eq!(st.versions[1].store, new);

    fx.ns_api::<ManagedSecret>(&fx.ns)
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rollbackTo": 1}})),
        )
        .await
        .unwrap();
    let v3 = fx.wait_synced("db", 3).await;
    let st = v3.status.unwrap();
    assert_eq!(st.versions[2].store, new);
    assert_eq!(st.versions[2].fingerprint, st.versions[0].fingerprint);
    assert_eq!(
        st.versions[2].reason.as_deref(),
        Some("rollback to version 1")
    );
    assert_eq!(
        fx.secret_data(&fx.ns, "db").await.unwrap()["password"],
        "e2e-rbstore-first"
    );
    let store = fx.internal_store(&new).await;
    let held = store
        .read(&format!("{}/db", fx.ns), Some(3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.data.get("password"), Some(&b"e2e-rbstore-first"[..]));
    // Dropping rollbackTo follows the source Secret again: a new version 4.
    fx.ns_api::<ManagedSecret>(&fx.ns)
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rollbackTo": null}})),
        )
        .await
        .unwrap();
    fx.wait_synced("db", 4).await;
    assert_eq!(
        fx.secret_data(&fx.ns, "db").await.unwrap()["password"],
        "e2e-rbstore-second"
    );
    fx.assert_values_never_leaked(&["e2e-rbstore-first", "e2e-rbstore-second"])
        .await;
}

#[tokio::test]
async fn generated_certificate_signed_by_a_ca_managed_secret() {
    let fx = Fixture::new("caissue").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &internal, &[]).await;
    fx.managed_secret(
        "leaf",
        json!({"profile": profile, "type": "certificate",
            "content": {"generate": {"dnsNames": ["api.e2e.example"], "issuerRef": {"name": "ca"}}}}),
    )
    .await;
    // The CA does not exist yet: a clear condition, then it heals once the CA has a value.
    fx.wait_not_ready("leaf", "IssuerNotFound").await;
    fx.managed_secret(
        "ca",
        json!({"profile": profile, "type": "certificate",
            "content": {"generate": {"commonName": "e2e CA", "isCA": true}}}),
    )
    .await;
    fx.wait_synced("ca", 1).await;
    fx.wait_synced("leaf", 1).await;
    let ca = fx.secret_data(&fx.ns, "ca").await.unwrap();
    let leaf = fx.secret_data(&fx.ns, "leaf").await.unwrap();
    assert_eq!(leaf["ca.crt"], ca["tls.crt"]);
    assert!(leaf["tls.crt"].ends_with(&ca["tls.crt"]));
    assert_eq!(leaf["tls.crt"].matches("BEGIN CERTIFICATE").count(), 2);
    let s = fx.ns_api::<Secret>(&fx.ns).get("leaf").await.unwrap();
    assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
}

#[tokio::test]
async fn target_template_builds_keys_from_the_value() {
    let fx = Fixture::new("template").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &internal, &[]).await;
    fx.secret(
        &fx.ns,
        "login",
        &[("username", "app"), ("password", "e2e-template-pw")],
    )
    .await;
    fx.managed_secret(
        "db",
        json!({"profile": profile, "type": "basic-auth", "content": {"fromSecret": {"name": "login"}},
            "target": {"template": {"data": {"dsn": "postgres://{{ .username }}:{{ .password }}@db:5432/app"}}}}),
    )
    .await;
    fx.managed_secret(
        "env",
        json!({"profile": profile, "type": "key-value", "content": {"fromSecret": {"name": "login"}},
            "target": {"template": {"mergePolicy": "Replace", "data": {"DB_PASSWORD": "{{ .password }}"}}}}),
    )
    .await;
    fx.managed_secret(
        "bad",
        json!({"profile": profile, "type": "key-value", "content": {"fromSecret": {"name": "login"}},
            "target": {"template": {"data": {"x": "{{ .missing }}"}}}}),
    )
    .await;
    fx.wait_synced("db", 1).await;
    let db = fx.secret_data(&fx.ns, "db").await.unwrap();
    assert_eq!(db["dsn"], "postgres://app:e2e-template-pw@db:5432/app");
    assert_eq!(
        db.keys().collect::<Vec<_>>(),
        ["dsn", "password", "username"]
    );
    fx.wait_synced("env", 1).await;
    let env = fx.secret_data(&fx.ns, "env").await.unwrap();
    assert_eq!(env.keys().collect::<Vec<_>>(), ["DB_PASSWORD"]);
    let bad = fx.wait_not_ready("bad", "InvalidContent").await;
    assert!(format!("{:?}", bad.status).contains("which the value does not have"));
    assert!(fx.secret_data(&fx.ns, "bad").await.is_none());
    fx.assert_values_never_leaked(&["e2e-template-pw"]).await;
}

#[tokio::test]
async fn passwords_weaker_than_the_profile_policy_are_refused() {
    let fx = Fixture::new("pwpolicy").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx
        .profile_spec(
            "p",
            json!({"source": internal, "passwordPolicy": {"minLength": 16, "minClasses": 3}}),
        )
        .await;
    fx.secret(&fx.ns, "weak-src", &[("password", "e2e-weak-pw")])
        .await;
    fx.secret(&fx.ns, "strong-src", &[("password", "E2e-Strong-Passw0rd")])
        .await;
    for (name, from) in [
        ("weak", "weak-src"),
        ("strong", "strong-src"),
        ("generated", ""),
    ] {
        let content = if from.is_empty() {
            json!({"generate": {"length": 24}})
        } else {
            json!({"fromSecret": {"name": from}})
        };
        fx.managed_secret(
            name,
            json!({"profile": profile, "type": "password", "content": content}),
        )
        .await;
    }
    fx.wait_synced("strong", 1).await;
    fx.wait_synced("generated", 1).await;
    let weak = fx.wait_not_ready("weak", "InvalidContent").await;
    assert!(
        format!("{:?}", weak.status).contains("at least 16"),
        "{:?}",
        weak.status
    );
    assert!(fx.secret_data(&fx.ns, "weak").await.is_none());
    let store = fx.internal_store(&internal).await;
    let path = format!("{}/weak", fx.ns);
    assert!(
        store.read(&path, None).await.unwrap().is_none(),
        "nothing stored"
    );
    fx.assert_values_never_leaked(&["e2e-weak-pw", "E2e-Strong-Passw0rd"])
        .await;
}
