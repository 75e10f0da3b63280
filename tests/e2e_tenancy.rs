//! Tenant isolation on the real bed: a ManagedSecret of namespace A cannot read, overwrite
//! or issue from a path of namespace B's secret space in a store both use (the bed's
//! OpenBao); a path the profile shares with A read-only syncs and refuses A's push; a
//! profile maps the space elsewhere; a profile without isolation says so.

mod e2e;

use e2e::Testbed;
use e2e::fixture::Fixture;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use vaultrs::client::VaultClient;
use vaultrs::kv2;

/// The bed's OpenBao as a store of this test's operator (root token in its namespace).
async fn openbao(fx: &Fixture, bed: &Testbed) -> String {
    let op_ns = fx.namespace("op").await;
    assert_eq!(op_ns, fx.op.namespace);
    fx.secret(&op_ns, "bao-token", &[("token", &bed.vault_token)])
        .await;
    fx.store(
        "bao",
        json!({"vault": {"server": bed.vault_addr, "mount": "secret", "version": "v2",
            "requestTimeout": "5s", "insecureHTTP": true,
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

/// Waits until `name` is refused with `reason` and an Event says so; its native Secret was
/// never made.
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

fn ms(profile: &str, type_: &str, path: &str, content: Value) -> Value {
    json!({"profile": profile, "type": type_, "path": path, "content": content,
        "refreshInterval": "2s"})
}

#[tokio::test]
async fn a_tenant_reaches_only_its_own_secret_space() {
    let bed = Testbed::load();
    let root = bed.vault_root();
    let fx = Fixture::new("tenancy").await;
    let other = fx.namespace("b").await;
    let bao = openbao(&fx, &bed).await;
    let profile = fx.profile("p", &bao, &[]).await;
    // B's secret, written in B's space as B's keyhaven would, and a path B shares.
    let b_path = format!("{other}/db");
    let b_value = json!({"password": "b-precious-e2e-tenancy"});
    kv2::set(&root, "secret", &b_path, &b_value).await.unwrap();
    let before = held(&root, &b_path).await;

    // Read: fromStore of B's path.
    fx.managed_secret(
        "steal",
        ms(&profile, "password", &b_path, json!({"fromStore": {}})),
    )
    .await;
    refused(&fx, "steal", "PathNotInNamespace", &b_path).await;
    // Write: a push and a generation to B's path.
    fx.secret(&fx.ns, "mine", &[("password", "a-chosen-e2e-tenancy")])
        .await;
    fx.managed_secret(
        "overwrite",
        ms(
            &profile,
            "password",
            &b_path,
            json!({"fromSecret": {"name": "mine"}}),
        ),
    )
    .await;
    refused(&fx, "overwrite", "PathNotInNamespace", &b_path).await;
    fx.managed_secret(
        "regenerate",
        ms(
            &profile,
            "password",
            &b_path,
            json!({"generate": {"length": 24}}),
        ),
    )
    .await;
    refused(&fx, "regenerate", "PathNotInNamespace", &b_path).await;
    // Issue from B's CA: the issuer itself points outside A's space.
    fx.managed_secret(
        "ca",
        ms(
            &profile,
            "certificate",
            &format!("{other}/ca"),
            json!({"fromStore": {}}),
        ),
    )
    .await;
    fx.managed_secret(
        "leaf",
        json!({"profile": profile, "type": "certificate",
            "content": {"generate": {"issuerRef": {"name": "ca"}}}}),
    )
    .await;
    refused(&fx, "leaf", "PathNotInNamespace", &format!("{other}/ca")).await;
    fx.managed_secret(
        "intermediate",
        json!({"profile": profile, "type": "certificate",
            "content": {"generate": {"isCA": true, "issuerRef": {"name": "ca"}}}}),
    )
    .await;
    fx.wait_not_ready("intermediate", "IntermediateCANotAllowed")
        .await;
    assert_eq!(held(&root, &b_path).await, before, "B's value is untouched");

    // A's own space works as before: the default path and any path under `<ns>/`.
    fx.managed_secret(
        "own",
        ms(
            &profile,
            "password",
            &format!("{}/app/db", fx.ns),
            json!({"fromSecret": {"name": "mine"}}),
        ),
    )
    .await;
    fx.wait_synced("own", 1).await;
    assert_eq!(
        held(&root, &format!("{}/app/db", fx.ns)).await.0["password"],
        "a-chosen-e2e-tenancy"
    );

    // A path B's owner shares with A (by the namespace's name label): read, never written.
    let shared = format!("{other}/shared/flags");
    kv2::set(
        &root,
        "secret",
        &shared,
        &json!({"password": "shared-e2e-tenancy"}),
    )
    .await
    .unwrap();
    let sharing = fx
        .profile_spec(
            "sharing",
            json!({"source": bao, "sharedPaths": [{"path": format!("{other}/shared/"),
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": fx.ns}}}]}),
        )
        .await;
    fx.managed_secret(
        "reader",
        ms(&sharing, "password", &shared, json!({"fromStore": {}})),
    )
    .await;
    fx.wait_synced("reader", 1).await;
    assert_eq!(
        fx.secret_data(&fx.ns, "reader").await.unwrap()["password"],
        "shared-e2e-tenancy"
    );
    assert_eq!(
        held(&root, &shared).await.1,
        1,
        "the reader wrote nothing there"
    );
    fx.managed_secret(
        "pusher",
        ms(
            &sharing,
            "password",
            &shared,
            json!({"fromSecret": {"name": "mine"}}),
        ),
    )
    .await;
    refused(&fx, "pusher", "PathReadOnly", &shared).await;
    assert_eq!(held(&root, &shared).await.1, 1);

    // A profile maps the space elsewhere (a store of its own: OpenBao's KV v1 mount).
    let kv1 = fx
        .store(
            "kv1",
            json!({"vault": {"server": bed.vault_addr, "mount": "kv", "version": "v1",
                "requestTimeout": "5s", "insecureHTTP": true,
                "auth": {"tokenSecretRef": {"name": "bao-token", "key": "token"}}}}),
        )
        .await;
    let mapped = fx
        .profile_spec(
            "mapped",
            json!({"source": kv1, "secretSpace": {"prefix": "apps/{namespace}/"}}),
        )
        .await;
    let apps = format!("apps/{}/db", fx.ns);
    fx.managed_secret(
        "mapped",
        ms(
            &mapped,
            "password",
            &apps,
            json!({"fromSecret": {"name": "mine"}}),
        ),
    )
    .await;
    fx.wait_synced("mapped", 1).await;
    fx.managed_secret(
        "unmapped",
        ms(
            &mapped,
            "password",
            &format!("{}/db", fx.ns),
            json!({"fromSecret": {"name": "mine"}}),
        ),
    )
    .await;
    fx.wait_not_ready("unmapped", "PathNotInNamespace").await;
    // A profile without isolation says so (on a store of its own).
    let scratch = fx.namespace("scratch").await;
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
        condition(profile.clone(), "Isolated", "True").await.reason,
        "IsolationEnforced"
    );
    // Another space template over the same OpenBao mount (another SecretStore object) could
    // overlap A's space: both profiles say so and their secrets are refused.
    let bao_again = fx
        .store(
            "bao-again",
            json!({"vault": {"server": bed.vault_addr, "mount": "secret", "version": "v2",
                "requestTimeout": "5s", "insecureHTTP": true,
                "auth": {"tokenSecretRef": {"name": "bao-token", "key": "token"}}}}),
        )
        .await;
    fx.profile_spec(
        "nested",
        json!({"source": bao_again, "secretSpace": {"prefix": "teams/{namespace}/"}}),
    )
    .await;
    let c = condition(profile.clone(), "Conflict", "True").await;
    assert_eq!(c.reason, "SecretSpaceConflict", "{}", c.message);
    fx.poke_managed("own").await;
    fx.wait_not_ready("own", "SecretSpaceConflict").await;
    for p in [&b_path, &shared, &format!("{}/app/db", fx.ns)] {
        let _ = kv2::delete_metadata(&root, "secret", p).await;
    }
}
