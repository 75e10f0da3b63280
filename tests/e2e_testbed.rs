//! The test bed is real: a kube-apiserver that issues ServiceAccount tokens, an OpenBao
//! that accepts them through its kubernetes auth method (TokenReview against that same
//! apiserver) and serves KV v1 and v2, a kube-controller-manager whose garbage collector
//! acts on ownerReferences, and a SoftHSM2 token that does AES-GCM. Nothing is mocked.

mod e2e;

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use e2e::{TestNamespace, Testbed, eventually, unique_suffix};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use vaultrs::api::auth::kubernetes::requests::CreateKubernetesRoleRequest;
use vaultrs::auth::kubernetes;
use vaultrs::error::ClientError;
use vaultrs::{kv1, kv2, sys};

/// Creates the ServiceAccount `name` in `ns` and returns a 10-minute token for it from the
/// TokenRequest API (the `token` subresource), as kubelet would mount into a pod.
async fn service_account_token(client: &Client, ns: &str, name: &str) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    sas.create(&PostParams::default(), &sa)
        .await
        .unwrap_or_else(|e| panic!("create ServiceAccount {ns}/{name}: {e}"));
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    sas.create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{name}: {e}"))
        .status
        .expect("TokenRequest has a status")
        .token
}

/// The HTTP status of a vaultrs error, when the server answered.
fn http_status(e: &ClientError) -> Option<u16> {
    match e {
        ClientError::APIError { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn service_account_token_logs_in_to_openbao() {
    let bed = Testbed::load();
    let client = bed.client().await;
    let ns = TestNamespace::create(&bed, &client, "bed-login").await;
    let app_jwt = service_account_token(&client, &ns, "app").await;
    let other_jwt = service_account_token(&client, &ns, "other").await;

    // A role bound to exactly ns/app, granting a policy that reads one KV v2 subtree.
    let root = bed.vault_root();
    let role = ns.name.clone();
    let subtree = format!("e2e/{ns}");
    let policy = format!(r#"path "secret/data/{subtree}/*" {{ capabilities = ["read"] }}"#);
    sys::policy::set(&root, &role, &policy)
        .await
        .expect("write policy");
    kubernetes::role::create(
        &root,
        "kubernetes",
        &role,
        Some(
            &mut CreateKubernetesRoleRequest::builder()
                .bound_service_account_names(vec!["app".to_owned()])
                .bound_service_account_namespaces(vec![ns.name.clone()])
                .token_policies(vec![role.clone()])
                .token_ttl("5m"),
        ),
    )
    .await
    .expect("create kubernetes auth role");
    kv2::set(
        &root,
        "secret",
        &format!("{subtree}/db"),
        &BTreeMap::from([("password", "from-openbao")]),
    )
    .await
    .expect("write the secret the app may read");

    // OpenBao checks the JWT with a TokenReview against the bed's apiserver.
    let auth = kubernetes::login(&root, "kubernetes", &role, &app_jwt)
        .await
        .expect("kubernetes login with the app's ServiceAccount token");
    assert!(
        auth.policies.contains(&role),
        "policies: {:?}",
        auth.policies
    );
    let meta = auth.metadata.unwrap_or_default();
    assert_eq!(
        meta.get("service_account_name").map(String::as_str),
        Some("app")
    );
    assert_eq!(meta.get("service_account_namespace"), Some(&ns.name));

    // The token it got reads what the policy allows, and nothing else.
    let app = bed.vault(&auth.client_token);
    let secret: BTreeMap<String, String> = kv2::read(&app, "secret", &format!("{subtree}/db"))
        .await
        .expect("the app reads its secret");
    assert_eq!(secret["password"], "from-openbao");
    let denied = kv2::read::<BTreeMap<String, String>>(&app, "secret", "e2e/elsewhere")
        .await
        .expect_err("the policy grants nothing outside its subtree");
    assert_eq!(http_status(&denied), Some(403), "{denied}");

    // Another ServiceAccount of the same namespace is not bound to the role.
    let refused = kubernetes::login(&root, "kubernetes", &role, &other_jwt)
        .await
        .expect_err("a ServiceAccount the role does not name is refused");
    assert_eq!(http_status(&refused), Some(403), "{refused}");

    // Best effort: the dev server is in memory and the names are unique anyway.
    let _ = kv2::delete_metadata(&root, "secret", &format!("{subtree}/db")).await;
    let _ = kubernetes::role::delete(&root, "kubernetes", &role).await;
    let _ = sys::policy::delete(&root, &role).await;
}

#[tokio::test]
async fn openbao_kv_v2_keeps_versions_and_kv_v1_round_trips() {
    let bed = Testbed::load();
    let root = bed.vault_root();
    let path = format!("e2e/bed-{}", unique_suffix());

    // KV v2 at secret/ (dev mode's default mount): every write is a new version.
    kv2::set(
        &root,
        "secret",
        &path,
        &BTreeMap::from([("user", "alice"), ("password", "one")]),
    )
    .await
    .expect("kv2 write v1");
    let written = kv2::set(
        &root,
        "secret",
        &path,
        &BTreeMap::from([("user", "alice"), ("password", "two")]),
    )
    .await
    .expect("kv2 write v2");
    assert_eq!(written.version, 2);
    let latest: BTreeMap<String, String> =
        kv2::read(&root, "secret", &path).await.expect("kv2 read");
    assert_eq!(latest["password"], "two");
    let first: BTreeMap<String, String> = kv2::read_version(&root, "secret", &path, 1)
        .await
        .expect("kv2 read version 1");
    assert_eq!(first["password"], "one");
    let meta = kv2::read_metadata(&root, "secret", &path)
        .await
        .expect("kv2 metadata");
    assert_eq!(meta.current_version, 2);
    kv2::delete_metadata(&root, "secret", &path)
        .await
        .expect("kv2 delete");
    let gone = kv2::read::<BTreeMap<String, String>>(&root, "secret", &path)
        .await
        .expect_err("deleted with its metadata");
    assert_eq!(http_status(&gone), Some(404), "{gone}");

    // KV v1 at kv/ (mounted by e2e/testbed): unversioned, a write replaces.
    kv1::set(&root, "kv", &path, &HashMap::from([("token", "abc")]))
        .await
        .expect("kv1 write");
    kv1::set(&root, "kv", &path, &HashMap::from([("token", "xyz")]))
        .await
        .expect("kv1 overwrite");
    let v1: BTreeMap<String, String> = kv1::get(&root, "kv", &path).await.expect("kv1 read");
    assert_eq!(v1, BTreeMap::from([("token".to_owned(), "xyz".to_owned())]));
    kv1::delete(&root, "kv", &path).await.expect("kv1 delete");
    let gone = kv1::get::<BTreeMap<String, String>>(&root, "kv", &path)
        .await
        .expect_err("deleted");
    assert_eq!(http_status(&gone), Some(404), "{gone}");
}

#[tokio::test]
async fn garbage_collector_deletes_dependents_of_a_deleted_owner() {
    let bed = Testbed::load();
    let client = bed.client().await;
    let ns = TestNamespace::create(&bed, &client, "bed-gc").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    let owner: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap();
    let owner = cms
        .create(&PostParams::default(), &owner)
        .await
        .expect("create owner");
    let dependent: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": "dependent",
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "ConfigMap",
                "name": owner.name_any(), "uid": owner.uid().expect("owner uid"),
            }],
        },
        "data": {"k": "v"},
    }))
    .unwrap();
    cms.create(&PostParams::default(), &dependent)
        .await
        .expect("create dependent");

    // Background propagation: the apiserver deletes the owner at once, and only
    // kube-controller-manager's garbage collector can delete the dependent.
    cms.delete("owner", &DeleteParams::background())
        .await
        .expect("delete owner");
    let collected = eventually(Duration::from_secs(60), || async {
        match cms.get_opt("dependent").await {
            Ok(None) => Some(()),
            Ok(Some(_)) => None,
            Err(e) => panic!("get dependent: {e}"),
        }
    })
    .await;
    assert!(
        collected.is_some(),
        "the garbage collector did not delete the dependent within 60 s: is \
         kube-controller-manager running? (e2e/testbed status)"
    );
}

#[test]
fn softhsm_token_generates_an_aes_key_and_round_trips_aes_gcm() {
    let bed = Testbed::load();
    let session = bed.pkcs11_session();

    // A session object: gone when the session closes, so nothing accumulates on the token.
    let label = format!("e2e-{}", unique_suffix());
    let key = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(label.into_bytes()),
            ],
        )
        .expect("generate an AES-256 key on the token");

    let plaintext = b"keyhaven e2e: a secret that never leaves the HSM in clear";
    // SoftHSM2 2.6 crashes on GCM with empty AAD (SoftHSMv2#605), so always pass some.
    let aad = b"keyhaven-e2e";
    let mut iv = [0u8; 12];
    session
        .generate_random_slice(&mut iv)
        .expect("C_GenerateRandom");

    let mut enc_iv = iv;
    let gcm = Mechanism::AesGcm(GcmParams::new(&mut enc_iv, aad, 128.into()).unwrap());
    let ciphertext = session
        .encrypt(&gcm, key, plaintext)
        .expect("AES-GCM encrypt");
    assert_eq!(
        ciphertext.len(),
        plaintext.len() + 16,
        "ciphertext || 128-bit tag"
    );
    assert_ne!(&ciphertext[..plaintext.len()], plaintext);

    let mut dec_iv = iv;
    let gcm = Mechanism::AesGcm(GcmParams::new(&mut dec_iv, aad, 128.into()).unwrap());
    let decrypted = session
        .decrypt(&gcm, key, &ciphertext)
        .expect("AES-GCM decrypt");
    assert_eq!(decrypted, plaintext);

    // The tag is checked: one flipped bit and decryption fails.
    let mut tampered = ciphertext.clone();
    tampered[0] ^= 1;
    let mut bad_iv = iv;
    let gcm = Mechanism::AesGcm(GcmParams::new(&mut bad_iv, aad, 128.into()).unwrap());
    assert!(
        session.decrypt(&gcm, key, &tampered).is_err(),
        "a tampered ciphertext decrypted"
    );

    session.destroy_object(key).expect("destroy the key");
}
