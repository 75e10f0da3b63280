//! Unit tests of the vault store: value encoding, error phases, bookkeeping.

use super::*;
use crate::api::StorePhase;

#[test]
fn values_round_trip_through_vault_json_including_bytes() {
    let mut data = SecretData::new();
    data.insert("user", "alice");
    data.insert("key", vec![0u8, 159, 146, 150]);
    let (values, binary) = encode(&data);
    assert_eq!(binary, vec!["key".to_owned()]);
    let json: serde_json::Map<String, Value> = values
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    assert!(decode(&json, &binary) == data);
}

#[test]
fn non_string_values_written_by_other_tools_read_as_json_text() {
    let json = serde_json::json!({"port": 5432, "tls": true, "name": "db"});
    let data = decode(json.as_object().unwrap(), &[]);
    assert_eq!(data.get("port"), Some(&b"5432"[..]));
    assert_eq!(data.get("tls"), Some(&b"true"[..]));
    assert_eq!(data.get("name"), Some(&b"db"[..]));
}

#[test]
fn errors_map_to_store_phases() {
    let phase = |code: u16, errors: &[&str]| {
        let errors = errors.iter().map(|e| e.to_string()).collect();
        classify("v", "p", ClientError::APIError { code, errors }).phase()
    };
    assert_eq!(phase(503, &["Vault is sealed"]), StorePhase::Sealed);
    assert_eq!(phase(403, &["permission denied"]), StorePhase::Invalid);
    assert_eq!(phase(502, &[]), StorePhase::Unreachable);
}

#[test]
fn bookkeeping_serializes_with_version_keys() {
    let mut book = Bookkeeping {
        path: "a/b".into(),
        ..Default::default()
    };
    book.versions.insert(
        3,
        VersionEntry {
            version: 3,
            fingerprint: "hmac-sha256:00".into(),
            store_version: Some(7),
            binary: vec![],
            owner: None,
        },
    );
    let json = serde_json::to_value(&book).unwrap();
    assert_eq!(json["versions"]["3"]["storeVersion"], 7);
    let back: Bookkeeping = serde_json::from_value(json).unwrap();
    assert_eq!(back, book);
}

#[test]
fn kubernetes_auth_tokens_are_for_vault_unless_audiences_say_otherwise() {
    let auth = |audiences: serde_json::Value| -> crate::api::VaultKubernetesAuth {
        serde_json::from_value(serde_json::json!({"role": "r", "audiences": audiences})).unwrap()
    };
    assert_eq!(
        session::token_audiences(&auth(serde_json::json!([]))),
        ["vault"]
    );
    assert_eq!(session::DEFAULT_AUDIENCE, "vault");
    assert_eq!(
        session::token_audiences(&auth(serde_json::json!(["https://vault.example.com", "b"]))),
        ["https://vault.example.com", "b"]
    );
}
