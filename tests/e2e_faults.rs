//! End-to-end: reliability under faults (issue 20). Each test puts hundreds of ManagedSecrets
//! under load on the real bed, injects one class of fault (a server hung, killed and
//! restarted; the HSM token gone; the operator SIGKILLed again and again; a leader lost
//! mid-converge; a store switched mid-write) and ends with the same check
//! ([`e2e::faults::check`]): every native Secret holds its last good value, every version
//! history has no gap and no duplicate, every store agrees with the status. While the fault
//! lasts, a watcher fails the test if any native Secret is deleted, emptied or holds a value
//! nobody wrote. Each test prints (and appends to `target/tmp/faults-report.txt`) the
//! recovery time after the fault ends and the change latency during it.
//!
//! The tests stop and restart servers the whole bed shares, so they run one at a time
//! ([`e2e::faults::SERIAL`]) and restore the bed even when they fail ([`Paused`]).

mod e2e;

use e2e::eventually;
use e2e::faults::{self, Load, Paused, SERIAL, Stores, converge, percentile, report, testbed};
use e2e::fixture::{Fixture, versions};
use e2e::hsm::{TokenKeys, bed_provider, hsm_setup, hsm_store, kek_label};
use e2e::operator::Operator;
use futures::StreamExt as _;
use keyhaven::api::{KekRotationPhase, ManagedSecret, MigrationPhase, SecretStore, VaultProfile};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use rand::{RngExt as _, SeedableRng as _};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Secrets under load in each fault test (the leader test converges 1,000).
const LOAD: usize = 200;
/// A change every 50 ms: 20 changes a second across the load.
const WRITE_EVERY: Duration = Duration::from_millis(50);
/// How long recovery may take before the test fails. After an etcd restart the API server
/// holds requests up to its own 60 s timeout, and recovery has measured 43-94 s.
const RECOVERY: Duration = Duration::from_secs(180);

/// A fixture with a vault source and an internal sync target, and the stores as the end
/// check reads them.
async fn bao_and_internal(name: &str) -> (Fixture, String, Stores) {
    let fx = Fixture::new(name).await;
    faults::operator_namespace(&fx).await;
    let bao = fx.bao_store("bao", "secret", "v2").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &bao, &[&internal]).await;
    let mut stores = Stores::new();
    stores.insert(bao.clone(), faults::bao_backend(&fx, &bao));
    stores.insert(
        internal.clone(),
        Arc::new(fx.internal_store(&internal).await),
    );
    (fx, profile, stores)
}

/// After a fault that is over at once (a restart), the writer goes on this long, so that the
/// latencies "during" it are those of the changes that met the restarted server.
const AFTER_INSTANT: Duration = Duration::from_secs(10);

/// Runs the writer for 3 s, holds `fault` for as long as it lasts (the writer keeps
/// writing; after a fault shorter than 10 s, for [`AFTER_INSTANT`] more), stops the writer,
/// and reports the recovery (from the writer's stop until the end check passes) and the
/// latencies of the changes written since the fault began.
async fn under_fault<F, Fut>(fx: &Fixture, load: &mut Load, stores: &Stores, name: &str, fault: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    load.start_writes(fx.client.clone(), WRITE_EVERY);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let began = Instant::now();
    fault().await;
    if began.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(AFTER_INSTANT).await;
    }
    load.stop_writes();
    let (recovery, checked) = converge(fx, &load.names, stores, RECOVERY).await;
    let mut during = load.latencies_since(began);
    report(name, recovery, &mut during, load);
    println!("  checked {checked:?}");
    assert_eq!(load.violations(), Vec::<String>::new(), "{name}");
}

#[tokio::test]
async fn openbao_hung_for_60_s_then_killed_and_restarted_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (mut fx, profile, stores) = bao_and_internal("fault-bao").await;
    let mut load = Load::start(&fx, &profile, LOAD, "2s").await;
    under_fault(&fx, &mut load, &stores, "openbao hung 60 s", || async {
        let _paused = Paused::start("openbao");
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    under_fault(
        &fx,
        &mut load,
        &stores,
        "openbao killed and restarted",
        || async {
            testbed("restart", "openbao");
        },
    )
    .await;
    assert!(fx.op.is_running(), "the operator exited");
}

#[tokio::test]
async fn kube_apiserver_hung_and_restarted_and_etcd_restarted_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let (mut fx, profile, stores) = bao_and_internal("fault-api").await;
    let mut load = Load::start(&fx, &profile, LOAD, "2s").await;
    under_fault(
        &fx,
        &mut load,
        &stores,
        "kube-apiserver hung 20 s",
        || async {
            let _paused = Paused::start("kube-apiserver");
            tokio::time::sleep(Duration::from_secs(20)).await;
        },
    )
    .await;
    under_fault(
        &fx,
        &mut load,
        &stores,
        "kube-apiserver restarted",
        || async {
            testbed("restart", "kube-apiserver");
        },
    )
    .await;
    under_fault(&fx, &mut load, &stores, "etcd restarted", || async {
        testbed("restart", "etcd");
    })
    .await;
    assert!(fx.op.is_running(), "the operator exited");
}

#[tokio::test]
async fn the_hsm_token_gone_mid_sync_then_restored_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut keys = TokenKeys(vec![]);
    let mut fx = Fixture::new("fault-hsm").await;
    let (hsm, kek) = hsm_setup(&fx, &mut keys).await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &internal, &[&hsm]).await;
    let mut stores = Stores::new();
    stores.insert(
        internal.clone(),
        Arc::new(fx.internal_store(&internal).await),
    );
    stores.insert(hsm.clone(), Arc::new(hsm_store(&fx, &hsm, &kek)));
    let mut load = Load::start(&fx, &profile, LOAD, "2s").await;
    under_fault(
        &fx,
        &mut load,
        &stores,
        "softhsm token unreadable 20 s",
        || async {
            let _paused = Paused::start("softhsm");
            tokio::time::sleep(Duration::from_secs(20)).await;
        },
    )
    .await;
    assert!(fx.op.is_running(), "the operator exited");
}

/// The seed of the SIGKILL test: `KEYHAVEN_FAULT_SEED` replays a failed run.
fn seed() -> u64 {
    let seed = std::env::var("KEYHAVEN_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("KEYHAVEN_FAULT_SEED={seed}");
    seed
}

#[tokio::test]
async fn the_operator_sigkilled_100_times_mid_push_rotate_rollback_migrate_and_kek_rotation() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut keys = TokenKeys(vec![]);
    let mut fx = Fixture::new("fault-kill").await;
    let (hsm, _kek) = hsm_setup(&fx, &mut keys).await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    faults::operator_namespace(&fx).await;
    let bao = fx.bao_store("bao", "secret", "v2").await;
    let profile = fx.profile("p", &internal, &[&hsm]).await;
    let mut load = Load::start(&fx, &profile, 50, "1s").await;
    // Generated secrets, for rotations and rollbacks.
    let generated: Vec<String> = (0..20).map(|i| format!("g-{i}")).collect();
    for g in &generated {
        fx.managed_secret(
            g,
            json!({"profile": profile, "type": "password", "content": {"generate": {}}}),
        )
        .await;
    }
    for g in &generated {
        fx.wait_synced(g, 1).await;
    }
    let managed: Api<ManagedSecret> = fx.ns_api(&fx.ns);
    let profiles: Api<VaultProfile> = fx.cluster_api();
    let stores_api: Api<SecretStore> = fx.cluster_api();
    let new_kek = kek_label(&fx, "kek2");
    keys.0.push(new_kek.clone());
    let pp = PatchParams::default();
    load.start_writes(fx.client.clone(), Duration::from_millis(100));
    let began = Instant::now();
    let (mut rotations, mut rollbacks) = (0, 0);
    for kill in 1..=100 {
        // Work in flight: a rotation or a rollback of a generated secret now and then,
        // the migration at the 30th kill and the KEK rotation at the 60th.
        let g = &generated[rng.random_range(0..generated.len())];
        match rng.random_range(0..4) {
            0 => {
                let patch = json!({"metadata": {"annotations": {"keyhaven.io/rotate": format!("k{kill}")}}});
                managed.patch(g, &pp, &Patch::Merge(&patch)).await.unwrap();
                rotations += 1;
            }
            1 => {
                let ms = managed.get(g).await.unwrap();
                let current = ms.status.and_then(|s| s.current_version).unwrap_or(1);
                if current > 1 {
                    let patch = json!({"spec": {"rollbackTo": current - 1}});
                    managed.patch(g, &pp, &Patch::Merge(&patch)).await.unwrap();
                    rollbacks += 1;
                }
            }
            _ => {}
        }
        if kill == 30 {
            let patch = json!({"spec": {"source": bao, "migrateFrom": internal}});
            profiles
                .patch(&profile, &pp, &Patch::Merge(&patch))
                .await
                .unwrap();
        }
        if kill == 60 {
            let mut provider = bed_provider(&new_kek);
            provider["pkcs11"]["kekLabel"] = json!(new_kek);
            let patch = json!({"spec": {"provider": provider}});
            stores_api
                .patch(&hsm, &pp, &Patch::Merge(&patch))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        fx.op.kill();
        fx.op.restart();
    }
    load.stop_writes();
    println!(
        "100 SIGKILLs in {:.0} s: {rotations} rotations, {rollbacks} rollbacks",
        began.elapsed().as_secs_f64()
    );
    let ended = Instant::now();
    // The migration completes and the KEK rotation too, then everything agrees.
    let migrated = eventually(RECOVERY, || async {
        let p = profiles.get(&profile).await.ok()?;
        let phase = p.status?.migration?.phase;
        (phase == MigrationPhase::Complete).then_some(())
    })
    .await;
    assert!(
        migrated.is_some(),
        "the migration did not complete (seed {seed})"
    );
    let rotated = eventually(RECOVERY, || async {
        let s = stores_api.get(&hsm).await.ok()?.status?;
        let r = s.kek_rotation?;
        (r.phase == KekRotationPhase::Complete && r.to == new_kek).then_some(())
    })
    .await;
    assert!(
        rotated.is_some(),
        "the KEK rotation did not complete (seed {seed})"
    );
    let mut stores = Stores::new();
    stores.insert(bao.clone(), faults::bao_backend(&fx, &bao));
    stores.insert(
        internal.clone(),
        Arc::new(fx.internal_store(&internal).await),
    );
    stores.insert(hsm.clone(), Arc::new(hsm_store(&fx, &hsm, &new_kek)));
    let mut names = load.names.clone();
    names.extend(generated.iter().cloned());
    let checking = Instant::now();
    let (converged, checked) = converge(&fx, &names, &stores, RECOVERY).await;
    // From the last kill until the migration, the KEK rotation and the end check were done.
    let recovery = (checking - ended) + converged;
    // Every version moved to the new source; nothing is left in the old one.
    for ms in managed.list(&ListParams::default()).await.unwrap() {
        let status = ms.status.clone().unwrap();
        let old = stores[&internal]
            .list_versions(&ms.store_path())
            .await
            .unwrap();
        assert_eq!(
            old,
            Vec::<u64>::new(),
            "{} left in {internal} (seed {seed})",
            ms.metadata.name.clone().unwrap()
        );
        assert!(
            status.versions.iter().all(|v| v.store == bao),
            "{}: {:?} (seed {seed})",
            ms.metadata.name.clone().unwrap(),
            versions(&ms)
        );
    }
    let mut during = load.latencies_since(began);
    report("operator SIGKILLed 100 times", recovery, &mut during, &load);
    println!("  checked {checked:?}; seed {seed}");
    assert_eq!(load.violations(), Vec::<String>::new(), "seed {seed}");
}

/// Lease duration of the electing operators.
const LEASE_SECS: u64 = 4;

fn electing(fx: &Fixture, name: &str) -> Operator {
    Operator::start_with(
        &fx.kubeconfig,
        &fx.ns,
        &format!("-{name}"),
        &[
            "--leader-elect",
            "--lease-duration",
            &LEASE_SECS.to_string(),
            "--lease-renew-margin",
            "1",
            "--leader-election-identity",
            name,
        ],
    )
}

#[tokio::test]
async fn a_leader_lost_during_a_1000_secret_converge_writes_no_version_twice() {
    let _serial = SERIAL.lock().await;
    let mut fx = Fixture::new("fault-leader").await;
    let internal = fx.store("internal", json!({"internal": {}})).await;
    faults::operator_namespace(&fx).await;
    let bao = fx.bao_store("bao", "secret", "v2").await;
    let profile = fx.profile("p", &internal, &[&bao]).await;
    fx.op.kill();
    let mut a = electing(&fx, "a");
    let mut b = electing(&fx, "b");
    let n = 1000;
    let names: Vec<String> = (0..n).map(|i| format!("g-{i}")).collect();
    let managed: Api<ManagedSecret> = fx.ns_api(&fx.ns);
    let t0 = Instant::now();
    let pp = PatchParams::apply("e2e-load").force();
    futures::stream::iter(names.clone())
        .for_each_concurrent(16, |name| {
            let (managed, pp, profile) = (managed.clone(), pp.clone(), profile.clone());
            async move {
                let ms = json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
                    "metadata": {"name": name},
                    "spec": {"profile": profile, "type": "password", "content": {"generate": {}}}});
                managed.patch(&name, &pp, &Patch::Apply(&ms)).await.unwrap();
            }
        })
        .await;
    // Kill whichever leads once a third has converged.
    let synced = || async {
        let list = managed.list(&ListParams::default()).await.ok()?;
        Some(
            list.items
                .iter()
                .filter(|m| m.status.as_ref().and_then(|s| s.current_version).is_some())
                .count(),
        )
    };
    eventually(Duration::from_secs(120), || async {
        synced().await.filter(|c| *c >= n / 3)
    })
    .await
    .expect("a third converged");
    let lease: Api<k8s_openapi::api::coordination::v1::Lease> = fx.ns_api(&fx.op.namespace);
    let holder = lease
        .get("keyhaven-leader")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap();
    let at_kill = synced().await.unwrap();
    let killed = Instant::now();
    match holder.as_str() {
        "a" => a.kill(),
        _ => b.kill(),
    }
    let mut stores = Stores::new();
    stores.insert(bao.clone(), faults::bao_backend(&fx, &bao));
    stores.insert(
        internal.clone(),
        Arc::new(fx.internal_store(&internal).await),
    );
    let (recovery, checked) = converge(&fx, &names, &stores, Duration::from_secs(300)).await;
    println!(
        "FAULT leader SIGKILLed at {at_kill}/{n} converged: {n} converged {:.1} s after the kill ({:.1} s after the first create); checked {checked:?}",
        recovery.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    // Generated once, by one leader: version 1 only, in the status and in every store.
    for ms in managed.list(&ListParams::default()).await.unwrap() {
        assert_eq!(versions(&ms), [1], "{}", ms.metadata.name.clone().unwrap());
        for store in stores.values() {
            assert_eq!(store.list_versions(&ms.store_path()).await.unwrap(), [1]);
        }
    }
    let survivor = if holder == "a" { &mut b } else { &mut a };
    assert!(survivor.is_running());
    let _ = killed;
}

#[tokio::test]
async fn a_store_switched_while_writes_are_in_flight_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (fx, profile, stores) = bao_and_internal("fault-switch").await;
    let internal = fx.scoped("internal");
    let mut load = Load::start(&fx, &profile, LOAD, "2s").await;
    let profiles: Api<VaultProfile> = fx.cluster_api();
    under_fault(
        &fx,
        &mut load,
        &stores,
        "source switched mid-write",
        || async {
            // The internal store (a sync target until now) becomes the only store.
            let patch = json!({"spec": {"source": internal, "syncTargets": []}});
            profiles
                .patch(&profile, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        },
    )
    .await;
    // Versions written after the switch live in the new source.
    let managed: Api<ManagedSecret> = fx.ns_api(&fx.ns);
    let switched = managed
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|m| {
            m.status
                .as_ref()
                .and_then(|s| s.versions.last())
                .is_some_and(|v| v.store == internal)
        })
        .count();
    assert!(switched > 0, "no version was written to the new source");
    let _ = percentile;
}
