//! The admission webhook of a test's operator, registered by URL on loopback for the
//! test's namespace only; its configurations are deleted when the guard drops.

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::Api;
use kube::api::DeleteParams;
use serde_json::{Value, json};

/// A free loopback port for the webhook.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The mutating and validating configurations named `name`: by URL, for `resources` of
/// keyhaven.io in `ns`; the validating one also for DELETE when `deletes` (the operator
/// records who deletes: sideEffects NoneOnDryRun).
pub fn configurations(
    name: &str,
    ns: &str,
    port: u16,
    resources: &[&str],
    deletes: bool,
) -> (Value, Value) {
    let hook = |kind: &str| {
        let (side_effects, operations) = match (kind, deletes) {
            ("validate", true) => ("NoneOnDryRun", json!(["CREATE", "UPDATE", "DELETE"])),
            _ => ("None", json!(["CREATE", "UPDATE"])),
        };
        json!({"name": format!("{kind}.managedsecrets.keyhaven.io"),
            "admissionReviewVersions": ["v1"], "sideEffects": side_effects,
            "failurePolicy": "Fail", "timeoutSeconds": 5,
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/{kind}")},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
            "rules": [{"apiGroups": ["keyhaven.io"], "apiVersions": ["*"],
                "resources": resources, "operations": operations, "scope": "Namespaced"}]})
    };
    (
        json!({"apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration", "metadata": {"name": name},
            "webhooks": [hook("mutate")]}),
        json!({"apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration", "metadata": {"name": name},
            "webhooks": [hook("validate")]}),
    )
}

/// Deletes the test's webhook configurations when dropped (they fail closed).
pub struct Registered {
    pub name: String,
    pub kubeconfig: std::path::PathBuf,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.name);
        super::cleanup_blocking(&self.kubeconfig, move |client| async move {
            let dp = DeleteParams::default();
            let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
                .delete(&name, &dp)
                .await;
            let _ = Api::<ValidatingWebhookConfiguration>::all(client)
                .delete(&name, &dp)
                .await;
            Ok(())
        });
    }
}
