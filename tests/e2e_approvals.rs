//! Approvals and compliance on the real bed: the operator serves its admission webhook (by
//! URL on loopback, this test's namespace only); people act through `kubectl --as` under
//! real RBAC (Roles granting, or not, the verb `approve` on managedsecrets). alice's create
//! waits PendingApproval with nothing written; alice cannot approve her own and carol
//! (no `approve`) is refused at admission; bob approves and it syncs; a rejected update
//! keeps the old value in the native Secret and in OpenBao; a changeSource waits; two
//! required approvals need two different approvers; a short expiry makes the request
//! Expired. Compliance: Deny refuses a short password (nothing written), Warn writes and
//! flags it, and changing the rules re-evaluates existing secrets with zero writes to
//! OpenBao (counted from its audit log).

mod e2e;

use e2e::Testbed;
use e2e::chart::kubectl_as;
use e2e::fixture::{Fixture, wait_until};
use e2e::people::{
    apply_as, decide, managed, pending, people, request_id, user_name, with_webhook,
};
use keyhaven::api::{ManagedSecret, ManagedSecretPhase, RequestState};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use vaultrs::kv2;

#[tokio::test]
async fn changes_wait_for_approval_by_someone_else_with_approve() {
    let bed = Testbed::load();
    let root = bed.vault_root();
    let (fx, _registered) = with_webhook("approvals").await;
    people(
        &fx,
        &[
            ("alice", "editor"),
            ("carol", "editor"),
            ("bob", "approver"),
            ("dave", "approver"),
        ],
    )
    .await;
    let store = fx.bao_store("bao", "secret", "v2").await;
    let copy = fx.store("copy", json!({"internal": {}})).await;
    let profile = fx
        .profile_spec(
            "four-eyes",
            json!({"source": store, "syncTargets": [copy], "limits": {"minRefreshInterval": "1s"},
                "approval": {"operations": ["create", "update", "changeSource", "delete"]}}),
        )
        .await;
    let path = format!("{}/app", fx.ns);

    // alice's create waits: nothing in OpenBao, no native Secret.
    apply_as(
        &fx,
        "alice",
        &json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "app-src", "namespace": fx.ns}, "stringData": {"token": "v-one"}}),
    )
    .await;
    let mut app = managed(
        &fx,
        "app",
        json!({"profile": profile, "type": "key-value", "refreshInterval": "1s",
            "content": {"fromSecret": {"name": "app-src"}}}),
    );
    apply_as(&fx, "alice", &app).await;
    let ms = pending(&fx, "app").await;
    let request = request_id(&ms);
    let approval = ms.status.as_ref().unwrap().approval.clone().unwrap();
    assert_eq!(approval.requested_by, user_name(&fx, "alice"));
    assert!(fx.secret_data(&fx.ns, "app").await.is_none());
    assert!(
        kv2::read::<BTreeMap<String, String>>(&root, "secret", &path)
            .await
            .is_err(),
        "written to OpenBao while pending"
    );
    // alice cannot approve her own; carol may not approve; bob may.
    let own = decide(&fx, "alice", "a-self", "app", &request, true).unwrap_err();
    assert!(own.contains("requester"), "{own}");
    let carol = decide(&fx, "carol", "c-1", "app", &request, true).unwrap_err();
    assert!(carol.contains("may not approve"), "{carol}");
    decide(&fx, "bob", "b-1", "app", &request, true).unwrap();
    let synced = fx.wait_synced("app", 1).await;
    let status = synced.status.unwrap();
    let approved = status.approval.unwrap();
    assert_eq!(approved.state, RequestState::Approved);
    // The decider is who created the decision, not what the object claimed.
    assert_eq!(approved.decisions[0].by, user_name(&fx, "bob"));
    assert_eq!(
        fx.secret_data(&fx.ns, "app").await.unwrap()["token"],
        "v-one"
    );
    fx.wait_event("Approved", &user_name(&fx, "bob")).await;

    // A rejected update keeps version 1 in the native Secret and in OpenBao.
    apply_as(
        &fx,
        "alice",
        &json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "app-src", "namespace": fx.ns}, "stringData": {"token": "v-two"}}),
    )
    .await;
    let ms = pending(&fx, "app").await;
    let update = request_id(&ms);
    assert_ne!(update, request);
    decide(&fx, "bob", "b-2", "app", &update, false).unwrap();
    let rejected = fx
        .wait_managed("app", "Rejected", |m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.phase == Some(ManagedSecretPhase::Rejected))
        })
        .await;
    let status = rejected.status.unwrap();
    assert_eq!(status.current_version, Some(1));
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(
        ready.message.contains("version 1 stays in force"),
        "{ready:?}"
    );
    assert!(
        status.targets.len() == 2 && status.targets.iter().all(|t| t.version == Some(1)),
        "{:?}",
        status.targets
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fx.secret_data(&fx.ns, "app").await.unwrap()["token"],
        "v-one"
    );
    let held: BTreeMap<String, String> = kv2::read(&root, "secret", &path).await.unwrap();
    assert_eq!(held["token"], "v-one");

    // A changeSource waits (the content too: new source, new value).
    apply_as(
        &fx,
        "alice",
        &json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "app-src2", "namespace": fx.ns}, "stringData": {"token": "v-three"}}),
    )
    .await;
    app["spec"]["content"] = json!({"fromSecret": {"name": "app-src2"}});
    apply_as(&fx, "alice", &app).await;
    let ms = pending(&fx, "app").await;
    let change = ms.status.as_ref().unwrap().approval.clone().unwrap();
    assert_eq!(change.operation.as_str(), "changeSource");
    assert_eq!(
        fx.secret_data(&fx.ns, "app").await.unwrap()["token"],
        "v-one"
    );
    decide(&fx, "dave", "d-1", "app", &change.id, true).unwrap();
    fx.wait_synced("app", 2).await;
    assert_eq!(
        fx.secret_data(&fx.ns, "app").await.unwrap()["token"],
        "v-three"
    );

    // Two required approvals need two different approvers.
    let two = fx
        .profile_spec(
            "two-eyes",
            json!({"source": store, "limits": {"minRefreshInterval": "1s"},
                "approval": {"operations": ["create"], "requiredApprovals": 2}}),
        )
        .await;
    apply_as(
        &fx,
        "alice",
        &managed(
            &fx,
            "db",
            json!({"profile": two, "type": "password", "refreshInterval": "1s",
                "content": {"generate": {"length": 24}}}),
        ),
    )
    .await;
    let ms = pending(&fx, "db").await;
    let id = request_id(&ms);
    decide(&fx, "bob", "b-3", "db", &id, true).unwrap();
    let again = decide(&fx, "bob", "b-4", "db", &id, true);
    // The webhook may not have seen bob's first decision counted yet: either it refuses
    // the second, or the controller does not count it.
    let still = fx
        .wait_managed("db", "one approval counted", |m| {
            m.status
                .as_ref()
                .and_then(|s| s.approval.as_ref())
                .is_some_and(|a| a.decisions.len() == 1)
        })
        .await;
    assert_eq!(
        still.status.unwrap().phase,
        Some(ManagedSecretPhase::PendingApproval),
        "one approver counted twice (second decision: {again:?})"
    );
    assert!(fx.secret_data(&fx.ns, "db").await.is_none());
    decide(&fx, "dave", "d-2", "db", &id, true).unwrap();
    fx.wait_synced("db", 1).await;

    // A short expiry: the request expires undecided.
    let short = fx
        .profile_spec(
            "short",
            json!({"source": store, "limits": {"minRefreshInterval": "1s"},
                "approval": {"operations": ["create"], "expiry": "3s"}}),
        )
        .await;
    apply_as(
        &fx,
        "alice",
        &managed(
            &fx,
            "late",
            json!({"profile": short, "type": "password", "refreshInterval": "1s",
                "content": {"generate": {"length": 24}}}),
        ),
    )
    .await;
    let ms = pending(&fx, "late").await;
    let id = request_id(&ms);
    let expired = fx
        .wait_managed("late", "ApprovalExpired", |m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.phase == Some(ManagedSecretPhase::ApprovalExpired))
        })
        .await;
    assert_eq!(
        expired.status.unwrap().approval.unwrap().state,
        RequestState::Expired
    );
    let late = decide(&fx, "bob", "b-5", "late", &id, true).unwrap_err();
    assert!(
        late.contains("Expired") || late.contains("expired"),
        "{late}"
    );
    assert!(fx.secret_data(&fx.ns, "late").await.is_none());

    // alice's deletion of app is held by the finalizer; she may neither drop the finalizer
    // nor approve it; bob's approval lets it go.
    let alice = user_name(&fx, "alice");
    let (ok, out) = kubectl_as(
        &alice,
        &[
            "-n",
            &fx.ns,
            "delete",
            "managedsecret",
            "app",
            "--wait=false",
        ],
        None,
    );
    assert!(ok, "{out}");
    let ms = pending(&fx, "app").await;
    let deletion = ms.status.as_ref().unwrap().approval.clone().unwrap();
    assert_eq!(deletion.operation.as_str(), "delete");
    assert_eq!(deletion.requested_by, alice);
    let unhook = json!({"metadata": {"finalizers": null}}).to_string();
    let (ok, out) = kubectl_as(
        &alice,
        &[
            "-n",
            &fx.ns,
            "patch",
            "managedsecret",
            "app",
            "--type",
            "merge",
            "-p",
            &unhook,
        ],
        None,
    );
    assert!(!ok && out.contains("removed by keyhaven only"), "{out}");
    let own = decide(&fx, "alice", "a-del", "app", &deletion.id, true).unwrap_err();
    assert!(own.contains("requester"), "{own}");
    assert_eq!(
        fx.secret_data(&fx.ns, "app").await.unwrap()["token"],
        "v-three"
    );
    decide(&fx, "bob", "b-del", "app", &deletion.id, true).unwrap();
    let gone = wait_until(Duration::from_secs(30), || async {
        fx.ns_api::<ManagedSecret>(&fx.ns)
            .get_opt("app")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "the approved deletion did not happen");
    fx.assert_values_never_leaked(&["v-one", "v-two", "v-three"])
        .await;
}

/// OpenBao's audit log: the write requests (create, update, patch, delete) on paths
/// containing `needle`, logged after byte `mark`.
fn bao_writes(bed: &Testbed, mark: u64, needle: &str) -> usize {
    use std::io::{Read, Seek, SeekFrom};
    let path = bed
        .vars
        .get("KEYHAVEN_OPENBAO_AUDIT_LOG")
        .expect("the bed exports KEYHAVEN_OPENBAO_AUDIT_LOG")
        .clone();
    let mut file = std::fs::File::open(&path).unwrap();
    file.seek(SeekFrom::Start(mark)).unwrap();
    let mut bytes = vec![];
    file.read_to_end(&mut bytes).unwrap();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["type"] == "request")
        .filter(|e| {
            matches!(
                e["request"]["operation"].as_str(),
                Some("create" | "update" | "patch" | "delete")
            )
        })
        .filter(|e| {
            e["request"]["path"]
                .as_str()
                .is_some_and(|p| p.contains(needle))
        })
        .count()
}

fn audit_mark(bed: &Testbed) -> u64 {
    std::fs::metadata(&bed.vars["KEYHAVEN_OPENBAO_AUDIT_LOG"])
        .unwrap()
        .len()
}

fn failing(ms: &ManagedSecret) -> Vec<String> {
    ms.status
        .as_ref()
        .and_then(|s| s.compliance.as_ref())
        .map(|c| c.failing.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn compliance_rules_refuse_or_flag_real_values_and_rechecks_write_nothing() {
    let bed = Testbed::load();
    let root = bed.vault_root();
    let fx = Fixture::new("compliance").await;
    let op_ns = fx.op.namespace.clone();
    // The operator makes its namespace as it starts.
    let started = wait_until(Duration::from_secs(30), || async {
        fx.cluster_api::<k8s_openapi::api::core::v1::Namespace>()
            .get_opt(&op_ns)
            .await
            .ok()
            .flatten()
    })
    .await;
    assert!(
        started.is_some(),
        "the operator never made namespace {op_ns}"
    );
    let store = fx.bao_store("bao", "secret", "v2").await;
    let rules = |enforcement: &str| {
        json!({"enforcement": enforcement,
            "password": {"minLength": 20, "minClasses": 3, "minEntropyBits": 80},
            "keys": {"allowedAlgorithms": ["ed25519"], "minEcBits": 384, "minRsaBits": 3072},
            "certificates": {"maxValidity": "2160h", "forbidSelfSignedLeaf": true},
            "requireExpiry": true})
    };
    // Each case: a real value of the type a rule checks, and the rule it breaks.
    fx.secret(&fx.ns, "short-pw", &[("password", "Sh0rt!pw")])
        .await;
    let rsa_pem = {
        use rsa::pkcs8::{EncodePrivateKey, LineEnding};
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string()
    };
    fx.secret(&fx.ns, "rsa-2048", &[("private-key", &rsa_pem)])
        .await;
    fx.secret(
        &fx.ns,
        "one-class",
        &[("password", "onlylowercaselettersherexyz")],
    )
    .await;
    fx.secret(
        &fx.ns,
        "repeats",
        &[("password", "Aa1!Aa1!Aa1!Aa1!Aa1!Aa1!")],
    )
    .await;
    fx.secret(
        &fx.ns,
        "no-expiry",
        &[("api-key", "kh_live_abcdefghijklmnopqrstuvwxyz012345")],
    )
    .await;
    let cases = [
        (
            "pw",
            json!({"type": "password", "content": {"fromSecret": {"name": "short-pw"}}}),
            &["password-min-length"][..],
        ),
        (
            "key",
            json!({"type": "private-key", "content": {"generate": {"algorithm": "ec"}}}),
            &["key-algorithm", "ec-min-bits"][..],
        ),
        (
            "cert",
            json!({"type": "certificate", "content": {"generate": {"algorithm": "ed25519", "validity": "8760h"}}}),
            &["certificate-max-validity", "certificate-self-signed-leaf"][..],
        ),
        (
            "apikey",
            json!({"type": "api-key", "content": {"fromSecret": {"name": "no-expiry"}}}),
            &["expiry-required"][..],
        ),
        (
            "rsa",
            json!({"type": "private-key", "content": {"fromSecret": {"name": "rsa-2048"}}}),
            &["key-algorithm", "rsa-min-bits"][..],
        ),
        (
            "classes",
            json!({"type": "password", "content": {"fromSecret": {"name": "one-class"}}}),
            &["password-min-classes"][..],
        ),
        (
            "entropy",
            json!({"type": "password", "content": {"fromSecret": {"name": "repeats"}}}),
            &["password-min-entropy"][..],
        ),
    ];
    for enforcement in ["Deny", "Warn"] {
        let profile = fx
            .profile_spec(
                &enforcement.to_lowercase(),
                json!({"source": store, "compliance": rules(enforcement)}),
            )
            .await;
        for (name, spec, broken) in &cases {
            let name = format!("{}-{name}", enforcement.to_lowercase());
            let mut spec = spec.clone();
            spec["profile"] = profile.clone().into();
            fx.managed_secret(&name, spec).await;
            let ms = match enforcement {
                "Deny" => {
                    fx.wait_managed(&name, "NonCompliant", |m| {
                        m.status
                            .as_ref()
                            .is_some_and(|s| s.phase == Some(ManagedSecretPhase::NonCompliant))
                    })
                    .await
                }
                _ => fx.wait_synced(&name, 1).await,
            };
            for rule in *broken {
                assert!(
                    failing(&ms).iter().any(|f| f == rule),
                    "{name}: {rule} not in {:?}",
                    failing(&ms)
                );
            }
            let compliant = ms
                .status
                .as_ref()
                .unwrap()
                .conditions
                .iter()
                .find(|c| c.type_ == "Compliant")
                .cloned()
                .unwrap();
            assert_eq!(compliant.status, "False", "{name}");
            let path = format!("{}/{name}", fx.ns);
            let stored = kv2::read::<BTreeMap<String, String>>(&root, "secret", &path).await;
            match enforcement {
                "Deny" => {
                    assert!(stored.is_err(), "{name}: written to OpenBao though refused");
                    assert!(fx.secret_data(&fx.ns, &name).await.is_none());
                }
                _ => assert!(stored.is_ok(), "{name}: not written under Warn"),
            }
        }
    }
    // max-version-age: a Warn profile flags a version older than its limit (no write).
    let aging = fx
        .profile_spec(
            "aging",
            json!({"source": store, "compliance": {"enforcement": "Warn", "maxVersionAge": "8s"}}),
        )
        .await;
    fx.managed_secret(
        "old",
        json!({"profile": aging, "type": "password", "content": {"generate": {"length": 24}}}),
    )
    .await;
    let fresh = fx.wait_synced("old", 1).await;
    assert!(failing(&fresh).is_empty(), "{:?}", failing(&fresh));
    let aged = fx
        .wait_managed("old", "max-version-age", |m| {
            failing(m).iter().any(|f| f == "max-version-age")
        })
        .await;
    assert_eq!(aged.status.unwrap().current_version, Some(1));
    fx.assert_values_never_leaked(&[
        "Sh0rt!pw",
        "kh_live_abcdefghijklmnopqrstuvwxyz012345",
        "onlylowercaselettersherexyz",
        "Aa1!Aa1!Aa1!Aa1!Aa1!Aa1!",
    ])
    .await;

    // 100 compliant passwords; then a stricter rule re-evaluates them all, writing nothing.
    let lenient = json!({"source": store,
        "compliance": {"enforcement": "Warn", "password": {"minLength": 16}}});
    let many = fx.profile_spec("many", lenient.clone()).await;
    let created = audit_mark(&bed);
    for i in 0..100 {
        fx.managed_secret(
            &format!("m-{i}"),
            json!({"profile": many, "type": "password", "content": {"generate": {"length": 24}}}),
        )
        .await;
    }
    for i in 0..100 {
        let ms = fx.wait_synced(&format!("m-{i}"), 1).await;
        assert!(failing(&ms).is_empty());
    }
    // The counter counts: creating them wrote each one.
    let first = bao_writes(&bed, created, &format!("{}/m-", fx.ns));
    assert!(
        first >= 100,
        "creating 100 secrets: {first} OpenBao writes logged"
    );
    let mark = audit_mark(&bed);
    let mut stricter = lenient;
    stricter["compliance"]["password"]["minLength"] = 32.into();
    fx.profile_spec("many", stricter).await;
    for i in 0..100 {
        let ms = fx
            .wait_managed(&format!("m-{i}"), "re-evaluated", |m| {
                failing(m).iter().any(|f| f == "password-min-length")
            })
            .await;
        assert_eq!(ms.status.unwrap().current_version, Some(1));
    }
    let writes = bao_writes(&bed, mark, &fx.ns);
    eprintln!("re-evaluating 100 secrets: {writes} OpenBao writes");
    assert_eq!(writes, 0, "re-evaluation wrote to OpenBao");
}
