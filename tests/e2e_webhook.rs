//! The admission webhook on the real bed: the operator serves it over TLS with the
//! certificate it issued itself, the API server calls it by URL on loopback (registered for
//! this test's namespace only). A fuzz run sends over a thousand malformed ManagedSecrets
//! (seeded, the seed printed) through the API server: each is refused with a message naming
//! the field, or accepted and reported with a reason within 10 s, while a canary keeps
//! syncing and the operator never exits. `createdBy` is the user `kubectl --as` named. With
//! the webhook stopped, keyhaven's kind is refused (failurePolicy Fail) and nothing else is;
//! without the webhook registered, the schema's bounds still refuse the oversized cases.

mod e2e;

use e2e::chart::kubectl_as;
use e2e::fixture::{Fixture, wait_until};
use e2e::webhook::{Registered, configurations, free_port};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use keyhaven::api::ManagedSecret;
use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::{Api, ResourceExt};
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Hostile values a careless or malicious user might put in a field.
fn hostile(rng: &mut impl RngExt) -> Value {
    let big = |n: usize| Value::String("a".repeat(n));
    let deep = (0..64).fold(json!("x"), |v, _| json!({ "k": v }));
    let wide: serde_json::Map<String, Value> =
        (0..2000).map(|i| (format!("k{i}"), json!("v"))).collect();
    let choices = [
        big(300 * 1024),
        big(70_000),
        json!(""),
        json!("../../etc/passwd"),
        json!("/absolute/path"),
        json!("a//b"),
        json!("team-b/db"),
        json!("keyhaven/bookkeeping"),
        json!("пароль🔑\u{202e}txt"),
        json!("\u{0000}nul"),
        json!("<script>alert(1)</script>"),
        json!("{{ .password }}{{ .password }}"),
        json!(null),
        json!(-1),
        json!(0),
        json!(1e308),
        json!(18446744073709551615u64),
        json!(9007199254740993i64),
        json!(true),
        json!([]),
        json!([1, "two", null]),
        json!({}),
        deep,
        Value::Object(wide),
        json!("1000000000000h"),
        json!("18446744073709551615s"),
        json!("0s"),
        json!("1ms"),
        json!("-5s"),
        json!("1h30"),
        json!("Password"),
        json!("certificate"),
    ];
    choices[rng.random_range(0..choices.len())].clone()
}

/// The fields a mutation targets (JSON pointer under the object).
const FIELDS: &[&str] = &[
    "/spec/type",
    "/spec/path",
    "/spec/profile",
    "/spec/refreshInterval",
    "/spec/rotation",
    "/spec/rotation/interval",
    "/spec/rollbackTo",
    "/spec/reason",
    "/spec/expiryWarning",
    "/spec/content",
    "/spec/content/generate",
    "/spec/content/generate/length",
    "/spec/content/generate/bits",
    "/spec/content/generate/bytes",
    "/spec/content/generate/validity",
    "/spec/content/generate/prefix",
    "/spec/content/generate/exclude",
    "/spec/content/generate/classes",
    "/spec/content/generate/dnsNames",
    "/spec/content/generate/commonName",
    "/spec/content/generate/issuerRef",
    "/spec/content/generate/isCA",
    "/spec/content/fromSecret",
    "/spec/content/fromSecret/name",
    "/spec/target",
    "/spec/target/name",
    "/spec/target/labels",
    "/spec/target/annotations",
    "/spec/target/creationPolicy",
    "/spec/target/template/data",
    "/spec/rolloutRestartTargets",
    "/metadata/annotations",
];

/// Sets `pointer` in `obj` to `value`, making the objects on the way.
fn set(obj: &mut Value, pointer: &str, value: Value) {
    let mut at = obj;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        if !at.is_object() {
            *at = json!({});
        }
        let map = at.as_object_mut().unwrap();
        if i + 1 == parts.len() {
            map.insert((*part).to_owned(), value);
            return;
        }
        at = map.entry((*part).to_owned()).or_insert_with(|| json!({}));
    }
}

/// A sound ManagedSecret to start a mutation from.
fn base(rng: &mut impl RngExt, profile: &str) -> Value {
    let specs = [
        json!({"type": "password", "content": {"generate": {"length": 24}}}),
        json!({"type": "key-value", "content": {"fromSecret": {"name": "src"}}}),
        json!({"type": "certificate", "content": {"generate": {"commonName": "x", "validity": "720h"}}}),
        json!({"type": "secret-key", "content": {"generate": {"bytes": 32}}}),
        json!({"type": "api-key", "content": {"generate": {"prefix": "kh_", "length": 40}}}),
    ];
    let mut spec = specs[rng.random_range(0..specs.len())].clone();
    spec["profile"] = profile.into();
    spec["refreshInterval"] = "1h".into();
    json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
        "metadata": {"name": "x"}, "spec": spec})
}

/// Hand-written hostile cases: the issue's, and the schema's edges.
fn hand_written(profile: &str) -> Vec<Value> {
    let ms = |spec: Value| {
        let mut s = json!({"profile": profile, "refreshInterval": "1h"});
        s.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": "x"}, "spec": s})
    };
    vec![
        ms(json!({"type": "certificate", "content": {"generate": {"validity": "1000000000000h"}}})),
        ms(
            json!({"type": "password", "refreshInterval": "18446744073709551615s",
            "content": {"generate": {}}}),
        ),
        ms(json!({"type": "password", "refreshInterval": "0s", "content": {"generate": {}}})),
        ms(
            json!({"type": "password", "rotation": {"interval": "1ms"}, "content": {"generate": {}}}),
        ),
        ms(
            json!({"type": "password", "reason": "r".repeat(1024 * 1024), "content": {"generate": {}}}),
        ),
        ms(json!({"type": "password", "path": "../other-team/db", "content": {"fromStore": {}}})),
        ms(json!({"type": "password", "path": "other-team/db", "content": {"fromStore": {}}})),
        ms(json!({"type": "password", "rollbackTo": 0, "content": {"fromStore": {}}})),
        ms(json!({"type": "password", "content": {"generate": {"length": 100000}}})),
        ms(json!({"type": "secret-key", "content": {"generate": {"bytes": 2000000}}})),
        ms(
            json!({"type": "private-key", "content": {"generate": {"algorithm": "rsa", "bits": 65536}}}),
        ),
        ms(
            json!({"type": "certificate", "content": {"generate": {"issuerRef": {"name": "nope"}, "isCA": true}}}),
        ),
        ms(json!({"type": "password", "profile": "does-not-exist", "content": {"generate": {}}})),
        ms(
            json!({"type": "password", "target": {"template": {"data": {"k": "x".repeat(200_000)}}},
            "content": {"generate": {}}}),
        ),
        ms(json!({"type": "nonsense", "content": {"generate": {}}})),
        ms(json!({"type": "password", "content": {}})),
    ]
}

/// Whether a refusal's message names what was wrong (a field path).
fn names_a_field(message: &str) -> bool {
    ["spec", "metadata", "Unsupported value", "Required value"]
        .iter()
        .any(|f| message.contains(f))
}

/// The newest value of the canary's native Secret.
async fn canary_value(fx: &Fixture) -> Option<String> {
    fx.secret_data(&fx.ns, "canary")
        .await
        .and_then(|d| d.get("VALUE").cloned())
}

#[tokio::test]
async fn the_webhook_refuses_or_reports_every_malformed_spec_and_never_crashes() {
    let port = free_port();
    let scope = format!("webhook-{}", e2e::unique_suffix());
    let config_name = format!("{scope}-keyhaven");
    let addr = format!("127.0.0.1:{port}");
    let fx = Fixture::new_with(
        "webhook",
        &[
            "--webhook-addr",
            &addr,
            "--webhook-hosts",
            "127.0.0.1",
            "--webhook-config-name",
            &config_name,
        ],
    )
    .await;
    let _registered = Registered {
        name: config_name.clone(),
        kubeconfig: fx.kubeconfig.clone(),
    };
    let (mutating, validating) =
        configurations(&config_name, &fx.ns, port, &["managedsecrets"], false);
    fx.apply::<MutatingWebhookConfiguration>(fx.cluster_api(), mutating)
        .await;
    fx.apply::<ValidatingWebhookConfiguration>(fx.cluster_api(), validating)
        .await;
    // keyhaven patches the caBundle of both with the CA it issued.
    let bundled = wait_until(Duration::from_secs(30), || async {
        let v: Api<ValidatingWebhookConfiguration> = fx.cluster_api();
        let m: Api<MutatingWebhookConfiguration> = fx.cluster_api();
        let has = |b: Option<&k8s_openapi::ByteString>| b.is_some_and(|b| !b.0.is_empty());
        let v = v.get(&config_name).await.ok()?;
        let m = m.get(&config_name).await.ok()?;
        (has(v.webhooks?[0].client_config.ca_bundle.as_ref())
            && has(m.webhooks?[0].client_config.ca_bundle.as_ref()))
        .then_some(())
    })
    .await;
    assert!(bundled.is_some(), "caBundle never patched");
    let tls = fx
        .ns_api::<Secret>(&fx.op.namespace)
        .get("keyhaven-webhook-tls")
        .await
        .expect("the webhook's certificate Secret");
    assert!(tls.data.unwrap().contains_key("tls.crt"));

    let store = fx.store("internal", json!({"internal": {}})).await;
    let profile = fx
        .profile_spec(
            "p",
            json!({"source": store, "limits": {"minRefreshInterval": "1s"}}),
        )
        .await;
    fx.secret(&fx.ns, "src", &[("k", "v")]).await;

    // Who asked: alice, through kubectl --as, with a forged record the webhook overwrites.
    let alice = format!("{}-alice", fx.ns);
    fx.apply::<Role>(
        fx.ns_api(&fx.ns),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "ms-editor", "namespace": fx.ns},
            "rules": [{"apiGroups": ["keyhaven.io"], "resources": ["managedsecrets"],
                "verbs": ["get", "list", "create", "update", "patch", "delete"]}]}),
    )
    .await;
    let mut rb = e2e::chart::binding("alice", Some(&fx.ns), "ms-editor", &alice);
    rb["roleRef"]["kind"] = "Role".into();
    fx.apply::<RoleBinding>(fx.ns_api(&fx.ns), rb).await;
    let mut by_alice = json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
        "metadata": {"name": "by-alice", "namespace": fx.ns,
            "annotations": {"keyhaven.io/requested-by": "root"}},
        "spec": {"profile": profile, "type": "password", "content": {"generate": {"length": 24}}}});
    // The binding takes a moment to reach the authorizer.
    let applied = wait_until(Duration::from_secs(15), || async {
        let (ok, _) = kubectl_as(&alice, &["apply", "-f", "-"], Some(&by_alice.to_string()));
        ok.then_some(())
    })
    .await;
    if applied.is_none() {
        let (_, out) = kubectl_as(&alice, &["apply", "-f", "-"], Some(&by_alice.to_string()));
        panic!("alice could not apply a ManagedSecret: {out}");
    }
    let made = fx.wait_synced("by-alice", 1).await;
    assert_eq!(made.status.as_ref().unwrap().versions[0].created_by, alice);
    assert_eq!(made.annotations()["keyhaven.io/requested-by"], alice);
    // A refused change by alice names the field.
    by_alice["spec"]["refreshInterval"] = "1ms".into();
    let (ok, out) = kubectl_as(&alice, &["apply", "-f", "-"], Some(&by_alice.to_string()));
    assert!(!ok && out.contains("spec.refreshInterval"), "{out}");

    // The canary, changed every second through the fuzz run.
    fx.secret(&fx.ns, "canary-src", &[("VALUE", "c-0")]).await;
    fx.managed_secret(
        "canary",
        json!({"profile": profile, "type": "key-value", "refreshInterval": "1s",
            "content": {"fromSecret": {"name": "canary-src"}}}),
    )
    .await;
    fx.wait_synced("canary", 1).await;
    let pid = fx.op.pid();

    let seed: u64 = std::env::var("KEYHAVEN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzz seed {seed} (KEYHAVEN_FUZZ_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cases = hand_written(&profile);
    while cases.len() < 1200 {
        let mut obj = base(&mut rng, &profile);
        for _ in 0..rng.random_range(1..=3) {
            let field = FIELDS[rng.random_range(0..FIELDS.len())];
            set(&mut obj, field, hostile(&mut rng));
        }
        cases.push(obj);
    }
    let api: Api<DynamicObject> = Api::namespaced_with(
        fx.client.clone(),
        &fx.ns,
        &ApiResource::erase::<ManagedSecret>(&()),
    );
    let canary_ns = fx.ns.clone();
    let canary_client = fx.client.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_canary = stop.clone();
    let canary = tokio::spawn(async move {
        let secrets: Api<Secret> = Api::namespaced(canary_client, &canary_ns);
        let mut latencies = Vec::new();
        let mut n = 0;
        while !stop_canary.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let value = format!("c-{n}");
            let patch = json!({"stringData": {"VALUE": value}});
            let started = Instant::now();
            secrets
                .patch(
                    "canary-src",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .unwrap();
            loop {
                let seen = secrets.get_opt("canary").await.ok().flatten();
                let v = seen.and_then(|s| s.data).and_then(|d| {
                    d.get("VALUE")
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                });
                if v.as_deref() == Some(value.as_str()) {
                    latencies.push(started.elapsed());
                    break;
                }
                if started.elapsed() > Duration::from_secs(60) {
                    panic!("the canary did not follow its source in 60 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        latencies
    });

    let (mut by_schema, mut by_webhook, mut accepted) = (0, 0, Vec::new());
    let mut unreadable = 0;
    for (i, mut obj) in cases.into_iter().enumerate() {
        let name = format!("fz-{i}");
        obj["metadata"]["name"] = name.clone().into();
        obj["metadata"]["namespace"] = fx.ns.clone().into();
        let text = obj.to_string();
        let dynamic: DynamicObject = match serde_json::from_value(obj) {
            Ok(d) => d,
            // Not even an object the client can send (e.g. metadata of the wrong shape).
            Err(_) => continue,
        };
        let sent = api.create(&PostParams::default(), &dynamic).await;
        // An answer the client cannot read (thousands of unknown fields dropped, each a
        // Warning header): whether the object was stored decides.
        let sent = match sent {
            Err(e @ (kube::Error::Service(_) | kube::Error::HyperError(_))) => {
                match api.get_opt(&name).await.unwrap() {
                    Some(stored) => Ok(stored),
                    None => {
                        unreadable += 1;
                        eprintln!("case {i}: not stored; the answer was unreadable: {e}");
                        continue;
                    }
                }
            }
            other => other,
        };
        match sent {
            Ok(_) => accepted.push((name, Instant::now())),
            Err(kube::Error::Api(s)) if (400..500).contains(&s.code) => {
                assert!(
                    names_a_field(&s.message),
                    "case {i}: refused without naming a field: {}\n{}",
                    s.message,
                    &text[..text.len().min(2000)]
                );
                match s.message.contains("admission webhook") {
                    true => by_webhook += 1,
                    false => by_schema += 1,
                }
            }
            Err(e) => panic!("case {i}: {e}\n{}", &text[..text.len().min(2000)]),
        }
    }
    // Every accepted one is reported with a reason within 10 s of its creation (the API
    // server's timestamps: creation, and the Ready condition's transition).
    let managed: Api<ManagedSecret> = fx.ns_api(&fx.ns);
    let mut slowest = Duration::ZERO;
    for (name, created) in &accepted {
        loop {
            let ms = managed.get(name).await.unwrap();
            let ready = ms.status.as_ref().and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == "Ready" && !c.reason.is_empty())
                    .cloned()
            });
            if let Some(c) = ready {
                let made = ms.metadata.creation_timestamp.as_ref().unwrap().0;
                let took = c.last_transition_time.0.duration_since(made);
                let took = Duration::try_from(took).unwrap_or_default();
                assert!(
                    took <= Duration::from_secs(10),
                    "{name} reported {took:?} after its creation"
                );
                slowest = slowest.max(took);
                break;
            }
            assert!(
                created.elapsed() < Duration::from_secs(10),
                "{name} accepted but not reported in 10 s: {:?}",
                ms.spec
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut latencies = canary.await.unwrap();
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    eprintln!(
        "fuzz: {} cases; refused by the schema {by_schema}, by the webhook {by_webhook}; \
         accepted {} (each reported within {slowest:?}); {unreadable} not stored with an \
         answer the client could not read; canary {} changes, p50 {:?}, p99 {:?}, max {:?}",
        by_schema + by_webhook + accepted.len(),
        accepted.len(),
        latencies.len(),
        pct(50),
        pct(99),
        latencies.last().unwrap()
    );
    assert!(by_schema + by_webhook + accepted.len() >= 1000);
    assert!(by_webhook > 0, "the webhook refused nothing");
    let mut fx = fx;
    assert!(fx.op.is_running(), "the operator exited");
    assert_eq!(fx.op.pid(), pid, "the operator restarted");
    assert!(canary_value(&fx).await.is_some());
    let panics = fx
        .op
        .metrics()
        .await
        .sample("keyhaven_reconcile_panics_total")
        .unwrap_or(0.0);
    assert_eq!(panics, 0.0, "a reconcile panicked");

    // The webhook stopped: keyhaven's kind is refused, nothing else is.
    fx.op.kill();
    let sound = json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
        "metadata": {"name": "while-down", "namespace": fx.ns},
        "spec": {"profile": profile, "type": "password", "content": {"generate": {}}}});
    let refused = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(sound).unwrap(),
        )
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.message.contains("failed calling webhook")),
        "{refused:?}"
    );
    fx.secret(&fx.ns, "still-works", &[("k", "v")]).await;
    fx.ns_api::<ConfigMap>(&fx.ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "still-works"}, "data": {"k": "v"}}),
            )
            .unwrap(),
        )
        .await
        .expect("a ConfigMap is created with keyhaven down");
    fx.ns_api::<Deployment>(&fx.ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "still-works"},
                "spec": {"selector": {"matchLabels": {"app": "x"}},
                    "template": {"metadata": {"labels": {"app": "x"}},
                        "spec": {"containers": [{"name": "x", "image": "registry.invalid/x:1"}]}}}}))
            .unwrap(),
        )
        .await
        .expect("a Deployment is created with keyhaven down");

    // No webhook registered at all: the schema's bounds still refuse the oversized cases.
    drop(_registered);
    let gone = wait_until(Duration::from_secs(15), || async {
        let v: Api<ValidatingWebhookConfiguration> = fx.cluster_api();
        v.get_opt(&config_name).await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(gone.is_some());
    for (i, spec) in [
        json!({"profile": profile, "type": "password", "reason": "r".repeat(1024 * 1024),
            "content": {"generate": {}}}),
        json!({"profile": profile, "type": "password", "content": {"generate": {}},
            "target": {"labels": (0..2000).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}}),
        json!({"profile": profile, "type": "password", "path": "a".repeat(70_000),
            "content": {"fromStore": {}}}),
    ]
    .into_iter()
    .enumerate()
    {
        let obj = json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
            "metadata": {"name": format!("oversized-{i}"), "namespace": fx.ns}, "spec": spec});
        let r = api
            .create(&PostParams::default(), &serde_json::from_value(obj).unwrap())
            .await;
        assert!(
            matches!(&r, Err(kube::Error::Api(s)) if s.code == 422 || s.code == 413),
            "oversized case {i} accepted without the webhook: {:?}",
            r.map(|o| o.name_any())
        );
    }
}
