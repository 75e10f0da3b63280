//! Fingerprints identify a version's content without revealing it: an HMAC-SHA256, keyed
//! by an operator-held key, of the type and the canonical key/values. Unkeyed hashes of a
//! weak password could be guessed offline; these cannot without the key.

use crate::secret_data::SecretData;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::fmt;
use zeroize::Zeroizing;

/// A fingerprint as shown in status: `hmac-sha256:<hex>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses a fingerprint recorded earlier (status, annotations).
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix("hmac-sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Fingerprint(text.to_owned()))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.0)
    }
}

/// Computes fingerprints with the operator's fingerprint key.
pub struct Fingerprinter {
    key: Zeroizing<[u8; 32]>,
}

impl Fingerprinter {
    pub fn new(key: Zeroizing<[u8; 32]>) -> Self {
        Fingerprinter { key }
    }

    /// The fingerprint of `data` as a secret of type `secret_type`. Every field is
    /// length-prefixed, so no two different contents share an encoding.
    pub fn fingerprint(&self, secret_type: &str, data: &SecretData) -> Fingerprint {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key[..])
            .expect("HMAC takes any key length");
        mac.update(b"keyhaven fingerprint v1\0");
        update_field(&mut mac, secret_type.as_bytes());
        mac.update(&(data.len() as u64).to_be_bytes());
        for (k, v) in data.iter() {
            update_field(&mut mac, k.as_bytes());
            update_field(&mut mac, v);
        }
        Fingerprint(format!(
            "hmac-sha256:{}",
            hex::encode(mac.finalize().into_bytes())
        ))
    }
}

fn update_field(mac: &mut Hmac<Sha256>, bytes: &[u8]) {
    mac.update(&(bytes.len() as u64).to_be_bytes());
    mac.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(key: u8, ty: &str, kv: &[(&str, &str)]) -> Fingerprint {
        let data: SecretData = kv
            .iter()
            .map(|(k, v)| (*k, v.as_bytes().to_vec()))
            .collect();
        Fingerprinter::new(Zeroizing::new([key; 32])).fingerprint(ty, &data)
    }

    #[test]
    fn stable_and_sensitive() {
        let a = fp(1, "key-value", &[("a", "1"), ("b", "2")]);
        assert_eq!(
            a,
            fp(1, "key-value", &[("b", "2"), ("a", "1")]),
            "order of insertion does not matter"
        );
        assert_ne!(
            a,
            fp(1, "generic", &[("a", "1"), ("b", "2")]),
            "type counts"
        );
        assert_ne!(
            a,
            fp(1, "key-value", &[("a", "1"), ("b", "3")]),
            "values count"
        );
        assert_ne!(a, fp(2, "key-value", &[("a", "1"), ("b", "2")]), "keyed");
        assert_ne!(
            fp(1, "t", &[("ab", "c")]),
            fp(1, "t", &[("a", "bc")]),
            "no ambiguous concatenation"
        );
        assert!(Fingerprint::parse(a.as_str()).is_some());
        assert!(Fingerprint::parse("sha256:00").is_none());
    }
}
