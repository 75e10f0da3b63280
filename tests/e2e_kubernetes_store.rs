//! End-to-end tests of the stores' isolation (issue 16): a kubernetes store touches only the
//! Secrets carrying its labels and refuses the operator's namespace; a pkcs11 store may load
//! only a module on the operator's `--pkcs11-modules` list.

mod e2e;

use e2e::fixture::Fixture;
use e2e::operator::Work;
use k8s_openapi::api::core::v1::Secret;
use keyhaven::api::{ManagedSecret, StorePhase};
use serde_json::json;
use std::time::Duration;

/// The condition `Ready` of a ManagedSecret: its reason and message.
fn ready(ms: &ManagedSecret) -> (String, String) {
    let c = ms
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .expect("a Ready condition");
    (c.reason.clone(), c.message.clone())
}

/// A Secret of the store's namespace that keyhaven did not make, at the name a path maps to,
/// is neither read nor overwritten, and is not counted.
#[tokio::test]
async fn a_kubernetes_store_leaves_secrets_without_its_labels_alone() {
    let fx = Fixture::new("kstore-foreign").await;
    let ns = fx.store_namespace("x").await;
    let secrets = fx.ns_api::<Secret>(&ns);
    // Someone else's Secrets, at the names of the paths team-b/db and team-b/api.
    let (read_value, push_target) = ("foreign-read-e2e-kstore", "foreign-push-e2e-kstore");
    fx.secret(&ns, "team-b.db", &[("password", read_value)])
        .await;
    let before = fx
        .secret(&ns, "team-b.api", &[("api-key", push_target)])
        .await;
    let store = fx
        .store("kstore", json!({"kubernetes": {"namespace": ns}}))
        .await;
    // Isolation off: the store's own guard is what is tested here (secret spaces would
    // refuse these paths before the store is asked: tests/e2e_tenancy.rs).
    let profile = fx
        .profile_spec(
            "p",
            json!({"source": store, "secretSpace": {"isolation": "Disabled"}}),
        )
        .await;
    fx.wait_store(
        &store,
        "Active, counting nothing",
        Duration::from_secs(60),
        |s| s.phase == Some(StorePhase::Active) && s.secrets == Some(0),
    )
    .await;

    // fromStore: the foreign Secret reads as absent; no native Secret.
    fx.managed_secret(
        "reader",
        json!({"profile": profile, "type": "password", "path": "team-b/db",
            "content": {"fromStore": {}}}),
    )
    .await;
    fx.wait_not_ready("reader", "NotFoundInStore").await;
    assert_eq!(fx.secret_data(&fx.ns, "reader").await, None);

    // fromSecret: the push to the path is refused, nothing written.
    let pushed = "pushed-by-a-e2e-kstore";
    fx.secret(&fx.ns, "mine", &[("api-key", pushed)]).await;
    fx.managed_secret(
        "pusher",
        json!({"profile": profile, "type": "api-key", "path": "team-b/api",
            "content": {"fromSecret": {"name": "mine"}}}),
    )
    .await;
    let refused = fx.wait_not_ready("pusher", "PathOwnedElsewhere").await;
    let (_, message) = ready(&refused);
    assert!(
        message.contains(&format!(
            "store {store}, path team-b/api: writing: Secret {ns}/team-b.api exists without the store's labels"
        )),
        "{message}"
    );
    fx.wait_event("PathOwnedElsewhere", "without the store's labels")
        .await;
    // Reconciled again (a retry): still nothing written.
    fx.reconcile_managed("pusher", 1, &[Work::store_calls(&store, "write")])
        .await;
    let after = secrets.get("team-b.api").await.unwrap();
    assert_eq!(
        after.metadata.resource_version,
        before.metadata.resource_version
    );
    assert_eq!(after.metadata.labels, before.metadata.labels);
    assert_eq!(after.metadata.annotations, before.metadata.annotations);
    assert_eq!(after.data, before.data);
    assert_eq!(secrets.get_opt("team-b.api.v1").await.unwrap(), None);
    assert_eq!(fx.secret_data(&fx.ns, "pusher").await, None);
    fx.poke_store(&store).await;
    fx.wait_store(
        &store,
        "still counting nothing",
        Duration::from_secs(30),
        |s| s.secrets == Some(0),
    )
    .await;
    fx.assert_values_never_leaked(&[read_value, push_target, pushed])
        .await;
}

/// A kubernetes store over the operator's own namespace (its keys live there) and a pkcs11
/// store naming a module not on the allow-list are Invalid, and nothing is read or loaded.
#[tokio::test]
async fn stores_over_the_operators_namespace_or_an_unlisted_module_are_invalid() {
    let fx = Fixture::new("kstore-invalid").await;
    let opns = fx
        .store(
            "opns",
            json!({"kubernetes": {"namespace": fx.op.namespace}}),
        )
        .await;
    let status = fx
        .wait_store(&opns, "Invalid", Duration::from_secs(60), |s| {
            s.phase == Some(StorePhase::Invalid)
        })
        .await;
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains(&format!(
            "provider.kubernetes.namespace {} is the operator's namespace",
            fx.op.namespace
        )),
        "{message}"
    );
    // A ManagedSecret whose path names the operator's key Secret gets nothing.
    let profile = fx
        .profile_spec(
            "p",
            json!({"source": opns, "secretSpace": {"isolation": "Disabled"}}),
        )
        .await;
    fx.managed_secret(
        "keys",
        json!({"profile": profile, "type": "key-value", "path": "keyhaven-keys",
            "content": {"fromStore": {}}}),
    )
    .await;
    let ms = fx
        .wait_managed("keys", "Ready=False", |ms| {
            ms.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "False")
            })
        })
        .await;
    let (reason, message) = ready(&ms);
    assert_eq!(reason, "InvalidProvider", "{message}");
    assert!(message.contains("is the operator's namespace"), "{message}");
    let (_, metrics) = fx.reconcile_managed("keys", 2, &[]).await;
    for operation in [
        "read",
        "write",
        "list_versions",
        "delete",
        "health",
        "count",
    ] {
        assert_eq!(
            metrics.count(&Work::store_calls(&opns, operation)),
            0.0,
            "{operation} on the store over the operator's namespace"
        );
    }
    assert_eq!(fx.secret_data(&fx.ns, "keys").await, None);

    // A real PKCS#11 module of the bed, but not the one the operator was started with.
    let module = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so";
    let hsm = fx
        .store(
            "hsm",
            e2e::hsm::provider(module, "keyhaven", "e2e-unlisted"),
        )
        .await;
    let status = fx
        .wait_store(&hsm, "Invalid", Duration::from_secs(60), |s| {
            s.phase == Some(StorePhase::Invalid)
        })
        .await;
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains(&format!(
            "PKCS#11 module {module} is not on the operator's allow-list (--pkcs11-modules"
        )),
        "{message}"
    );
    let pid = fx.op.pid().expect("the operator runs");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps.contains("opensc-pkcs11"), "the module was loaded");
}
