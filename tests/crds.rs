//! `crds/` must be exactly what `keyhaven crds` generates from the Rust types, and every
//! string, list and map in those schemas must have a maximum (issue 17: a cluster without
//! the admission webhook still refuses oversized input, and no status outgrows etcd).

use keyhaven::api::{crd_file_name, crd_yaml, crds};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn crds_directory_matches_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut expected = BTreeSet::new();
    for crd in crds() {
        let name = crd_file_name(&crd);
        let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert!(
            on_disk == crd_yaml(&crd),
            "crds/{name} drifted from src/api: regenerate with `cargo run -- crds --out-dir crds`"
        );
        expected.insert(name);
    }
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(present, expected, "crds/ holds files no CRD generates");
}

/// Strings that need no `maxLength` of ours: `apiVersion` and `kind` at the root, which the
/// API server itself holds to the CRD's group, version and kind.
const UNBOUNDED_ALLOWED: &[&str] = &[".apiVersion", ".kind"];

/// Collects into `out` the JSON path (`.spec.target.labels.*`, `.status.versions[]`) of every
/// `type: string` without `maxLength` (an `enum` is bounded by its values), every
/// `type: array` without `maxItems`, and every `type: object` with `additionalProperties`
/// (a map) without `maxProperties`, under `schema`.
fn unbounded(schema: &Value, path: &str, out: &mut Vec<String>) {
    let has = |key: &str| schema.get(key).is_some();
    match schema.get("type").and_then(Value::as_str) {
        Some("string")
            if !has("maxLength") && !has("enum") && !UNBOUNDED_ALLOWED.contains(&path) =>
        {
            out.push(format!("{path}: string without maxLength"))
        }
        Some("array") if !has("maxItems") => out.push(format!("{path}: array without maxItems")),
        Some("object") if has("additionalProperties") && !has("maxProperties") => {
            out.push(format!("{path}: map without maxProperties"))
        }
        _ => {}
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) && !has("maxLength") {
        out.push(format!("{path}: int-or-string without maxLength"));
    }
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in properties {
            unbounded(sub, &format!("{path}.{name}"), out);
        }
    }
    if let Some(items) = schema.get("items") {
        unbounded(items, &format!("{path}[]"), out);
    }
    if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        unbounded(values, &format!("{path}.*"), out);
    }
    for combinator in ["allOf", "anyOf", "oneOf"] {
        for (i, sub) in schema
            .get(combinator)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            unbounded(sub, &format!("{path}({combinator}[{i}])"), out);
        }
    }
    if let Some(not) = schema.get("not") {
        unbounded(not, &format!("{path}(not)"), out);
    }
}

#[test]
fn every_string_list_and_map_of_every_crd_is_bounded() {
    let mut found = Vec::new();
    for crd in crds() {
        for version in &crd.spec.versions {
            let schema = version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("every version has a schema");
            let schema = serde_json::to_value(schema).unwrap();
            let mut here = Vec::new();
            unbounded(&schema, "", &mut here);
            let kind = &crd.spec.names.kind;
            found.extend(
                here.into_iter()
                    .map(|p| format!("{kind} {}: {p}", version.name)),
            );
        }
    }
    assert!(
        found.is_empty(),
        "{} unbounded schema nodes (give each a maxLength / maxItems / maxProperties):\n{}",
        found.len(),
        found.join("\n")
    );
}

/// The walker itself: it finds what it must, and lets through what it may.
#[test]
fn the_walker_names_every_unbounded_node() {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "s": {"type": "string"},
            "e": {"type": "string", "enum": ["A"]},
            "ok": {"type": "string", "maxLength": 3},
            "list": {"type": "array", "items": {"type": "string"}},
            "map": {"type": "object", "maxProperties": 2, "additionalProperties": {"type": "string"}},
            "nested": {"type": "object", "properties": {"t": {"type": "string", "format": "date-time"}}},
        }
    });
    let mut found = Vec::new();
    unbounded(&schema, "", &mut found);
    assert_eq!(
        found,
        [
            ".list: array without maxItems",
            ".list[]: string without maxLength",
            ".map.*: string without maxLength",
            ".nested.t: string without maxLength",
            ".s: string without maxLength",
        ]
    );
}

/// The longest JSON text, in bytes, of a value of `schema` (every optional field present,
/// every text, list and map at its maximum), where each character of a text takes
/// `char_bytes` bytes.
fn max_json_len(schema: &Value, char_bytes: usize) -> usize {
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return values
            .iter()
            .map(|v| v.to_string().len())
            .max()
            .unwrap_or(0);
    }
    let max = |key: &str| {
        schema
            .get(key)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("unbounded: {schema}")) as usize
    };
    match schema.get("type").and_then(Value::as_str) {
        Some("string") => 2 + max("maxLength") * char_bytes,
        Some("integer") => 20,
        Some("number") => 24,
        Some("boolean") => 5,
        Some("array") => {
            let n = max("maxItems");
            2 + n * max_json_len(&schema["items"], char_bytes) + n.saturating_sub(1)
        }
        Some("object") if schema.get("additionalProperties").is_some() => {
            let n = max("maxProperties");
            // Keys are bounded by CEL rules of at most 317 characters.
            let entry = 2
                + 317 * char_bytes
                + 1
                + max_json_len(&schema["additionalProperties"], char_bytes);
            2 + n * entry + n.saturating_sub(1)
        }
        Some("object") => {
            let properties = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let n = properties.len();
            let fields: usize = properties
                .iter()
                .map(|(name, sub)| name.len() + 3 + max_json_len(sub, char_bytes))
                .sum();
            2 + fields + n.saturating_sub(1)
        }
        other => panic!("no size for type {other:?}: {schema}"),
    }
}

/// The status schema of the CRD of `kind`.
fn status_schema(kind: &str) -> Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap();
    let schema = crd.spec.versions[0].schema.as_ref().unwrap();
    serde_json::to_value(schema.open_api_v3_schema.as_ref().unwrap()).unwrap()["properties"]
        ["status"]
        .clone()
}

/// Whatever the history, a status keyhaven writes stays below 512 KiB: the worst case from
/// the schema's bounds, with every text at its `maxLength` in bytes (keyhaven cuts the free
/// texts it writes to their maximum in stored bytes, `api::clamp_text`; the other texts are
/// ASCII names, fingerprints and timestamps). Printed too: the worst case for another writer
/// of the status subresource, held to the schema alone, whose characters take 4 bytes (UTF-8)
/// or 6 (escaped by the API server's JSON encoder).
#[test]
fn no_status_can_outgrow_half_a_mebibyte() {
    for kind in ["SecretStore", "VaultProfile", "ManagedSecret"] {
        let status = status_schema(kind);
        let (ascii, utf8, escaped) = (
            max_json_len(&status, 1),
            max_json_len(&status, 4),
            max_json_len(&status, 6),
        );
        println!(
            "{kind}: status at most {ascii} bytes as keyhaven writes it; by the schema alone \
             {utf8} (4-byte characters), {escaped} (escaped characters)"
        );
        assert!(ascii < 512 * 1024, "{kind}: {ascii}");
    }
    let ms = status_schema("ManagedSecret");
    for part in ["versions", "targets", "conditions"] {
        let p = &ms["properties"][part];
        println!(
            "ManagedSecret .status.{part}: {} × {} bytes",
            p["maxItems"],
            max_json_len(&p["items"], 1)
        );
    }
}
