//! The value of a secret: named byte strings, wiped from memory when dropped and never
//! printed.

use std::collections::BTreeMap;
use std::fmt;
use zeroize::Zeroize;

/// A secret's key/values. `Debug` prints key names only; values are zeroized on drop.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretData(BTreeMap<String, Vec<u8>>);

impl Drop for SecretData {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            v.zeroize();
        }
    }
}

impl SecretData {
    /// An empty value.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) {
        if let Some(mut old) = self.0.insert(key.into(), value.into()) {
            old.zeroize();
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.get(key).map(Vec::as_slice)
    }

    /// Key/values in key order (the canonical order used for fingerprints).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The key names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Canonical serialization for encryption at rest: JSON of key → base64(value).
    pub fn to_sealed_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        use base64::Engine as _;
        let mut map = serde_json::Map::new();
        for (k, v) in self.iter() {
            map.insert(
                k.to_owned(),
                base64::engine::general_purpose::STANDARD.encode(v).into(),
            );
        }
        let mut value = serde_json::Value::Object(map);
        let bytes = serde_json::to_vec(&value).expect("a JSON map always serializes");
        wipe_json(&mut value);
        zeroize::Zeroizing::new(bytes)
    }

    /// Inverse of [`SecretData::to_sealed_bytes`].
    pub fn from_sealed_bytes(bytes: &[u8]) -> Result<Self, String> {
        use base64::Engine as _;
        let mut map: BTreeMap<String, String> = serde_json::from_slice(bytes)
            .map_err(|e| format!("sealed value is not a JSON map: {}", e.classify() as u8))?;
        let mut data = SecretData::new();
        for (k, v) in map.iter_mut() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .map_err(|_| format!("sealed value of key {k:?} is not base64"))?;
            v.zeroize();
            data.insert(k.clone(), decoded);
        }
        Ok(data)
    }
}

/// Best effort: overwrite the strings of a JSON value before it is dropped.
fn wipe_json(value: &mut serde_json::Value) {
    if let serde_json::Value::Object(map) = value {
        for (_, v) in map.iter_mut() {
            if let serde_json::Value::String(s) = v {
                s.zeroize();
            }
        }
    }
}

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretData")
            .field("keys", &self.0.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<K: Into<String>, V: Into<Vec<u8>>> FromIterator<(K, V)> for SecretData {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut data = SecretData::new();
        for (k, v) in iter {
            data.insert(k, v);
        }
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_values() {
        let data: SecretData = [("password", "hunter2-very-secret")].into_iter().collect();
        let shown = format!("{data:?}");
        assert!(shown.contains("password"));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn sealed_bytes_round_trip() {
        let data: SecretData = [("a", b"\x00\xff binary".to_vec()), ("b", b"text".to_vec())]
            .into_iter()
            .collect();
        let bytes = data.to_sealed_bytes();
        assert_eq!(SecretData::from_sealed_bytes(&bytes).unwrap(), data);
        assert!(SecretData::from_sealed_bytes(b"not json").is_err());
    }
}
