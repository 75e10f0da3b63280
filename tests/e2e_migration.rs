//! End-to-end tests of many stores at once (issue 9) on the test bed: namespaces routed to
//! the internal and the pkcs11 store by default profiles, a switch of tier that leaves old
//! versions readable where they were written, and a verified migration of 500 secrets from
//! the internal store to OpenBao with the operator SIGKILLed twice during it.

mod e2e;

use e2e::fixture::Fixture;
use e2e::hsm::{TokenKeys, hsm_setup, hsm_store};
use e2e::{Testbed, plugin};
use futures::{StreamExt, TryStreamExt};
use keyhaven::api::{ManagedSecret, SecretStore, StorePhase, VaultProfile, VersionRecord};
use keyhaven::backend::Backend;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn tier(t: &str) -> Value {
    json!({"matchLabels": {"tier": t}})
}

/// Every ManagedSecret of the test namespace, by name.
async fn all_managed(fx: &Fixture) -> BTreeMap<String, ManagedSecret> {
    fx.ns_api::<ManagedSecret>(&fx.ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|m| (m.name_any(), m))
        .collect()
}

/// Waits until `count` ManagedSecrets exist and each satisfies `ok`; panics naming one
/// that does not.
async fn wait_all(
    fx: &Fixture,
    count: usize,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&ManagedSecret) -> bool,
) -> BTreeMap<String, ManagedSecret> {
    let deadline = Instant::now() + timeout;
    loop {
        let all = all_managed(fx).await;
        let bad = all.values().find(|m| !ok(m));
        if all.len() == count && bad.is_none() {
            return all;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: not reached in {timeout:?} ({} ManagedSecrets); first not there: {:#?}",
                all.len(),
                bad.map(|m| (m.name_any(), &m.status))
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How many ManagedSecrets have every version moved out of `store`.
async fn moved_out(fx: &Fixture, store: &str) -> usize {
    all_managed(fx)
        .await
        .values()
        .filter(|m| m.status.as_ref().and_then(|s| s.migrated_from.as_deref()) == Some(store))
        .count()
}

fn synced_at(ms: &ManagedSecret, version: u64) -> bool {
    ms.status.as_ref().is_some_and(|s| {
        s.phase.is_some_and(|p| p == "Synced") && s.current_version == Some(version)
    })
}

fn records(ms: &ManagedSecret) -> Vec<VersionRecord> {
    ms.status
        .as_ref()
        .map(|s| s.versions.clone())
        .unwrap_or_default()
}

fn value_of(data: &keyhaven::secret_data::SecretData, key: &str) -> String {
    String::from_utf8(data.get(key).expect("key").to_vec()).unwrap()
}

/// Applies the same change to many objects at once (16 in flight).
async fn for_each_concurrently<F, Fut>(names: &[String], f: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    futures::stream::iter(names.iter().cloned().map(f))
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

#[tokio::test]
async fn switching_tier_keeps_old_versions_in_the_store_they_were_written_to() {
    const SECRETS: usize = 20;
    const VERSIONS: u64 = 5;
    let mut keys = TokenKeys(vec![]);
    let fx = Fixture::new("switch").await;
    let (hsm, kek) = hsm_setup(&fx, &mut keys).await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let dev = fx
        .profile_spec(
            "dev",
            json!({"source": internal, "default": true, "namespaceSelector": tier("dev"),
                   "history": {"keep": 10}}),
        )
        .await;
    let prod = fx
        .profile_spec(
            "prod",
            json!({"source": hsm, "default": true, "namespaceSelector": tier("prod"),
                   "history": {"keep": 10}}),
        )
        .await;
    fx.label_namespace(json!({"tier": "dev"}), json!({})).await;

    // 20 secrets pushed from Secrets, 5 versions each: 100 versions in the dev tier's store.
    let names: Vec<String> = (0..SECRETS).map(|i| format!("s{i}")).collect();
    let value = |name: &str, v: u64| format!("{name}-v{v}-{}", fx.ns);
    for v in 1..=VERSIONS {
        for_each_concurrently(&names, |name| {
            let fx = &fx;
            let value = value(&name, v);
            async move {
                fx.secret(&fx.ns, &format!("src-{name}"), &[("value", &value)])
                    .await;
                if v == 1 {
                    fx.managed_secret(
                        &name,
                        json!({"type": "key-value", "refreshInterval": "2s", "content": {"fromSecret": {"name": format!("src-{name}")}}}),
                    )
                    .await;
                }
            }
        })
        .await;
        wait_all(
            &fx,
            SECRETS,
            &format!("every secret at version {v}"),
            Duration::from_secs(120),
            |m| synced_at(m, v),
        )
        .await;
    }
    let before = all_managed(&fx).await;
    for ms in before.values() {
        let st = ms.status.as_ref().unwrap();
        assert_eq!(st.profile.as_deref(), Some(dev.as_str()));
        assert_eq!(records(ms).len(), VERSIONS as usize);
        assert!(
            records(ms).iter().all(|r| r.store == internal),
            "{:?}",
            records(ms)
        );
    }

    // The namespace moves to the prod tier: nothing moves, the native Secrets stay.
    fx.label_namespace(json!({"tier": "prod"}), json!({})).await;
    let switched = wait_all(
        &fx,
        SECRETS,
        "resolved to prod, the source Pending",
        Duration::from_secs(120),
        |m| {
            m.status.as_ref().is_some_and(|s| {
                s.profile.as_deref() == Some(prod.as_str())
                    && s.phase.is_some_and(|p| p == "Synced")
                    && s.targets
                        .iter()
                        .any(|t| t.store == hsm && t.state == "Pending")
            })
        },
    )
    .await;
    let source = &switched["s0"].status.as_ref().unwrap().targets[0];
    assert!(
        source
            .message
            .as_deref()
            .unwrap()
            .contains(&format!("stays in store {internal}")),
        "{source:?}"
    );
    let hsm_backend = hsm_store(&fx, &hsm, &kek);
    let internal_backend = fx.internal_store(&internal).await;
    for name in &names {
        let path = format!("{}/{name}", fx.ns);
        assert_eq!(
            hsm_backend.list_versions(&path).await.unwrap(),
            Vec::<u64>::new(),
            "nothing moved to {hsm}"
        );
        let native = fx.secret_data(&fx.ns, name).await.unwrap();
        assert_eq!(native["value"], value(name, VERSIONS));
    }

    // New versions go to the new source; the 100 old ones stay readable where they were written.
    for_each_concurrently(&names, |name| {
        let fx = &fx;
        let value = value(&name, VERSIONS + 1);
        async move {
            fx.secret(&fx.ns, &format!("src-{name}"), &[("value", &value)])
                .await;
        }
    })
    .await;
    let after = wait_all(
        &fx,
        SECRETS,
        "version 6 in the prod store",
        Duration::from_secs(120),
        |m| synced_at(m, VERSIONS + 1),
    )
    .await;
    let mut old_readable = 0;
    for (name, ms) in &after {
        let path = format!("{}/{name}", fx.ns);
        let recs = records(ms);
        let stores: Vec<&str> = recs.iter().map(|r| r.store.as_str()).collect();
        let mut expected = vec![internal.as_str(); VERSIONS as usize];
        expected.push(hsm.as_str());
        assert_eq!(stores, expected, "{name}");
        for v in 1..=VERSIONS {
            let old = internal_backend
                .read(&path, Some(v))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(value_of(&old.data, "value"), value(name, v));
            assert_eq!(
                old.stamp.unwrap().fingerprint.to_string(),
                recs[v as usize - 1].fingerprint
            );
            old_readable += 1;
        }
        assert_eq!(
            hsm_backend.list_versions(&path).await.unwrap(),
            vec![VERSIONS + 1],
            "{name}"
        );
        let new = hsm_backend.read(&path, None).await.unwrap().unwrap();
        assert_eq!(value_of(&new.data, "value"), value(name, VERSIONS + 1));
        assert_eq!(
            fx.secret_data(&fx.ns, name).await.unwrap()["value"],
            value(name, VERSIONS + 1)
        );
    }
    assert_eq!(old_readable, 100);

    // A rollback reads version 2 from the store it was written to, and writes it anew to
    // the prod store (by the plugin).
    let (code, out) = plugin(&[
        "-n",
        &fx.ns,
        "rollback",
        "s0",
        "2",
        "--reason",
        "e2e: back to 2",
    ]);
    assert_eq!(code, 0, "{out}");
    let rolled = fx.wait_synced("s0", VERSIONS + 2).await;
    let last = records(&rolled).pop().unwrap();
    assert_eq!(last.store, hsm);
    assert_eq!(last.fingerprint, records(&after["s0"])[1].fingerprint);
    assert_eq!(
        fx.secret_data(&fx.ns, "s0").await.unwrap()["value"],
        value("s0", 2)
    );
    let (code, out) = plugin(&["-n", &fx.ns, "versions", "s0"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&internal) && out.contains(&hsm), "{out}");

    // The store the old versions live in cannot be deleted under them.
    fx.cluster_api::<SecretStore>()
        .delete(&internal, &Default::default())
        .await
        .unwrap();
    let held = fx
        .wait_store(&internal, "deletion held", Duration::from_secs(60), |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "DeletionBlocked" && c.status == "True")
        })
        .await;
    let message = held.message.unwrap();
    assert!(
        message.contains(&format!("{SECRETS} ManagedSecret(s) keep versions in it")),
        "{message}"
    );
    fx.assert_values_never_leaked(&[&value("s0", 1), &value("s0", VERSIONS + 1)])
        .await;
}

#[tokio::test]
async fn a_migration_of_500_secrets_to_openbao_survives_two_kills_and_loses_nothing() {
    const SECRETS: usize = 500;
    const ROTATED: usize = 100;
    let mut fx = Fixture::new("migrate").await;
    let bed = Testbed::load();
    let root = bed.vault_root();
    // A KV v2 mount of this test's own: the store's count is exactly this test's objects.
    let mount = format!("e2e-{}", fx.ns);
    vaultrs::sys::mount::enable(&root, &mount, "kv-v2", None)
        .await
        .unwrap();
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let mount = self.0.clone();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async {
                    let _ =
                        vaultrs::sys::mount::disable(&Testbed::load().vault_root(), &mount).await;
                });
            })
            .join();
        }
    }
    let _unmount = Unmount(mount.clone());
    let op_ns = fx.namespace("op").await;
    assert_eq!(op_ns, fx.op.namespace);
    fx.secret(&op_ns, "bao-token", &[("token", &bed.vault_token)])
        .await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let bao = fx
        .store(
            "bao",
            json!({"vault": {"server": bed.vault_addr, "mount": mount, "version": "v2",
                "insecureHTTP": true, "auth": {"tokenSecretRef": {"name": "bao-token", "key": "token"}}}}),
        )
        .await;
    let profile = fx.profile("p", &internal, &[]).await;

    // 500 generated passwords, 100 of them rotated once: 600 versions in the internal store.
    let names: Vec<String> = (0..SECRETS).map(|i| format!("m{i:03}")).collect();
    let started = Instant::now();
    for_each_concurrently(&names, |name| {
        let fx = &fx;
        let profile = profile.clone();
        async move {
            fx.managed_secret(
                &name,
                json!({"profile": profile, "type": "password", "content": {"generate": {"length": 32}}}),
            )
            .await;
        }
    })
    .await;
    wait_all(
        &fx,
        SECRETS,
        "every secret at version 1",
        Duration::from_secs(600),
        |m| synced_at(m, 1),
    )
    .await;
    eprintln!(
        "{SECRETS} secrets created and synced in {:?}",
        started.elapsed()
    );
    let rotated: Vec<String> = names[..ROTATED].to_vec();
    let managed_api = fx.ns_api::<ManagedSecret>(&fx.ns);
    for_each_concurrently(&rotated, |name| {
        let api = managed_api.clone();
        async move {
            let patch = json!({"metadata": {"annotations": {"keyhaven.io/rotate": "e2e-1"}}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
    })
    .await;
    let before = wait_all(
        &fx,
        SECRETS,
        "rotated secrets at version 2",
        Duration::from_secs(300),
        |m| synced_at(m, if m.name_any().as_str() < "m100" { 2 } else { 1 }),
    )
    .await;
    // What every version holds, read from the internal store, and what each native Secret holds.
    let internal_backend = fx.internal_store(&internal).await;
    let mut values: BTreeMap<(String, u64), String> = BTreeMap::new();
    for (name, ms) in &before {
        let path = format!("{}/{name}", fx.ns);
        for r in records(ms) {
            let v = internal_backend
                .read(&path, Some(r.version))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(v.stamp.unwrap().fingerprint.to_string(), r.fingerprint);
            values.insert((name.clone(), r.version), value_of(&v.data, "password"));
        }
    }
    assert_eq!(values.len(), SECRETS + ROTATED);
    assert_eq!(internal_backend.count().await.unwrap(), SECRETS as u64);
    let natives: BTreeMap<String, String> = futures::stream::iter(names.clone())
        .map(|n| {
            let fx = &fx;
            async move {
                let data = fx.secret_data(&fx.ns, &n).await.unwrap();
                Ok::<_, ()>((n, data["password"].clone()))
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await
        .unwrap();

    // The plugin starts it: bao becomes the source, internal the store moved out of.
    let migration_started = Instant::now();
    let (code, out) = plugin(&["migrate", &profile, "--to", &bao]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("migrating from store {internal} to store {bao}")),
        "{out}"
    );

    // Watch the internal store drain while the operator is killed twice.
    let stores: Api<SecretStore> = fx.cluster_api();
    let profiles: Api<VaultProfile> = fx.cluster_api();
    let mut draining_counts: Vec<u64> = vec![];
    // Progress counted from the ManagedSecrets themselves (the profile's status follows
    // them every few seconds, too late to aim a kill).
    for kill_at in [100, 300] {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Some(s) = stores.get(&internal).await.unwrap().status
                && s.phase == Some(StorePhase::Draining)
                && let Some(n) = s.secrets
            {
                draining_counts.push(n);
            }
            let moved = moved_out(&fx, &internal).await;
            if moved >= kill_at {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "migration stuck at {moved} before {kill_at}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        fx.op.kill();
        let moved = moved_out(&fx, &internal).await;
        assert!(
            moved < SECRETS,
            "the migration ended before the kill at {kill_at}: make it slower to test this"
        );
        eprintln!("operator SIGKILLed with {moved}/{SECRETS} secrets moved");
        fx.op.restart();
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let done = loop {
        let p = profiles.get(&profile).await.unwrap();
        if let Some(s) = stores.get(&internal).await.unwrap().status
            && s.phase == Some(StorePhase::Draining)
            && let Some(n) = s.secrets
        {
            draining_counts.push(n);
        }
        if let Some(m) = p
            .status
            .as_ref()
            .and_then(|s| s.migration.clone())
            .filter(|m| m.phase == "Complete")
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "migration not Complete in 600s: {:#?}",
            p.status
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!(
        "migration Complete in {:?} with two SIGKILLs; internal store seen Draining with counts {:?}",
        migration_started.elapsed(),
        draining_counts
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .iter()
            .rev()
            .collect::<Vec<_>>()
    );
    assert_eq!(
        (done.total, done.moved, done.failed),
        (SECRETS as u64, SECRETS as u64, 0)
    );
    assert_eq!(done.versions_moved, (SECRETS + ROTATED) as u64);
    assert_eq!(
        (done.from.as_str(), done.to.as_str()),
        (internal.as_str(), bao.as_str())
    );

    // Every version is in OpenBao, same fingerprint, same value; none is left behind.
    let after = wait_all(
        &fx,
        SECRETS,
        "every secret Synced from bao",
        Duration::from_secs(120),
        |m| {
            m.status.as_ref().is_some_and(|s| {
                s.phase.is_some_and(|p| p == "Synced")
                    && s.targets
                        .iter()
                        .any(|t| t.store == bao && t.state == "Synced")
            })
        },
    )
    .await;
    for (name, ms) in &after {
        let path = format!("{}/{name}", fx.ns);
        let (old, new) = (records(&before[name]), records(ms));
        assert_eq!(old.len(), new.len(), "{name}");
        for (o, n) in old.iter().zip(&new) {
            assert_eq!(
                (o.version, &o.fingerprint, &o.created_at),
                (n.version, &n.fingerprint, &n.created_at),
                "{name}"
            );
            assert_eq!(n.store, bao, "{name} v{}", n.version);
            assert_eq!(n.moved_from.as_deref(), Some(internal.as_str()));
            // By value, read from OpenBao directly at the KV version the status records.
            let kv = n.store_version.expect("a KV v2 version");
            let read: BTreeMap<String, String> =
                vaultrs::kv2::read_version(&root, &mount, &path, kv)
                    .await
                    .unwrap();
            assert_eq!(
                read["password"],
                values[&(name.clone(), n.version)],
                "{name} v{}",
                n.version
            );
        }
        assert_eq!(
            internal_backend.list_versions(&path).await.unwrap(),
            Vec::<u64>::new(),
            "{name} left in {internal}"
        );
        assert_eq!(
            fx.secret_data(&fx.ns, name).await.unwrap()["password"],
            natives[name],
            "{name}: the native Secret changed"
        );
    }
    assert_eq!(internal_backend.count().await.unwrap(), 0);

    // The store counts: internal empty and Active again, bao holding the 500.
    fx.wait_store(
        &internal,
        "Active and empty",
        Duration::from_secs(60),
        |s| s.phase == Some(StorePhase::Active) && s.secrets == Some(0),
    )
    .await;
    let bao_status = fx
        .wait_store(&bao, "holding 500", Duration::from_secs(120), |s| {
            s.secrets == Some(SECRETS as u64)
        })
        .await;
    assert_eq!(bao_status.phase, Some(StorePhase::Active));
    assert!(
        draining_counts.len() >= 2 && draining_counts.first() > draining_counts.last(),
        "the internal store was not seen Draining with a falling count: {draining_counts:?}"
    );
    fx.wait_event(
        "MigrationComplete",
        &format!(
            "{SECRETS} secret(s), {} version(s) moved",
            SECRETS + ROTATED
        ),
    )
    .await;
    let (code, out) = plugin(&["migrate", &profile, "--to", &bao]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Complete: 500/500 secrets moved, 0 failed, 600 versions"),
        "{out}"
    );
    let (code, out) = plugin(&["stores", "-l", &format!("keyhaven.io/e2e-scope={}", fx.ns)]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&internal) && l.contains(" 0 ") && l.contains("Active")),
        "{out}"
    );
}

#[tokio::test]
async fn an_older_version_written_to_openbao_leaves_the_newer_one_current() {
    let fx = Fixture::new("older").await;
    let bed = Testbed::load();
    let op_ns = fx.namespace("op").await;
    fx.secret(&op_ns, "bao-token", &[("token", &bed.vault_token)])
        .await;
    let fingerprinter = keyhaven::crypto::OperatorKeys::load_or_create(fx.client.clone(), &op_ns)
        .await
        .unwrap()
        .fingerprinter;
    for (mount, version) in [("secret", "v2"), ("kv", "v1")] {
        let provider: keyhaven::api::VaultProvider = serde_json::from_value(json!({
            "server": bed.vault_addr, "mount": mount, "version": version,
            "insecureHTTP": true, "auth": {"tokenSecretRef": {"name": "bao-token", "key": "token"}}}))
        .unwrap();
        let store = keyhaven::backend::VaultStore::new(
            "bao",
            &provider,
            keyhaven::backend::SessionSource {
                kube: fx.client.clone(),
                operator_namespace: op_ns.clone(),
                service_account: "keyhaven".into(),
            },
        )
        .unwrap();
        let path = format!("e2e/{}/older-{version}", fx.ns);
        let value = |n: u64| {
            let mut d = keyhaven::secret_data::SecretData::new();
            d.insert("value", format!("v{n}").into_bytes());
            d
        };
        let stamp = |n: u64| keyhaven::backend::VersionStamp {
            version: n,
            fingerprint: fingerprinter
                .content(&fx.ns, "key-value", &value(n))
                .current()
                .clone(),
            owner: None,
        };
        // Version 3 first (written after a source switch), then the history migrated in.
        for n in [3, 1, 2, 2] {
            store.write(&path, &stamp(n), &value(n)).await.unwrap();
        }
        let current = store.read(&path, None).await.unwrap().unwrap();
        assert_eq!(value_of(&current.data, "value"), "v3", "{mount}");
        assert_eq!(current.stamp.unwrap().version, 3, "{mount}");
        assert_eq!(store.list_versions(&path).await.unwrap(), vec![1, 2, 3]);
        for n in 1..=3 {
            let read = store.read(&path, Some(n)).await.unwrap().unwrap();
            assert_eq!(value_of(&read.data, "value"), format!("v{n}"), "{mount}");
        }
        if version == "v2" {
            // Applications reading the path see the current value as the latest KV version.
            let latest: BTreeMap<String, String> =
                vaultrs::kv2::read(&bed.vault_root(), mount, &path)
                    .await
                    .unwrap();
            assert_eq!(latest["value"], "v3");
        }
        store.delete(&path).await.unwrap();
    }
}
