//! End-to-end tests of the pkcs11 store against the bed's SoftHSM2 token: values round-trip
//! through it as a profile's source and as a sync target, the Kubernetes side holds
//! ciphertext only, the KEK never leaves the token, a wrong PIN seals the store without
//! touching any native Secret, and a KEK rotation of 200 secrets survives a crash.
//!
//! The token is shared by every test running at once: each test uses KEK labels of its
//! own, and destroys its keys at the end.

mod e2e;

use base64::Engine as _;
use cryptoki::error::{Error as Pkcs11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};
use e2e::Testbed;
use e2e::fixture::{Fixture, wait_until};
use e2e::hsm::{
    PIN_SECRET, TokenKeys, bed_provider, hsm_setup, hsm_store, kek_label, provider, set_pin,
};
use e2e::operator::Work;
use k8s_openapi::api::core::v1::Secret;
use keyhaven::api::{KekRotationPhase, SecretStore, StorePhase};
use keyhaven::backend::{Backend, Pkcs11Store};
use kube::ResourceExt;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// The sealed records of `store` in the operator's namespace, by name.
async fn records(fx: &Fixture, store: &str) -> BTreeMap<String, Secret> {
    let lp = ListParams::default().labels(&format!(
        "keyhaven.io/store={store},keyhaven.io/role=sealed-version"
    ));
    fx.ns_api::<Secret>(&fx.op.namespace)
        .list(&lp)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect()
}

/// How many records of `store` each KEK id wraps.
async fn kek_census(fx: &Fixture, store: &str) -> BTreeMap<String, usize> {
    let lp = ListParams::default().labels(&format!(
        "keyhaven.io/store={store},keyhaven.io/role=sealed-version"
    ));
    let mut census = BTreeMap::new();
    for m in fx
        .ns_api::<Secret>(&fx.op.namespace)
        .list_metadata(&lp)
        .await
        .unwrap()
        .items
    {
        let kek = m.annotations().get("keyhaven.io/kek-id").cloned();
        *census.entry(kek.unwrap_or_default()).or_default() += 1;
    }
    census
}

async fn read_value(store: &Pkcs11Store, path: &str, version: Option<u64>, key: &str) -> String {
    let stored = store
        .read(path, version)
        .await
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .unwrap_or_else(|| panic!("{path} (version {version:?}) is not in the store"));
    String::from_utf8(stored.data.get(key).expect("key").to_vec()).unwrap()
}

#[tokio::test]
async fn values_round_trip_as_source_and_sync_target_and_only_ciphertext_is_stored() {
    let mut keys = TokenKeys(vec![]);
    let fx = Fixture::new("pkcs11-trip").await;
    let bed = Testbed::load();
    let (hsm, kek) = hsm_setup(&fx, &mut keys).await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let status = fx
        .wait_store(&hsm, "Active", Duration::from_secs(60), |s| {
            s.phase == Some(StorePhase::Active)
        })
        .await;
    assert_eq!(status.type_.as_deref(), Some("pkcs11"));
    assert_eq!(status.active_kek.as_deref(), Some(kek.as_str()));
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .contains("non-extractable"),
        "{status:?}"
    );

    // The HSM store as the source, and as a sync target of an internal source.
    let as_source = fx.profile("hsm-source", &hsm, &[]).await;
    let as_target = fx.profile("hsm-target", &internal, &[&hsm]).await;
    let (pass1, pass2, token) = (
        "pkcs11-Pa55word-one-e2e",
        "pkcs11-Pa55word-two-e2e",
        "pkcs11-api-t0ken-e2e-target",
    );
    fx.secret(
        &fx.ns,
        "db-login",
        &[("username", "app"), ("password", pass1)],
    )
    .await;
    fx.secret(&fx.ns, "api-token", &[("api-key", token)]).await;
    fx.managed_secret(
        "db",
        json!({"profile": as_source, "type": "basic-auth",
               "content": {"fromSecret": {"name": "db-login"}}, "refreshInterval": "1s"}),
    )
    .await;
    fx.managed_secret(
        "api",
        json!({"profile": as_target, "type": "api-key",
               "content": {"fromSecret": {"name": "api-token"}}}),
    )
    .await;
    let db = fx.wait_synced("db", 1).await;
    assert_eq!(db.status.unwrap().versions[0].store, hsm);
    let api = fx.wait_synced("api", 1).await;
    assert!(
        api.status
            .unwrap()
            .targets
            .iter()
            .any(|t| t.store == hsm && t.state == "Synced" && t.version == Some(1))
    );
    assert_eq!(
        fx.secret_data(&fx.ns, "db").await.unwrap()["password"],
        pass1
    );
    assert_eq!(
        fx.secret_data(&fx.ns, "api").await.unwrap()["api-key"],
        token
    );

    // A new value is a new version; both stay readable from the token.
    fx.secret(
        &fx.ns,
        "db-login",
        &[("username", "app"), ("password", pass2)],
    )
    .await;
    fx.wait_synced("db", 2).await;
    assert_eq!(
        fx.secret_data(&fx.ns, "db").await.unwrap()["password"],
        pass2
    );
    let store = hsm_store(&fx, &hsm, &kek);
    let db_path = format!("{}/db", fx.ns);
    let api_path = format!("{}/api", fx.ns);
    assert_eq!(
        read_value(&store, &db_path, Some(1), "password").await,
        pass1
    );
    assert_eq!(read_value(&store, &db_path, None, "password").await, pass2);
    assert_eq!(read_value(&store, &api_path, None, "api-key").await, token);
    assert_eq!(store.list_versions(&db_path).await.unwrap(), vec![1, 2]);
    assert_eq!(store.count().await.unwrap(), 2);
    // The status counts them at the next check; any change to the store triggers one.
    fx.cluster_api::<SecretStore>()
        .patch(
            &hsm,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"e2e/recheck": "1"}}})),
        )
        .await
        .unwrap();
    fx.wait_store(&hsm, "2 secrets counted", Duration::from_secs(90), |s| {
        s.secrets == Some(2)
    })
    .await;

    // Every record names the KEK and holds a 60-byte GCM-wrapped data key.
    let sealed = records(&fx, &hsm).await;
    assert_eq!(sealed.len(), 3, "{:?}", sealed.keys());
    for (name, s) in &sealed {
        assert_eq!(
            s.annotations().get("keyhaven.io/kek-id"),
            Some(&format!("pkcs11:{kek}")),
            "{name}"
        );
        assert_eq!(
            s.data.as_ref().unwrap()["wrapped-key"].0.len(),
            60,
            "{name}"
        );
    }

    // No plaintext byte of any value in any Secret of the operator's namespace: not raw,
    // not base64-encoded (the sealed serialization's encoding).
    let b64 = base64::engine::general_purpose::STANDARD;
    let all = fx
        .ns_api::<Secret>(&fx.op.namespace)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(all.items.len() >= 5, "records, keys, PIN");
    for secret in &all.items {
        let mut haystack: Vec<Vec<u8>> = secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| [k.as_bytes(), &v.0].concat())
            .collect();
        haystack.extend(
            secret
                .annotations()
                .iter()
                .chain(secret.labels())
                .map(|(k, v)| format!("{k}={v}").into_bytes()),
        );
        for value in [pass1, pass2, token] {
            for needle in [value.to_owned(), b64.encode(value)] {
                assert!(
                    !haystack
                        .iter()
                        .any(|h| h.windows(needle.len()).any(|w| w == needle.as_bytes())),
                    "Secret {} holds a plaintext value",
                    secret.name_any()
                );
            }
        }
    }
    fx.assert_values_never_leaked(&[pass1, pass2, token, &bed.pkcs11_pin])
        .await;
}

#[tokio::test]
async fn the_kek_is_created_sensitive_and_never_leaves_the_token() {
    let mut keys = TokenKeys(vec![]);
    let fx = Fixture::new("pkcs11-kek").await;
    let bed = Testbed::load();
    let (hsm, kek) = hsm_setup(&fx, &mut keys).await;
    fx.wait_store(&hsm, "Active", Duration::from_secs(60), |s| {
        s.phase == Some(StorePhase::Active)
    })
    .await;

    // A direct session on the token, as anyone holding the PIN could open.
    let session = bed.pkcs11_session();
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(kek.as_bytes().to_vec()),
        ])
        .unwrap();
    assert_eq!(found.len(), 1, "one KEK made on first use");
    let key = found[0];
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Wrap,
                AttributeType::Value,
            ],
        )
        .unwrap();
    for expected in [
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::AlwaysSensitive(true),
        Attribute::NeverExtractable(true),
        Attribute::Wrap(false),
    ] {
        assert!(attrs.contains(&expected), "{expected:?} not in {attrs:?}");
    }
    // Reading CKA_VALUE is refused: the token reports it sensitive and returns nothing.
    assert!(
        !attrs
            .iter()
            .any(|a| a.attribute_type() == AttributeType::Value),
        "the key's value was returned"
    );
    let info = session
        .get_attribute_info(key, &[AttributeType::Value])
        .unwrap();
    assert!(
        matches!(info[..], [AttributeInfo::Sensitive]),
        "CKA_VALUE: {info:?}"
    );
    // Wrapping it out under a key of our own is refused.
    let wrapping = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Wrap(true),
                Attribute::Extractable(true),
            ],
        )
        .unwrap();
    for mechanism in [Mechanism::AesKeyWrapPad, Mechanism::AesKeyWrap] {
        match session.wrap_key(&mechanism, wrapping, key) {
            Err(Pkcs11Error::Pkcs11(RvError::KeyUnextractable, _)) => {}
            other => panic!("wrapping the KEK out: {other:?}"),
        }
    }
    // Nor can it be made extractable or non-sensitive after the fact.
    assert!(
        session
            .update_attributes(key, &[Attribute::Extractable(true)])
            .is_err()
    );
    assert!(
        session
            .update_attributes(key, &[Attribute::Sensitive(false)])
            .is_err()
    );
    session.destroy_object(wrapping).unwrap();
}

#[tokio::test]
async fn a_wrong_pin_seals_the_store_and_never_touches_native_secrets() {
    let mut keys = TokenKeys(vec![]);
    // The missing module below is on the operator's allow-list, so it is tried (and fails
    // to load); a module not on the list is refused unloaded (e2e_kubernetes_store).
    let fx = Fixture::new_with(
        "pkcs11-pin",
        &["--pkcs11-modules", "/nonexistent/libpkcs11-e2e.so"],
    )
    .await;
    let bed = Testbed::load();
    let (hsm, kek) = hsm_setup(&fx, &mut keys).await;
    let profile = fx.profile("p", &hsm, &[]).await;
    let value = "sealed-but-kept-e2e-pkcs11";
    fx.secret(&fx.ns, "src", &[("api-key", value)]).await;
    fx.managed_secret(
        "api",
        json!({"profile": profile, "type": "api-key",
               "content": {"fromSecret": {"name": "src"}}, "refreshInterval": "1s"}),
    )
    .await;
    fx.wait_synced("api", 1).await;
    let native_before = fx.ns_api::<Secret>(&fx.ns).get("api").await.unwrap().data;
    let records_before = records(&fx, &hsm).await;
    assert_eq!(records_before.len(), 1);

    // The PIN in the Secret changes to a wrong one: the store turns Sealed within seconds
    // (the PIN is re-read at most 10 s later), saying why, and the token is not retried.
    let wrong_pin = "0000-wrong-pin-e2e";
    set_pin(&fx, wrong_pin).await;
    let sealed = fx
        .wait_store(&hsm, "Sealed", Duration::from_secs(90), |s| {
            s.phase == Some(StorePhase::Sealed)
        })
        .await;
    let message = sealed.message.unwrap();
    assert!(message.contains("refused the PIN"), "{message}");
    assert!(
        message.contains(&format!("{}/{PIN_SECRET} key pin", fx.op.namespace)),
        "{message}"
    );
    fx.wait_not_ready("api", "StoreSealed").await;
    fx.wait_event("Sealed", "refused the PIN").await;
    // Give the 1 s refresh time to do damage; there must be none. Failing, api retries
    // only every 30 s: two reconciles made now, each refused by the sealed token.
    tokio::time::sleep(Duration::from_secs(4)).await;
    fx.reconcile_managed(
        "api",
        2,
        &[
            Work::failed("ManagedSecret", "StoreSealed"),
            Work::store_reads(&hsm).outcome("sealed"),
        ],
    )
    .await;
    let native_after = fx.ns_api::<Secret>(&fx.ns).get("api").await.unwrap();
    assert_eq!(
        native_after.data, native_before,
        "the native Secret changed"
    );
    assert_eq!(
        fx.secret_data(&fx.ns, "api").await.unwrap()["api-key"],
        value
    );
    let records_after = records(&fx, &hsm).await;
    assert_eq!(
        records_after.keys().collect::<Vec<_>>(),
        records_before.keys().collect::<Vec<_>>(),
        "a sealed store lost or gained records"
    );
    for (name, r) in &records_after {
        assert_eq!(r.data, records_before[name].data, "record {name} changed");
    }

    // The right PIN again: Active, and the secret syncs on.
    set_pin(&fx, &bed.pkcs11_pin).await;
    fx.wait_store(&hsm, "Active again", Duration::from_secs(90), |s| {
        s.phase == Some(StorePhase::Active)
    })
    .await;
    fx.wait_managed("api", "Ready again", |ms| {
        ms.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    })
    .await;

    // A missing module and a missing token seal a store too, with a clear message.
    let no_module = fx
        .store(
            "no-module",
            provider("/nonexistent/libpkcs11-e2e.so", &bed.pkcs11_token, &kek),
        )
        .await;
    let no_token = fx
        .store(
            "no-token",
            provider(
                &bed.pkcs11_module.display().to_string(),
                "no-such-token-e2e",
                &kek,
            ),
        )
        .await;
    let s = fx
        .wait_store(&no_module, "Sealed", Duration::from_secs(60), |s| {
            s.phase == Some(StorePhase::Sealed)
        })
        .await;
    assert!(
        s.message
            .as_deref()
            .unwrap()
            .contains("PKCS#11 module /nonexistent/libpkcs11-e2e.so cannot be loaded"),
        "{s:?}"
    );
    let s = fx
        .wait_store(&no_token, "Sealed", Duration::from_secs(60), |s| {
            s.phase == Some(StorePhase::Sealed)
        })
        .await;
    assert!(
        s.message
            .as_deref()
            .unwrap()
            .contains("has no token \"no-such-token-e2e\""),
        "{s:?}"
    );
    fx.assert_values_never_leaked(&[value, wrong_pin, &bed.pkcs11_pin])
        .await;
}

/// A token of a test's own on the bed's token directory, deleted when dropped.
struct OwnToken(String);

impl OwnToken {
    /// Initialises a token labelled `label` with user PIN `pin`, as an administrator would
    /// with softhsm2-util, in another process.
    fn create(label: &str, pin: &str) -> OwnToken {
        Testbed::load().export_softhsm2_conf();
        let out = std::process::Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label, "--pin", pin])
            .args(["--so-pin", &format!("so-{pin}")])
            .output()
            .expect("run softhsm2-util");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        OwnToken(label.to_owned())
    }
}

impl Drop for OwnToken {
    fn drop(&mut self) {
        let _ = std::process::Command::new("softhsm2-util")
            .args(["--delete-token", "--token", &self.0])
            .output();
    }
}

#[tokio::test]
async fn a_token_initialised_after_the_operator_started_unseals_its_store() {
    // SoftHSM2 lists its tokens once, at C_Initialize: without re-initialising the module
    // the operator would report this token missing for as long as it runs.
    // Declared before the fixture: the token goes after the operator.
    let token;
    let fx = Fixture::new("pkcs11-late").await;
    let bed = Testbed::load();
    let label = format!("e2e-late-{}", e2e::unique_suffix());
    let pin = format!("pin-{}", e2e::unique_suffix());
    let kek = kek_label(&fx, "kek");
    set_pin(&fx, &pin).await;
    let module = bed.pkcs11_module.display().to_string();
    let hsm = fx.store("late", provider(&module, &label, &kek)).await;
    let s = fx
        .wait_store(&hsm, "Sealed", Duration::from_secs(60), |s| {
            s.phase == Some(StorePhase::Sealed)
        })
        .await;
    let message = s.message.unwrap_or_default();
    assert!(
        message.contains(&format!("has no token \"{label}\"")),
        "{message}"
    );

    // The administrator initialises the token now: the store unseals at its next check
    // (10 s) and a secret syncs through it.
    token = OwnToken::create(&label, &pin);
    fx.wait_store(&hsm, "Active", Duration::from_secs(60), |s| {
        s.phase == Some(StorePhase::Active)
    })
    .await;
    let profile = fx.profile("p", &hsm, &[]).await;
    let value = "late-token-value-e2e-pkcs11";
    fx.secret(&fx.ns, "src", &[("api-key", value)]).await;
    fx.managed_secret(
        "api",
        json!({"profile": profile, "type": "api-key",
               "content": {"fromSecret": {"name": "src"}}}),
    )
    .await;
    fx.wait_synced("api", 1).await;
    assert_eq!(
        fx.secret_data(&fx.ns, "api").await.unwrap()["api-key"],
        value
    );
    assert_eq!(records(&fx, &hsm).await.len(), 1);
    fx.assert_values_never_leaked(&[value, &pin]).await;
    drop(fx);
    drop(token);
}

#[tokio::test]
async fn kek_rotation_of_200_secrets_survives_a_crash_half_way() {
    const N: usize = 200;
    let mut keys = TokenKeys(vec![]);
    let mut fx = Fixture::new("pkcs11-rotate").await;
    let bed = Testbed::load();
    let (old, new) = (kek_label(&fx, "kek1"), kek_label(&fx, "kek2"));
    keys.0.extend([old.clone(), new.clone()]);
    set_pin(&fx, &bed.pkcs11_pin).await;
    let hsm = fx.store("hsm", bed_provider(&old)).await;
    let profile = fx.profile("p", &hsm, &[]).await;
    let value = |i: usize| format!("rotated-value-{i:03}-e2e-pkcs11");
    for i in 0..N {
        fx.secret(&fx.ns, &format!("src-{i}"), &[("value", &value(i))])
            .await;
        fx.managed_secret(
            &format!("ms-{i}"),
            json!({"profile": profile, "type": "generic",
                   "content": {"fromSecret": {"name": format!("src-{i}")}}}),
        )
        .await;
    }
    for i in 0..N {
        fx.wait_synced(&format!("ms-{i}"), 1).await;
    }
    let (old_id, new_id) = (format!("pkcs11:{old}"), format!("pkcs11:{new}"));
    assert_eq!(
        kek_census(&fx, &hsm).await,
        BTreeMap::from([(old_id.clone(), N)])
    );

    // Rotate, and SIGKILL the operator once about half of the data keys moved.
    fx.store("hsm", bed_provider(&new)).await;
    let moved_at_kill = wait_until(Duration::from_secs(120), || async {
        let census = kek_census(&fx, &hsm).await;
        let moved = census.get(&new_id).copied().unwrap_or(0);
        (moved >= N * 2 / 5).then_some(moved)
    })
    .await
    .expect("the rotation never got going");
    fx.op.kill();
    let census = kek_census(&fx, &hsm).await;
    let moved = census.get(&new_id).copied().unwrap_or(0);
    assert!(
        moved < N,
        "the rotation finished before the kill ({moved_at_kill} moved when seen): nothing was tested"
    );
    assert_eq!(census.values().sum::<usize>(), N, "{census:?}");
    let mid = fx
        .cluster_api::<SecretStore>()
        .get(&hsm)
        .await
        .unwrap()
        .status
        .unwrap();
    let rotation = mid.kek_rotation.expect("rotation status while rotating");
    assert_eq!(rotation.phase, KekRotationPhase::Rotating);
    assert_eq!(
        (rotation.from.clone(), rotation.to.clone()),
        (vec![old.clone()], new.clone())
    );
    assert!(
        rotation.rewrapped > 0 && rotation.rewrapped < N as u64,
        "{rotation:?}"
    );

    // Mid-way, every record is readable: each is unwrapped under the key it names.
    let store = hsm_store(&fx, &hsm, &new);
    for i in 0..N {
        let path = format!("{}/ms-{i}", fx.ns);
        assert_eq!(
            read_value(&store, &path, None, "value").await,
            value(i),
            "{path}"
        );
    }

    // Restarted, the operator finishes what was left, and says the old key is unused.
    fx.op.restart();
    let done = fx
        .wait_store(&hsm, "rotation Complete", Duration::from_secs(120), |s| {
            s.kek_rotation
                .as_ref()
                .is_some_and(|r| r.phase == KekRotationPhase::Complete)
        })
        .await;
    let rotation = done.kek_rotation.unwrap();
    assert_eq!(rotation.to, new);
    assert_eq!(rotation.unused_keys, vec![old.clone()]);
    assert_eq!((rotation.rewrapped, rotation.total), (N as u64, N as u64));
    assert!(rotation.completed_at.is_some());
    assert_eq!(done.active_kek.as_deref(), Some(new.as_str()));
    assert_eq!(kek_census(&fx, &hsm).await, BTreeMap::from([(new_id, N)]));
    fx.wait_event("KekRotationComplete", &old).await;
    for i in 0..N {
        let path = format!("{}/ms-{i}", fx.ns);
        assert_eq!(
            read_value(&store, &path, None, "value").await,
            value(i),
            "{path}"
        );
        assert_eq!(store.list_versions(&path).await.unwrap(), vec![1], "{path}");
    }
    // The old key stays on the token: keyhaven never deletes a key.
    let session = bed.pkcs11_session();
    let old_keys = session
        .find_objects(&[Attribute::Label(old.as_bytes().to_vec())])
        .unwrap();
    assert_eq!(old_keys.len(), 1, "the old KEK is kept");
    for i in 0..N {
        let ms = fx.wait_synced(&format!("ms-{i}"), 1).await;
        assert_eq!(ms.status.unwrap().versions.len(), 1);
    }
    fx.assert_values_never_leaked(&[&value(0), &value(N - 1), &bed.pkcs11_pin])
        .await;
}
