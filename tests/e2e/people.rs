//! People acting on ManagedSecrets through the admission webhook: the operator serves it
//! (by URL on loopback, the test's namespace only), users act with `kubectl --as` under
//! real RBAC (Roles `editor`, and `approver` with the verb `approve`).

use super::chart::kubectl_as;
use super::fixture::{Fixture, wait_until};
use super::webhook::{Registered, configurations, free_port};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use keyhaven::api::{ManagedSecret, ManagedSecretPhase, RequestState};
use kube::Api;
use serde_json::{Value, json};
use std::time::Duration;

/// The fixture's operator with its webhook registered and its caBundle patched.
pub async fn with_webhook(name: &str) -> (Fixture, Registered) {
    with_webhook_and(name, &[]).await
}

/// [`with_webhook`], with more arguments for the operator.
pub async fn with_webhook_and(name: &str, extra: &[&str]) -> (Fixture, Registered) {
    let port = free_port();
    let config_name = format!("{name}-{}-keyhaven", super::unique_suffix());
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--webhook-addr",
        &addr,
        "--webhook-hosts",
        "127.0.0.1",
        "--webhook-config-name",
        &config_name,
    ];
    args.extend_from_slice(extra);
    let fx = Fixture::new_with(name, &args).await;
    let registered = Registered {
        name: config_name.clone(),
        kubeconfig: fx.kubeconfig.clone(),
    };
    let (mutating, validating) = configurations(
        &config_name,
        &fx.ns,
        port,
        &["managedsecrets", "secretapprovals"],
        true,
    );
    fx.apply::<MutatingWebhookConfiguration>(fx.cluster_api(), mutating)
        .await;
    fx.apply::<ValidatingWebhookConfiguration>(fx.cluster_api(), validating)
        .await;
    let bundled = wait_until(Duration::from_secs(30), || async {
        let v: Api<ValidatingWebhookConfiguration> = fx.cluster_api();
        let has = |b: Option<&k8s_openapi::ByteString>| b.is_some_and(|b| !b.0.is_empty());
        let v = v.get(&config_name).await.ok()?;
        has(v.webhooks?[0].client_config.ca_bundle.as_ref()).then_some(())
    })
    .await;
    assert!(bundled.is_some(), "caBundle never patched");
    (fx, registered)
}

/// Roles: `editor` (ManagedSecrets, Secrets and decisions, no `approve`) and `approver`
/// (the same and `approve`); each user bound to one.
pub async fn people(fx: &Fixture, users: &[(&str, &str)]) {
    let rules = |approve: bool| {
        let mut verbs = vec![
            "get", "list", "watch", "create", "update", "patch", "delete",
        ];
        if approve {
            verbs.push("approve");
        }
        json!([{"apiGroups": ["keyhaven.io"], "resources": ["managedsecrets"], "verbs": verbs},
            {"apiGroups": ["keyhaven.io"], "resources": ["secretapprovals"],
                "verbs": ["get", "list", "create"]},
            {"apiGroups": [""], "resources": ["secrets"],
                "verbs": ["get", "list", "create", "update", "patch"]}])
    };
    for (role, approve) in [("editor", false), ("approver", true)] {
        fx.apply::<Role>(
            fx.ns_api(&fx.ns),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": role, "namespace": fx.ns}, "rules": rules(approve)}),
        )
        .await;
    }
    for (user, role) in users {
        let mut rb = super::chart::binding(user, Some(&fx.ns), role, &user_name(fx, user));
        rb["roleRef"]["kind"] = "Role".into();
        fx.apply::<RoleBinding>(fx.ns_api(&fx.ns), rb).await;
    }
}

pub fn user_name(fx: &Fixture, user: &str) -> String {
    format!("{}-{user}", fx.ns)
}

/// `kubectl --as` applies `object`, retried while RBAC bindings reach the authorizer.
pub async fn apply_as(fx: &Fixture, user: &str, object: &Value) {
    let user = user_name(fx, user);
    let text = object.to_string();
    let done = wait_until(Duration::from_secs(30), || async {
        kubectl_as(&user, &["apply", "-f", "-"], Some(&text))
            .0
            .then_some(())
    })
    .await;
    if done.is_none() {
        let (_, out) = kubectl_as(&user, &["apply", "-f", "-"], Some(&text));
        panic!("{user} could not apply: {out}");
    }
}

/// A decision by `user` on `secret`'s open request: accepted, or the refusal's text.
pub fn decide(
    fx: &Fixture,
    user: &str,
    name: &str,
    secret: &str,
    request: &str,
    approve: bool,
) -> Result<(), String> {
    let obj = json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "SecretApproval",
        "metadata": {"name": name, "namespace": fx.ns,
            "annotations": {"keyhaven.io/decided-by": "someone-else"}},
        "spec": {"secretRef": {"name": secret}, "request": request,
            "decision": if approve { "Approve" } else { "Reject" }, "comment": "reviewed"}});
    let (ok, out) = kubectl_as(
        &user_name(fx, user),
        &["create", "-f", "-"],
        Some(&obj.to_string()),
    );
    if ok { Ok(()) } else { Err(out) }
}

pub fn managed(fx: &Fixture, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "keyhaven.io/v1alpha1", "kind": "ManagedSecret",
        "metadata": {"name": name, "namespace": fx.ns,
            "labels": {super::operator::SCOPE_LABEL: fx.ns}},
        "spec": spec})
}

pub async fn pending(fx: &Fixture, name: &str) -> ManagedSecret {
    fx.wait_managed(name, "PendingApproval", |m| {
        m.status.as_ref().is_some_and(|s| {
            s.phase == Some(ManagedSecretPhase::PendingApproval)
                && s.approval
                    .as_ref()
                    .is_some_and(|a| a.state == RequestState::Pending)
        })
    })
    .await
}

pub fn request_id(ms: &ManagedSecret) -> String {
    ms.status
        .as_ref()
        .unwrap()
        .approval
        .as_ref()
        .unwrap()
        .id
        .clone()
}
