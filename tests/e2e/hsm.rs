//! The bed's SoftHSM2 token as the pkcs11 tests use it: a PIN Secret, a provider on the
//! token, the store as the operator sees it, and KEKs destroyed at the end of a test.

use super::Testbed;
use super::fixture::Fixture;
use cryptoki::object::Attribute;
use k8s_openapi::api::core::v1::Namespace;
use keyhaven::api::Pkcs11Provider;
use keyhaven::backend::{ModuleAllowList, Pkcs11Store};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

pub const PIN_SECRET: &str = "hsm-pin";

/// A KEK label unique to this test.
pub fn kek_label(fx: &Fixture, name: &str) -> String {
    format!("e2e-{}-{name}", fx.ns)
}

/// Destroys the test's keys on the shared token when dropped (declare it before the
/// fixture, so the operator is gone first).
pub struct TokenKeys(pub Vec<String>);

impl Drop for TokenKeys {
    fn drop(&mut self) {
        let labels = std::mem::take(&mut self.0);
        // Never panic in a Drop that may run while a failed test unwinds.
        let _ = std::panic::catch_unwind(move || {
            let session = Testbed::load().pkcs11_session();
            for label in &labels {
                let found = session
                    .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
                    .unwrap_or_default();
                for key in found {
                    let _ = session.destroy_object(key);
                }
            }
        });
    }
}

/// Writes the PIN Secret in the operator's namespace (the pinSecretRef default), creating
/// the namespace if the operator has not yet.
pub async fn set_pin(fx: &Fixture, pin: &str) {
    let ns = &fx.op.namespace;
    let namespaces: Api<Namespace> = fx.cluster_api();
    let obj: Namespace = serde_json::from_value(
        json!({"metadata": {"name": ns, "labels": {"keyhaven.io/e2e": "true"}}}),
    )
    .unwrap();
    match namespaces.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create namespace {ns}: {e}"),
    }
    fx.secret(ns, PIN_SECRET, &[("pin", pin)]).await;
}

/// The `pkcs11` provider of a store on the bed's token.
pub fn provider(module: &str, token: &str, kek: &str) -> Value {
    json!({"pkcs11": {
        "module": module,
        "tokenLabel": token,
        "pinSecretRef": {"name": PIN_SECRET, "key": "pin"},
        "kekLabel": kek,
    }})
}

pub fn bed_provider(kek: &str) -> Value {
    let bed = Testbed::load();
    provider(
        &bed.pkcs11_module.display().to_string(),
        &bed.pkcs11_token,
        kek,
    )
}

/// The store `name` as the operator sees it (same token, same records), in this process.
pub fn hsm_store(fx: &Fixture, name: &str, kek: &str) -> Pkcs11Store {
    let spec: Pkcs11Provider = serde_json::from_value(bed_provider(kek)["pkcs11"].clone()).unwrap();
    let modules = ModuleAllowList::parse(&[&spec.module]).unwrap();
    Pkcs11Store::new(name, fx.client.clone(), &fx.op.namespace, &spec, &modules).unwrap()
}

/// The usual start of a pkcs11 test: the PIN Secret, and a SecretStore `hsm` on the bed's
/// token with a KEK of this test's own (destroyed with `keys`). Returns the store's name
/// and the KEK's label.
pub async fn hsm_setup(fx: &Fixture, keys: &mut TokenKeys) -> (String, String) {
    let kek = kek_label(fx, "kek");
    keys.0.push(kek.clone());
    set_pin(fx, &Testbed::load().pkcs11_pin).await;
    (fx.store("hsm", bed_provider(&kek)).await, kek)
}
