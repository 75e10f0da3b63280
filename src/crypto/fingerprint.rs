//! Fingerprints identify a version's content without revealing it: an HMAC-SHA256 of the
//! type and the canonical key/values, keyed so that it cannot be guessed offline (an
//! unkeyed hash of a weak password could be).
//!
//! Two schemes, recorded in the fingerprint's prefix, so each version says how it was made:
//! - `hmac-sha256-ns:` (current): keyed by a key derived per namespace with HKDF-SHA256 from
//!   the operator's fingerprint key, so equal values in two namespaces have unrelated
//!   fingerprints and a fingerprint says nothing across tenants;
//! - `hmac-sha256:` (v1, before per-namespace keys): keyed by the operator's key itself.
//!   Versions recorded under it keep verifying; new versions are never made under it.

use crate::secret_data::SecretData;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::fmt;
use zeroize::Zeroizing;

const NAMESPACED: &str = "hmac-sha256-ns:";
const GLOBAL: &str = "hmac-sha256:";

/// How a fingerprint was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Keyed per namespace (HKDF from the operator's key): the current scheme.
    Namespaced,
    /// Keyed by the operator's key itself (v1).
    Global,
}

impl Scheme {
    fn prefix(self) -> &'static str {
        match self {
            Scheme::Namespaced => NAMESPACED,
            Scheme::Global => GLOBAL,
        }
    }

    /// The scheme a recorded fingerprint names (None: not a fingerprint).
    pub fn of(text: &str) -> Option<Scheme> {
        if text.starts_with(NAMESPACED) {
            Some(Scheme::Namespaced)
        } else if text.starts_with(GLOBAL) {
            Some(Scheme::Global)
        } else {
            None
        }
    }
}

/// A fingerprint as recorded (status, stamps, annotations): `<scheme prefix><hex>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses a fingerprint recorded earlier (status, annotations), of either scheme.
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text
            .strip_prefix(NAMESPACED)
            .or_else(|| text.strip_prefix(GLOBAL))?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Fingerprint(text.to_owned()))
    }

    /// The hex digest without the scheme prefix (for short displays).
    pub fn digest(text: &str) -> &str {
        text.split_once(':').map_or(text, |(_, hex)| hex)
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

/// The fingerprints of one content in one namespace, under every scheme: new versions are
/// recorded with [`current`](Self::current); a recorded fingerprint is compared under its
/// own scheme ([`matches`](Self::matches)).
#[derive(Clone, PartialEq, Eq)]
pub struct ContentFingerprint {
    current: Fingerprint,
    global: Fingerprint,
}

impl ContentFingerprint {
    /// The fingerprint a new version of this content is recorded with.
    pub fn current(&self) -> &Fingerprint {
        &self.current
    }

    /// This content's fingerprint under the scheme of `recorded` (the current scheme when
    /// nothing is recorded or the text names no scheme).
    pub fn in_scheme_of(&self, recorded: Option<&str>) -> &Fingerprint {
        match recorded.and_then(Scheme::of) {
            Some(Scheme::Global) => &self.global,
            _ => &self.current,
        }
    }

    /// Whether this content is what `recorded` (of any scheme) fingerprints.
    pub fn matches(&self, recorded: &str) -> bool {
        self.in_scheme_of(Some(recorded)).as_str() == recorded
    }
}

#[cfg(test)]
impl ContentFingerprint {
    /// For tests of the decisions: a content whose current fingerprint is `current` and
    /// whose v1 fingerprint is the same digest under the v1 prefix.
    pub fn of(current: &Fingerprint) -> Self {
        ContentFingerprint {
            current: current.clone(),
            global: Fingerprint(format!("{GLOBAL}{}", Fingerprint::digest(current.as_str()))),
        }
    }
}

impl fmt::Debug for ContentFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentFingerprint({})", self.current.0)
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

    /// The fingerprints of `data` as a secret of type `secret_type` in `namespace`.
    pub fn content(
        &self,
        namespace: &str,
        secret_type: &str,
        data: &SecretData,
    ) -> ContentFingerprint {
        ContentFingerprint {
            current: mac(
                Scheme::Namespaced,
                &self.namespace_key(namespace)[..],
                secret_type,
                data,
            ),
            global: mac(Scheme::Global, &self.key[..], secret_type, data),
        }
    }

    /// The key of `namespace`'s fingerprints: HKDF-SHA256 of the operator's key, with the
    /// namespace's name as the info.
    fn namespace_key(&self, namespace: &str) -> Zeroizing<[u8; 32]> {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"keyhaven fingerprint key v2"), &self.key[..]);
        let mut okm = Zeroizing::new([0u8; 32]);
        hk.expand_multi_info(&[b"namespace\0", namespace.as_bytes()], &mut okm[..])
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        okm
    }
}

/// The MAC of the type and every key/value, each field length-prefixed so no two different
/// contents share an encoding.
fn mac(scheme: Scheme, key: &[u8], secret_type: &str, data: &SecretData) -> Fingerprint {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"keyhaven fingerprint v1\0");
    update_field(&mut mac, secret_type.as_bytes());
    mac.update(&(data.len() as u64).to_be_bytes());
    for (k, v) in data.iter() {
        update_field(&mut mac, k.as_bytes());
        update_field(&mut mac, v);
    }
    Fingerprint(format!(
        "{}{}",
        scheme.prefix(),
        hex::encode(mac.finalize().into_bytes())
    ))
}

fn update_field(mac: &mut Hmac<Sha256>, bytes: &[u8]) {
    mac.update(&(bytes.len() as u64).to_be_bytes());
    mac.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(key: u8, ns: &str, ty: &str, kv: &[(&str, &str)]) -> ContentFingerprint {
        let data: SecretData = kv
            .iter()
            .map(|(k, v)| (*k, v.as_bytes().to_vec()))
            .collect();
        Fingerprinter::new(Zeroizing::new([key; 32])).content(ns, ty, &data)
    }

    fn fp(key: u8, ty: &str, kv: &[(&str, &str)]) -> Fingerprint {
        content(key, "a", ty, kv).current().clone()
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
        assert!(a.as_str().starts_with("hmac-sha256-ns:"));
        assert!(Fingerprint::parse("sha256:00").is_none());
    }

    #[test]
    fn one_value_has_unrelated_fingerprints_in_two_namespaces() {
        let kv = [("password", "same-everywhere")];
        let a = content(1, "team-a", "password", &kv);
        let b = content(1, "team-b", "password", &kv);
        assert_ne!(a.current(), b.current());
        assert!(!a.matches(b.current().as_str()));
        assert_eq!(Fingerprint::digest(a.current().as_str()).len(), 64);
        // The namespace's name is not a prefix game: "a" + "b-x" is not "ab" + "-x".
        assert_ne!(
            content(1, "ab", "t", &kv).current(),
            content(1, "a", "bt", &kv).current()
        );
    }

    #[test]
    fn versions_recorded_under_the_global_scheme_keep_verifying() {
        let kv = [("password", "old-value")];
        let a = content(1, "team-a", "password", &kv);
        // What v1 recorded: the operator's key itself, the same in every namespace.
        let v1 = mac(
            Scheme::Global,
            &[1; 32],
            "password",
            &kv.iter()
                .map(|(k, v)| (*k, v.as_bytes().to_vec()))
                .collect(),
        );
        assert!(v1.as_str().starts_with("hmac-sha256:"));
        assert_eq!(Scheme::of(v1.as_str()), Some(Scheme::Global));
        assert!(a.matches(v1.as_str()), "a v1 record still verifies");
        assert_eq!(a.in_scheme_of(Some(v1.as_str())), &v1);
        assert_eq!(a.in_scheme_of(None), a.current());
        assert!(a.matches(a.current().as_str()));
        let other = content(1, "team-a", "password", &[("password", "new-value")]);
        assert!(!other.matches(v1.as_str()), "and tells content apart");
    }
}
