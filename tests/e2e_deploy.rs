//! End-to-end tests of what a production install relies on: `/metrics` and the probes, leader
//! election with failover, and the Helm chart (lint, the rendered `manifests/`, and an
//! install whose RBAC is enough for the operator and no more, and whose roles for people
//! let each level do its part and no more).

mod e2e;

use e2e::Testbed;
use e2e::chart::{
    ClusterBinding, Release, binding, chart_dir, client_as, forbidden, impersonating_kubeconfig,
    run_helm, viewer_and_developer_roles,
};
use e2e::fixture::{Fixture, wait_until};
use e2e::operator::{Operator, SCOPE_LABEL, Work, http_get, sample};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use keyhaven::api::{ManagedSecret, SecretStore, VaultProfile};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// The operator's metrics address, once it listens.
async fn metrics_addr(op: &Operator) -> String {
    wait_until(Duration::from_secs(30), || async { op.metrics_addr() })
        .await
        .unwrap_or_else(|| panic!("no metrics address in {}", op.log.display()))
}

async fn scrape(addr: &str) -> String {
    match http_get(addr, "/metrics").await {
        Some((200, body)) => body,
        other => panic!("GET {addr}/metrics: {other:?}"),
    }
}

/// No secret value in these operators' logs, nor in the test's Events.
async fn assert_not_leaked(fx: &Fixture, ops: &[&Operator], values: &[&str]) {
    let events = fx.events().await.join("\n");
    for op in ops {
        let log = op.log_text();
        assert!(!log.is_empty(), "{} is empty", op.log.display());
        for v in values {
            assert!(!log.contains(v), "a secret value in {}", op.log.display());
            assert!(!events.contains(v), "a secret value in an Event");
        }
    }
}

async fn wait_ready(addr: &str) {
    let ready = wait_until(Duration::from_secs(30), || async {
        (http_get(addr, "/readyz").await?.0 == 200).then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "/readyz of {addr} not 200 in 30s: {:?}",
        http_get(addr, "/readyz").await
    );
}

/// An internal store, a profile on it, a source Secret and a ManagedSecret pushing it
/// (re-read every second). Returns the store's and the profile's names.
async fn push_secret(fx: &Fixture, value: &str) -> (String, String) {
    let store = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx.profile("p", &store, &[]).await;
    fx.secret(&fx.ns, "src", &[("password", value)]).await;
    fx.managed_secret(
        "db",
        json!({"profile": profile, "type": "password", "refreshInterval": "1s",
               "content": {"fromSecret": {"name": "src"}}}),
    )
    .await;
    (store, profile)
}

#[tokio::test]
async fn metrics_and_probes_follow_a_sync() {
    let fx = Fixture::new("metrics").await;
    let addr = metrics_addr(&fx.op).await;
    assert_eq!(http_get(&addr, "/healthz").await.map(|r| r.0), Some(200));
    wait_ready(&addr).await;
    let before = scrape(&addr).await;
    assert_eq!(sample(&before, "keyhaven_leader"), Some(1.0), "{before}");

    let value = "metrics-Pa55word-e2e";
    let (store, profile) = push_secret(&fx, value).await;
    fx.wait_synced("db", 1).await;

    let after = scrape(&addr).await;
    let count = |text: &str, series: &str| sample(text, series).unwrap_or(0.0);
    let reconciles = r#"keyhaven_reconciles_total{kind="ManagedSecret"}"#;
    assert!(
        count(&after, reconciles) > count(&before, reconciles),
        "{after}"
    );
    assert!(
        count(
            &after,
            r#"keyhaven_reconcile_duration_seconds_count{kind="ManagedSecret"}"#
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &after,
            &format!(r#"keyhaven_versions_written_total{{profile="{profile}"}}"#)
        ),
        Some(1.0),
        "{after}"
    );
    let writes = format!(
        r#"keyhaven_backend_calls_total{{store="{store}",operation="write",outcome="ok"}}"#
    );
    assert!(count(&after, &writes) >= 1.0, "{after}");
    assert!(
        after.contains(&format!(
            r#"keyhaven_backend_call_duration_seconds_count{{store="{store}",operation="write"}}"#
        )),
        "{after}"
    );
    // Gauges read from the caches at scrape time.
    let gauges = wait_until(Duration::from_secs(30), || async {
        let text = scrape(&addr).await;
        (sample(&text, r#"keyhaven_managed_secrets{phase="Synced"}"#)? >= 1.0
            && sample(
                &text,
                &format!(r#"keyhaven_store_active{{store="{store}"}}"#),
            )? == 1.0)
            .then_some(text)
    })
    .await;
    assert!(gauges.is_some(), "{}", scrape(&addr).await);
    assert!(!scrape(&addr).await.contains(value));
    fx.assert_values_never_leaked(&[value]).await;
}

/// Lease duration of the electing operators the tests start.
const LEASE_SECS: u64 = 4;

/// Two electing operators for `fx` (whose own operator is stopped), once exactly one leads:
/// (leader, standby, standby's metrics address).
async fn electing_pair(fx: &mut Fixture) -> (Operator, Operator, String) {
    fx.op.kill();
    let bed = Testbed::load();
    let start = |name: &str| {
        Operator::start_with(
            &bed.kubeconfig,
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
    };
    let (a, b) = (start("a"), start("b"));
    let (addr_a, addr_b) = (metrics_addr(&a).await, metrics_addr(&b).await);
    wait_ready(&addr_a).await;
    wait_ready(&addr_b).await;
    let leader = |addr: String| async move { sample(&scrape(&addr).await, "keyhaven_leader") };
    let a_leads = wait_until(Duration::from_secs(30), || async {
        match (leader(addr_a.clone()).await?, leader(addr_b.clone()).await?) {
            (1.0, 0.0) => Some(true),
            (0.0, 1.0) => Some(false),
            _ => None,
        }
    })
    .await
    .expect("exactly one of two operators leads");
    let pair = if a_leads {
        (a, b, addr_b)
    } else {
        (b, a, addr_a)
    };
    assert!(
        pair.1.log_text().contains("standing by"),
        "{}",
        pair.1.log_text()
    );
    pair
}

/// Waits until the operator at `addr` leads; how long that took since `since`.
async fn wait_leading(addr: &str, since: Instant) -> Duration {
    let took = wait_until(Duration::from_secs(LEASE_SECS * 4), || async {
        let leads = sample(&scrape(addr).await, "keyhaven_leader")? == 1.0;
        leads.then(|| since.elapsed())
    })
    .await
    .expect("the standby never took over");
    // The Lease expires at most LEASE_SECS after the leader's last renewal; the standby
    // then takes it within a second (a random pause that breaks ties between candidates).
    assert!(
        took <= Duration::from_secs(LEASE_SECS + 2),
        "failover took {took:?}"
    );
    took
}

#[tokio::test]
async fn two_operators_elect_one_leader_and_fail_over_after_sigkill() {
    let mut fx = Fixture::new("leader").await;
    let (mut old, new, new_addr) = electing_pair(&mut fx).await;

    let (store, _) = push_secret(&fx, "leader-v1-Pa55word-e2e").await;
    fx.wait_synced("db", 1).await;
    assert!(
        !new.log_text().contains("keyhaven controllers starting"),
        "the standby reconciled"
    );

    // SIGKILL a leader at work, not one idle since its last sync: it refreshes db every
    // second, and is killed right after a refresh seen on its /metrics read the store.
    let synced = old.metrics().await;
    old.wait_work(
        &synced,
        &[
            (Work::reconciles("ManagedSecret"), 1),
            (Work::store_reads(&store), 1),
        ],
        Duration::from_secs(30),
    )
    .await;
    let killed = Instant::now();
    old.kill();
    let took_over = wait_leading(&new_addr, killed).await;
    eprintln!("failover after SIGKILL: {took_over:?} (lease duration {LEASE_SECS}s)");
    wait_ready(&new_addr).await;

    // The new leader reconciles: a new value becomes version 2.
    fx.secret(&fx.ns, "src", &[("password", "leader-v2-Pa55word-e2e")])
        .await;
    fx.wait_synced("db", 2).await;

    // SIGTERM: reconciles finish, the Lease is released, the process exits 0.
    let mut new = new;
    let status = new
        .terminate(Duration::from_secs(20))
        .expect("the leader did not exit within 20s of SIGTERM");
    assert!(status.success(), "exit status {status}");
    let lease = Api::<Lease>::namespaced(fx.client.clone(), &new.namespace)
        .get("keyhaven-leader")
        .await
        .unwrap();
    let holder = lease.spec.and_then(|s| s.holder_identity);
    assert!(
        holder.as_deref().is_none_or(str::is_empty),
        "the Lease is still held by {holder:?} after a graceful stop"
    );
    assert_not_leaked(
        &fx,
        &[&old, &new],
        &["leader-v1-Pa55word-e2e", "leader-v2-Pa55word-e2e"],
    )
    .await;
}

#[tokio::test]
async fn a_frozen_leader_that_lost_its_lease_stops_and_exits() {
    let mut fx = Fixture::new("frozen").await;
    let (mut old, mut new, new_addr) = electing_pair(&mut fx).await;
    // SIGSTOP: the leader neither renews nor knows it; the standby takes the expired Lease.
    let frozen = Instant::now();
    old.signal("STOP");
    let took_over = wait_leading(&new_addr, frozen).await;
    eprintln!("failover after SIGSTOP: {took_over:?} (lease duration {LEASE_SECS}s)");
    // Thawed, the old leader sees the Lease is gone, stops reconciling and exits 1 to
    // rejoin as a candidate.
    old.signal("CONT");
    let status = old
        .wait_exit(Duration::from_secs(LEASE_SECS * 3))
        .expect("the thawed ex-leader kept running");
    assert_eq!(status.code(), Some(1), "{}", old.log_text());
    assert!(
        old.log_text().contains("lost the leader Lease"),
        "{}",
        old.log_text()
    );
    assert!(new.is_running());
}

const MANIFESTS_HEADER: &str = "\
# keyhaven's plain install: helm/keyhaven rendered with its default values (release
# `keyhaven` in namespace keyhaven-system), CRDs first. Do not edit: regenerate with
# `make manifests`. Install: kubectl apply --server-side -f manifests/
---
apiVersion: v1
kind: Namespace
metadata:
  name: keyhaven-system
";

/// `manifests/keyhaven.yaml` as the chart renders it now.
fn rendered_manifests() -> String {
    let chart = chart_dir();
    let rendered = run_helm(&[
        "template",
        "keyhaven",
        chart.to_str().unwrap(),
        "--namespace",
        "keyhaven-system",
        "--include-crds",
    ]);
    format!("{MANIFESTS_HEADER}{rendered}")
}

#[test]
fn chart_lints_and_manifests_are_the_rendered_chart() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    run_helm(&["lint", "--strict", chart]);
    run_helm(&[
        "lint",
        "--strict",
        chart,
        "--set",
        "watchNamespace=apps",
        "--set",
        "secretNamespaces={stores}",
    ]);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/keyhaven.yaml");
    let rendered = rendered_manifests();
    if std::env::var_os("KEYHAVEN_UPDATE_MANIFESTS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "manifests/keyhaven.yaml drifted from helm/keyhaven: run `make manifests`"
    );
    // Confined to one namespace, the operator gets no cluster-wide Secret access.
    let confined = run_helm(&[
        "template",
        "keyhaven",
        chart,
        "--namespace",
        "keyhaven-system",
        "--set",
        "watchNamespace=apps",
    ]);
    assert!(
        !confined.contains("name: keyhaven-secrets\n  labels"),
        "{confined}"
    );
    assert!(confined.contains("name: keyhaven-secrets\n  namespace: apps"));
    assert!(confined.contains("name: keyhaven-workloads\n  namespace: apps"));
    assert!(!confined.contains("name: keyhaven-workloads\n  labels"));
    roles_for_people_grant_keyhaven_kinds_only(&rendered);
    webhooks_cover_keyhaven_kinds_only(&rendered);
    let off = run_helm(&[
        "template",
        "keyhaven",
        chart,
        "--set",
        "rbac.aggregateRoles=false",
        "--set",
        "rbac.platformAdminRole=false",
        "--set",
        "rbac.rolloutRestart=false",
    ]);
    for name in ["aggregate-to-", "platform-admin", "keyhaven-workloads"] {
        assert!(!off.contains(name), "{name} with the values off:\n{off}");
    }
    // Credentials only from the release namespace unless listed; the list reaches the env.
    assert!(!rendered.contains("KEYHAVEN_CREDENTIAL_NAMESPACES"));
    let creds = run_helm(&[
        "template",
        "keyhaven",
        chart,
        "--set",
        "credentialNamespaces={vault-creds,hsm-pins}",
    ]);
    assert!(
        creds.contains(
            "- name: KEYHAVEN_CREDENTIAL_NAMESPACES\n              value: \"vault-creds,hsm-pins\""
        ),
        "{creds}"
    );
    // No PKCS#11 module is allowed unless listed; the list reaches the operator's env.
    assert!(!rendered.contains("KEYHAVEN_PKCS11_MODULES"));
    let hsm = run_helm(&[
        "template",
        "keyhaven",
        chart,
        "--set",
        "pkcs11Modules={/usr/lib/softhsm/libsofthsm2.so,/opt/hsm/lib.so}",
    ]);
    assert!(
        hsm.contains(
            "- name: KEYHAVEN_PKCS11_MODULES\n              value: \"/usr/lib/softhsm/libsofthsm2.so,/opt/hsm/lib.so\""
        ),
        "{hsm}"
    );
}

/// The chart's webhook configurations: keyhaven's kinds only (never Secrets, Namespaces or
/// workloads: a keyhaven outage must not lock a cluster), failing closed, through the
/// Service; the operator may patch only these two configurations; a PodDisruptionBudget.
fn webhooks_cover_keyhaven_kinds_only(rendered: &str) {
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(rendered)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let mut seen = 0;
    for kind in [
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    ] {
        for doc in docs.iter().filter(|d| d["kind"] == kind) {
            seen += 1;
            for hook in doc["webhooks"].as_sequence().unwrap() {
                assert_eq!(hook["failurePolicy"], "Fail", "{hook:?}");
                assert!(hook["clientConfig"]["service"]["name"].is_string());
                for rule in hook["rules"].as_sequence().unwrap() {
                    let groups = rule["apiGroups"].as_sequence().unwrap();
                    assert!(groups.iter().all(|g| g == "keyhaven.io"), "{rule:?}");
                }
            }
        }
    }
    assert_eq!(seen, 2, "one validating and one mutating configuration");
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "keyhaven")
        .unwrap();
    let webhook_rule = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["apiGroups"][0] == "admissionregistration.k8s.io")
        .expect("the operator patches its webhook configurations' caBundle");
    assert_eq!(webhook_rule["resourceNames"][0], "keyhaven");
    assert!(docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"));
}

/// The chart's ClusterRoles for people: aggregated into view, edit and admin (the platform
/// admin's into nothing), and only on keyhaven's kinds: nothing on Secrets.
fn roles_for_people_grant_keyhaven_kinds_only(rendered: &str) {
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(rendered)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let role = |name: &str| {
        docs.iter()
            .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no ClusterRole {name} in the rendered chart"))
    };
    let aggregation = "rbac.authorization.k8s.io/aggregate-to-";
    for (name, level) in [
        ("keyhaven-view", Some("view")),
        ("keyhaven-edit", Some("edit")),
        ("keyhaven-admin", Some("admin")),
        ("keyhaven-platform-admin", None),
    ] {
        let role = role(name);
        let labels = role["metadata"]["labels"].as_mapping().unwrap();
        let aggregated: Vec<_> = labels
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.strip_prefix(aggregation)?, v.as_str()?)))
            .collect();
        assert_eq!(
            aggregated,
            level.map(|l| (l, "true")).into_iter().collect::<Vec<_>>()
        );
        for rule in role["rules"].as_sequence().unwrap() {
            assert_eq!(
                rule["apiGroups"],
                serde_yaml::to_value(["keyhaven.io"]).unwrap()
            );
            let resources = rule["resources"].as_sequence().unwrap();
            assert!(
                resources
                    .iter()
                    .all(|r| r.as_str().is_some_and(|r| r != "*")),
                "{name}: {rule:?}"
            );
        }
    }
}

#[tokio::test]
async fn helm_install_grants_the_operator_enough_and_no_more() {
    let mut fx = Fixture::new("helm").await;
    fx.op.kill(); // replaced by one running as the chart's ServiceAccount
    let bed = Testbed::load();
    let release_ns = fx.op.namespace.clone();
    let release = format!("keyhaven-{}", fx.ns);
    let chart = chart_dir();
    let kubeconfig = bed.kubeconfig.to_str().unwrap();
    let selector = format!("storeSelector=keyhaven.io/e2e-scope={}", fx.ns);
    run_helm(&[
        "install",
        &release,
        chart.to_str().unwrap(),
        "--namespace",
        &release_ns,
        "--create-namespace",
        "--kubeconfig",
        kubeconfig,
        "--set",
        &format!("watchNamespace={}", fx.ns),
        "--set",
        &selector,
        // Its webhook configurations would call a Service no pod backs on the bed (no
        // kubelet), for every ManagedSecret of the cluster: e2e_webhook tests the webhook.
        "--set",
        "webhook.enabled=false",
    ]);
    let _release = Release {
        name: release.clone(),
        namespace: release_ns.clone(),
        kubeconfig: bed.kubeconfig.clone(),
    };

    // The operator as the chart's ServiceAccount (the release's full name is its name).
    let as_sa = impersonating_kubeconfig(&bed.kubeconfig, &release_ns, &release);
    let op = Operator::start_with(
        &as_sa,
        &fx.ns,
        "-sa",
        &[
            "--service-account",
            &release,
            "--leader-elect",
            "--lease-duration",
            "4",
            "--lease-renew-margin",
            "1",
        ],
    );
    let value = "helm-rbac-Pa55word-e2e";
    let (_, profile) = push_secret(&fx, value).await;
    fx.wait_synced("db", 1).await;
    assert_eq!(
        fx.secret_data(&fx.ns, "db")
            .await
            .and_then(|d| d.get("password").cloned())
            .as_deref(),
        Some(value)
    );
    restarts_a_deployment(&fx, &profile).await;
    let log = op.log_text();
    assert!(
        !log.contains("forbidden"),
        "the chart's RBAC refused something:\n{log}"
    );

    // Least privilege: no Secret outside the namespaces it manages.
    let other = fx.namespace("other").await;
    fx.secret(&other, "private", &[("token", "not-for-keyhaven")])
        .await;
    let sa_client = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&as_sa).unwrap(),
            &KubeConfigOptions::default(),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    assert!(forbidden(
        Api::<Secret>::namespaced(sa_client.clone(), &other)
            .get("private")
            .await
            .map(|_| ())
    ));
    assert!(forbidden(
        Api::<Secret>::all(sa_client.clone())
            .list(&ListParams::default())
            .await
            .map(|_| ())
    ));
    assert!(forbidden(
        Api::<Secret>::namespaced(sa_client.clone(), "kube-system")
            .list(&ListParams::default())
            .await
            .map(|_| ())
    ));
    // ... while it reads those of its own namespaces.
    Api::<Secret>::namespaced(sa_client.clone(), &fx.ns)
        .get("src")
        .await
        .expect("the ServiceAccount reads Secrets of the watched namespace");
    people_under_the_chart_roles(&fx, &release, &profile).await;
    assert_not_leaked(
        &fx,
        &[&op],
        &[value, "helm-rollout-one", "helm-rollout-two"],
    )
    .await;
}

/// The chart's RBAC lets the operator restart a Deployment named in rolloutRestartTargets
/// (an object is enough: the bed runs no kubelet).
async fn restarts_a_deployment(fx: &Fixture, profile: &str) {
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "app", "namespace": fx.ns},
        "spec": {
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app"}},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
            }
        }
    }))
    .unwrap();
    fx.ns_api::<Deployment>(&fx.ns)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    fx.secret(&fx.ns, "cfg-src", &[("MODE", "helm-rollout-one")])
        .await;
    fx.managed_secret(
        "cfg",
        json!({"profile": profile, "type": "key-value", "refreshInterval": "1s",
            "content": {"fromSecret": {"name": "cfg-src"}},
            "rolloutRestartTargets": [{"kind": "Deployment", "name": "app"}]}),
    )
    .await;
    fx.wait_synced("cfg", 1).await;
    fx.secret(&fx.ns, "cfg-src", &[("MODE", "helm-rollout-two")])
        .await;
    let v2 = fx.wait_synced("cfg", 2).await;
    assert_eq!(v2.status.unwrap().restarted_version, Some(2));
    let d = fx.ns_api::<Deployment>(&fx.ns).get("app").await.unwrap();
    let annotations = d
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .unwrap_or_default();
    assert!(
        annotations.contains_key("keyhaven.io/restartedAt"),
        "{annotations:?}"
    );
    fx.wait_event("RolloutRestarted", "Deployment/app").await;
}

/// People, impersonated, under the chart's roles: a viewer of the namespace lists its
/// ManagedSecrets but reads no Secret; a developer creates ManagedSecrets but writes no
/// status; neither writes a SecretStore (nor a VaultProfile), which a platform admin does.
async fn people_under_the_chart_roles(fx: &Fixture, release: &str, profile: &str) {
    let [view, edit] = viewer_and_developer_roles(fx, release).await;
    let user = |level: &str| format!("{}-{level}", fx.ns);
    for (level, role) in [("viewer", &view), ("developer", &edit)] {
        let rb = binding(level, Some(&fx.ns), role, &user(level));
        fx.apply::<RoleBinding>(fx.ns_api(&fx.ns), rb).await;
    }
    let platform_binding = ClusterBinding(fx.scoped("platform-admin"));
    let crb = binding(
        &platform_binding.0,
        None,
        &format!("{release}-platform-admin"),
        &user("platform"),
    );
    fx.apply::<ClusterRoleBinding>(fx.cluster_api(), crb).await;
    let viewer = client_as(&user("viewer")).await;
    let developer = client_as(&user("developer")).await;
    let platform = client_as(&user("platform")).await;
    let managed = |c: &Client| Api::<ManagedSecret>::namespaced(c.clone(), &fx.ns);
    let stores = |c: &Client| Api::<SecretStore>::all(c.clone());
    let pp = PostParams::default();
    let ms: ManagedSecret = serde_json::from_value(json!({
        "apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
        "metadata": {"name": "by-developer"},
        "spec": {"profile": profile, "type": "password", "content": {"fromSecret": {"name": "src"}}},
    }))
    .unwrap();
    let store = |name: &str| -> SecretStore {
        serde_json::from_value(json!({
            "apiVersion": "keyhaven.io/v1alpha1", "kind": "SecretStore",
            "metadata": {"name": fx.scoped(name), "labels": {SCOPE_LABEL: fx.ns}},
            "spec": {"provider": {"internal": {}}},
        }))
        .unwrap()
    };
    let profile_obj: VaultProfile = serde_json::from_value(json!({
        "apiVersion": "keyhaven.io/v1alpha1", "kind": "VaultProfile",
        "metadata": {"name": fx.scoped("by-developer"), "labels": {SCOPE_LABEL: fx.ns}},
        "spec": {"source": fx.scoped("internal")},
    }))
    .unwrap();

    // Bindings take effect within moments: the first success of each is waited for.
    let secs = Duration::from_secs(15);
    let listed = wait_until(secs, || async {
        managed(&viewer).list(&ListParams::default()).await.ok()
    })
    .await
    .expect("the viewer lists the namespace's ManagedSecrets");
    assert!(listed.items.iter().any(|m| m.name_any() == "db"));
    let db = managed(&viewer).get("db").await.unwrap();
    assert!(
        db.status.is_some_and(|s| !s.versions.is_empty()),
        "the viewer sees the history"
    );
    assert!(forbidden(
        Api::<Secret>::namespaced(viewer.clone(), &fx.ns)
            .get("db")
            .await
    ));
    assert!(forbidden(
        Api::<Secret>::namespaced(viewer.clone(), &fx.ns)
            .list(&ListParams::default())
            .await
    ));
    assert!(forbidden(managed(&viewer).create(&pp, &ms).await));
    assert!(forbidden(
        stores(&viewer).create(&pp, &store("by-viewer")).await
    ));

    wait_until(secs, || async {
        managed(&developer).create(&pp, &ms).await.ok()
    })
    .await
    .expect("the developer creates a ManagedSecret");
    let forged = Patch::Merge(json!({"status": {"currentVersion": 99}}));
    assert!(forbidden(
        managed(&developer)
            .patch_status("db", &PatchParams::default(), &forged)
            .await
    ));
    assert!(forbidden(
        stores(&developer).create(&pp, &store("by-developer")).await
    ));
    assert!(forbidden(
        Api::<VaultProfile>::all(developer.clone())
            .create(&pp, &profile_obj)
            .await
    ));

    wait_until(secs, || async {
        stores(&platform)
            .create(&pp, &store("by-platform"))
            .await
            .ok()
    })
    .await
    .expect("the platform admin creates a SecretStore");
}
