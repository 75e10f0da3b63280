//! What a value's key and certificate are, for the compliance rules (`crate::compliance`):
//! the key's algorithm and size, the leaf certificate's validity and whether it is a
//! self-signed leaf, whether the value has an expiry. Public facts only, never a value.
//!
//! Read from a value that passed [`super::validate_with`]: a part that does not parse is
//! left out (`None`), since validation refuses it anyway. Encrypted keys are opened by the
//! same code (and the same KDF cache) as validation: asking for the facts of a validated
//! value derives nothing again.

use super::parse;
use crate::api::SecretType;
use crate::secret_data::SecretData;
use pkcs8::ObjectIdentifier;
use pkcs8::der::Decode as _;
use x509_parser::prelude::{FromDer as _, ParsedExtension, X509Certificate};

const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
/// Named curves and their size in bits.
const CURVES: [(ObjectIdentifier, u32); 4] = [
    (ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7"), 256), // P-256
    (ObjectIdentifier::new_unwrap("1.3.132.0.34"), 384),        // P-384
    (ObjectIdentifier::new_unwrap("1.3.132.0.35"), 521),        // P-521
    (ObjectIdentifier::new_unwrap("1.3.132.0.10"), 256),        // secp256k1
];

/// A key's algorithm and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFacts {
    /// RSA, with the size of its modulus.
    Rsa {
        bits: u32,
    },
    /// EC, with the size of its curve (P-256: 256).
    Ec {
        bits: u32,
    },
    Ed25519,
    /// Any other algorithm (e.g. an SSH DSA key).
    Other,
}

/// What a (leaf) certificate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertificateFacts {
    /// notAfter − notBefore, in seconds (0 if notAfter comes first).
    pub validity_seconds: u64,
    /// A self-signed leaf: subject = issuer, not a CA (basicConstraints CA=true), and its
    /// signature verifies with its own key — or, when the signature's algorithm cannot be
    /// verified here, its authority key id equals its subject key id.
    pub self_signed_leaf: bool,
}

/// What a value's key and certificate are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// private-key, ssh-key; certificate (the leaf's public key, which validation holds to
    /// be `tls.key`'s); keystore (its first private key entry's key, else that entry's
    /// leaf certificate's).
    pub key: Option<KeyFacts>,
    /// certificate: the leaf (first certificate) of `tls.crt`; keystore: the leaf of its
    /// first private key entry's chain.
    pub certificate: Option<CertificateFacts>,
    /// api-key: a valid `expires-at`; jwt: an `exp` claim; certificate: always (notAfter).
    pub has_expiry: bool,
}

/// The facts of `data`, a value of `secret_type`. CPU-heavy for the key types (call it from a
/// blocking thread); types without a key or an expiry have none.
pub fn facts(secret_type: SecretType, data: &SecretData) -> Facts {
    let text = |key: &str| data.get(key).and_then(|v| std::str::from_utf8(v).ok());
    let passphrase = data.get("passphrase").filter(|p| !p.is_empty());
    match secret_type {
        SecretType::PrivateKey => Facts {
            key: text("private-key")
                .and_then(|k| parse::private_key_spki(k, passphrase).ok())
                .map(|spki| spki_facts(&spki)),
            ..Facts::default()
        },
        SecretType::SshKey => Facts {
            key: text("ssh-privatekey")
                .and_then(|k| parse::ssh_public_key(k, passphrase).ok())
                .and_then(|public| ssh_facts(&public)),
            ..Facts::default()
        },
        SecretType::Certificate => {
            let leaf = text("tls.crt").and_then(leaf_der);
            let parsed = leaf.as_deref().and_then(|der| {
                let (_, cert) = X509Certificate::from_der(der).ok()?;
                Some((spki_facts(cert.public_key().raw), certificate_facts(&cert)))
            });
            Facts {
                key: parsed.map(|(k, _)| k),
                certificate: parsed.map(|(_, c)| c),
                has_expiry: true,
            }
        }
        SecretType::Keystore => match (data.get("keystore.p12"), text("password")) {
            (Some(store), Some(password)) => parse::keystore_facts(store, password)
                .map(|(_, f)| f)
                .unwrap_or_default(),
            _ => Facts::default(),
        },
        SecretType::ApiKey => Facts {
            has_expiry: text("expires-at").is_some_and(|at| at.parse::<jiff::Timestamp>().is_ok()),
            ..Facts::default()
        },
        SecretType::Jwt => Facts {
            has_expiry: text("token").is_some_and(|t| matches!(parse::jwt(t), Ok(Some(_)))),
            ..Facts::default()
        },
        SecretType::KeyValue
        | SecretType::Generic
        | SecretType::BasicAuth
        | SecretType::Password
        | SecretType::SecretKey => Facts::default(),
    }
}

/// The DER of the first CERTIFICATE block of `chain`.
fn leaf_der(chain: &str) -> Option<Vec<u8>> {
    parse::pem_blocks(chain)
        .ok()?
        .into_iter()
        .find(|b| b.label == "CERTIFICATE")
        .map(|b| b.der)
}

/// The algorithm and size of a SubjectPublicKeyInfo (DER); `Other` when it does not parse.
pub(crate) fn spki_facts(spki: &[u8]) -> KeyFacts {
    let Ok(info) = pkcs8::spki::SubjectPublicKeyInfoRef::from_der(spki) else {
        return KeyFacts::Other;
    };
    let oid = info.algorithm.oid;
    if oid == OID_RSA {
        rsa::pkcs1::RsaPublicKey::from_der(info.subject_public_key.raw_bytes()).map_or(
            KeyFacts::Other,
            |k| KeyFacts::Rsa {
                bits: bit_length(k.modulus.as_bytes()),
            },
        )
    } else if oid == OID_EC {
        let curve = info.algorithm.parameters_oid().ok();
        let named = CURVES.iter().find(|(c, _)| Some(*c) == curve);
        // An unnamed curve: the size of an uncompressed point's coordinate.
        let bits = named.map_or_else(
            || {
                let point = info.subject_public_key.raw_bytes();
                (point.len().saturating_sub(1) / 2 * 8) as u32
            },
            |(_, bits)| *bits,
        );
        KeyFacts::Ec { bits }
    } else if oid == OID_ED25519 {
        KeyFacts::Ed25519
    } else {
        KeyFacts::Other
    }
}

/// The algorithm and size of an OpenSSH public key (`ssh-ed25519 AAAA...`).
pub(crate) fn ssh_facts(public: &str) -> Option<KeyFacts> {
    use ssh_key::public::KeyData;
    let key = ssh_key::PublicKey::from_openssh(public).ok()?;
    Some(match key.key_data() {
        KeyData::Rsa(k) => KeyFacts::Rsa {
            bits: bit_length(k.n.as_positive_bytes().unwrap_or_default()),
        },
        KeyData::Ecdsa(k) => KeyFacts::Ec {
            bits: match k.curve() {
                ssh_key::EcdsaCurve::NistP256 => 256,
                ssh_key::EcdsaCurve::NistP384 => 384,
                ssh_key::EcdsaCurve::NistP521 => 521,
            },
        },
        KeyData::Ed25519(_) => KeyFacts::Ed25519,
        _ => KeyFacts::Other,
    })
}

/// The number of significant bits of a big-endian unsigned integer.
fn bit_length(be: &[u8]) -> u32 {
    let be = &be[be.iter().take_while(|b| **b == 0).count()..];
    match be.first() {
        None => 0,
        Some(first) => (be.len() as u32 - 1) * 8 + (8 - first.leading_zeros()),
    }
}

/// The validity and self-signed-leaf facts of a certificate.
pub(crate) fn certificate_facts(cert: &X509Certificate<'_>) -> CertificateFacts {
    let validity = cert.validity();
    let seconds = validity.not_after.timestamp() - validity.not_before.timestamp();
    let self_named = cert.subject().as_raw() == cert.issuer().as_raw();
    let self_signed = || {
        cert.verify_signature(None).is_ok() || {
            let (mut aki, mut ski) = (None, None);
            for ext in cert.extensions() {
                match ext.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(a) => {
                        aki = a.key_identifier.as_ref().map(|k| k.0)
                    }
                    ParsedExtension::SubjectKeyIdentifier(s) => ski = Some(s.0),
                    _ => {}
                }
            }
            aki.is_some() && aki == ski
        }
    };
    CertificateFacts {
        validity_seconds: u64::try_from(seconds).unwrap_or(0),
        self_signed_leaf: self_named && !cert.is_ca() && self_signed(),
    }
}

/// The facts a keystore's first private key entry gives, from its PKCS#8 key and the DER of
/// its chain's leaf. Run inside the keystore's KDF cache: the outcome is remembered.
pub(crate) fn keystore_entry_facts(key_pkcs8: &[u8], leaf: Option<&[u8]>) -> Facts {
    let leaf = leaf.and_then(|der| X509Certificate::from_der(der).ok().map(|(_, c)| c));
    let key = parse::pkcs8_spki(key_pkcs8)
        .ok()
        .map(|spki| spki_facts(&spki))
        .or_else(|| leaf.as_ref().map(|c| spki_facts(c.public_key().raw)));
    Facts {
        key,
        certificate: leaf.as_ref().map(certificate_facts),
        has_expiry: false,
    }
}

/// The length of [`encode`]'s output.
pub(crate) const ENCODED_LEN: usize = 15;

/// `facts` as fixed-size bytes, for the KDF cache (it keeps bytes): a key tag and its bits,
/// a certificate tag, its validity and its self-signed flag.
pub(crate) fn encode(facts: &Facts) -> [u8; ENCODED_LEN] {
    let mut out = [0; ENCODED_LEN];
    let (tag, bits) = match facts.key {
        None => (0, 0),
        Some(KeyFacts::Rsa { bits }) => (1, bits),
        Some(KeyFacts::Ec { bits }) => (2, bits),
        Some(KeyFacts::Ed25519) => (3, 0),
        Some(KeyFacts::Other) => (4, 0),
    };
    out[0] = tag;
    out[1..5].copy_from_slice(&bits.to_be_bytes());
    if let Some(c) = facts.certificate {
        out[5] = 1 + u8::from(c.self_signed_leaf);
        out[6..14].copy_from_slice(&c.validity_seconds.to_be_bytes());
    }
    out[14] = u8::from(facts.has_expiry);
    out
}

/// The facts [`encode`] wrote.
pub(crate) fn decode(bytes: &[u8; ENCODED_LEN]) -> Facts {
    let bits = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes"));
    let key = match bytes[0] {
        1 => Some(KeyFacts::Rsa { bits }),
        2 => Some(KeyFacts::Ec { bits }),
        3 => Some(KeyFacts::Ed25519),
        4 => Some(KeyFacts::Other),
        _ => None,
    };
    let certificate = (bytes[5] != 0).then(|| CertificateFacts {
        validity_seconds: u64::from_be_bytes(bytes[6..14].try_into().expect("8 bytes")),
        self_signed_leaf: bytes[5] == 2,
    });
    Facts {
        key,
        certificate,
        has_expiry: bytes[14] != 0,
    }
}
