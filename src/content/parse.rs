//! Parsers for the structured types, on well-kept crates (x509-parser, RustCrypto's rsa,
//! p256, p384, ed25519-dalek, pkcs8, sec1, ssh-key; p12-keystore). Errors describe the
//! problem, never the value.

use base64::Engine as _;
use pkcs8::der::Decode as _;
use pkcs8::{DecodePrivateKey as _, EncodePublicKey as _, ObjectIdentifier};
use rsa::pkcs1::DecodeRsaPrivateKey as _;
use x509_parser::prelude::{FromDer as _, SubjectPublicKeyInfo, X509Certificate};

const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// One PEM block: its label and DER contents.
pub(crate) struct PemBlock {
    pub label: String,
    pub der: Vec<u8>,
}

/// Every PEM block of `text`, in order; text around blocks is ignored.
pub(crate) fn pem_blocks(text: &str) -> Result<Vec<PemBlock>, String> {
    if text.contains("Proc-Type:") || text.contains("DEK-Info:") {
        return Err("is a legacy OpenSSL-encrypted PEM, which is not supported: convert it to encrypted PKCS#8 (openssl pkcs8 -topk8 -v2 aes-256-cbc) and give `passphrase`".into());
    }
    let mut blocks = vec![];
    for pem in x509_parser::pem::Pem::iter_from_buffer(text.as_bytes()) {
        let pem = pem.map_err(|e| format!("is not valid PEM ({e})"))?;
        blocks.push(PemBlock {
            label: pem.label,
            der: pem.contents,
        });
    }
    if blocks.is_empty() {
        return Err("holds no PEM block".into());
    }
    Ok(blocks)
}

/// Parses a PEM private key (PKCS#1, PKCS#8, encrypted PKCS#8 with `passphrase`, SEC1) and
/// returns its public key as SubjectPublicKeyInfo DER.
pub(crate) fn private_key_spki(text: &str, passphrase: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let blocks = pem_blocks(text)?;
    let keys: Vec<&PemBlock> = blocks
        .iter()
        .filter(|b| b.label.ends_with("PRIVATE KEY"))
        .collect();
    let block = match keys.as_slice() {
        [one] => *one,
        [] => return Err("holds no PEM private key".into()),
        _ => return Err("holds more than one private key".into()),
    };
    match block.label.as_str() {
        "PRIVATE KEY" => pkcs8_spki(&block.der),
        "ENCRYPTED PRIVATE KEY" => {
            let Some(passphrase) = passphrase else {
                return Err("is an encrypted PKCS#8 key: set key `passphrase`".into());
            };
            // Validation, rendering and each refresh ask for the same public key: one KDF.
            super::kdf::once("pkcs8", &[&block.der, passphrase], || {
                let info = pkcs8::EncryptedPrivateKeyInfo::from_der(&block.der)
                    .map_err(|_| "is not a valid encrypted PKCS#8 key".to_owned())?;
                super::kdf::check_pkcs8(&info)?;
                let doc = {
                    let _memory = super::kdf::reserve(super::kdf::pkcs8_memory(&info));
                    info.decrypt(passphrase)
                }
                .map_err(|_| "cannot be decrypted with the given passphrase".to_owned())?;
                pkcs8_spki(doc.as_bytes())
            })
        }
        "RSA PRIVATE KEY" => {
            let key = rsa::RsaPrivateKey::from_pkcs1_der(&block.der)
                .map_err(|_| "is not a valid PKCS#1 RSA key".to_owned())?;
            rsa_spki(key)
        }
        "EC PRIVATE KEY" => sec1_spki(&block.der),
        "OPENSSH PRIVATE KEY" => {
            Err("is an OpenSSH key: use type ssh-key, or convert it to PKCS#8".into())
        }
        other => Err(format!("has an unsupported PEM block {other:?}")),
    }
}

fn rsa_spki(key: rsa::RsaPrivateKey) -> Result<Vec<u8>, String> {
    key.validate()
        .map_err(|_| "is an inconsistent RSA key".to_owned())?;
    spki_der(key.to_public_key().to_public_key_der())
}

fn spki_der(doc: Result<pkcs8::Document, pkcs8::spki::Error>) -> Result<Vec<u8>, String> {
    doc.map(|d| d.as_bytes().to_vec())
        .map_err(|_| "has a public key that cannot be encoded".to_owned())
}

pub(crate) fn pkcs8_spki(der: &[u8]) -> Result<Vec<u8>, String> {
    let info =
        pkcs8::PrivateKeyInfo::from_der(der).map_err(|_| "is not a valid PKCS#8 key".to_owned())?;
    let oid = info.algorithm.oid;
    if oid == OID_RSA {
        let key = rsa::RsaPrivateKey::from_pkcs8_der(der)
            .map_err(|_| "is not a valid RSA key".to_owned())?;
        rsa_spki(key)
    } else if oid == OID_EC {
        let curve = info.algorithm.parameters_oid().ok();
        if curve == Some(OID_P256) {
            let key = p256::SecretKey::from_pkcs8_der(der)
                .map_err(|_| "is not a valid P-256 key".to_owned())?;
            spki_der(key.public_key().to_public_key_der())
        } else if curve == Some(OID_P384) {
            let key = p384::SecretKey::from_pkcs8_der(der)
                .map_err(|_| "is not a valid P-384 key".to_owned())?;
            spki_der(key.public_key().to_public_key_der())
        } else {
            Err("is an EC key on an unsupported curve (P-256 and P-384 are supported)".into())
        }
    } else if oid == OID_ED25519 {
        let key = ed25519_dalek::SigningKey::from_pkcs8_der(der)
            .map_err(|_| "is not a valid Ed25519 key".to_owned())?;
        spki_der(key.verifying_key().to_public_key_der())
    } else {
        Err(format!("is a key of unsupported algorithm {oid}"))
    }
}

fn sec1_spki(der: &[u8]) -> Result<Vec<u8>, String> {
    let key =
        sec1::EcPrivateKey::from_der(der).map_err(|_| "is not a valid SEC1 EC key".to_owned())?;
    let curve = key.parameters.and_then(|p| p.named_curve());
    let p256 = || {
        p256::SecretKey::from_sec1_der(der)
            .map_err(|_| "is not a valid P-256 key".to_owned())
            .and_then(|k| spki_der(k.public_key().to_public_key_der()))
    };
    let p384 = || {
        p384::SecretKey::from_sec1_der(der)
            .map_err(|_| "is not a valid P-384 key".to_owned())
            .and_then(|k| spki_der(k.public_key().to_public_key_der()))
    };
    match curve {
        Some(c) if c == OID_P256 => p256(),
        Some(c) if c == OID_P384 => p384(),
        // No named curve: the private key's length tells P-256 from P-384.
        None => p256().or_else(|_| p384()),
        _ => Err("is an EC key on an unsupported curve (P-256 and P-384 are supported)".into()),
    }
}

/// The public key of SubjectPublicKeyInfo DER, as a PEM `PUBLIC KEY`.
pub(crate) fn spki_pem(spki: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(spki);
    let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END PUBLIC KEY-----\n");
    out
}

/// What a certificate chain says.
pub(crate) struct Chain {
    /// The leaf's notAfter (Unix seconds).
    pub not_after: i64,
    /// The DER certificates after the leaf, as PEM (the issuers), or the leaf when it is
    /// self-signed and alone: what `ca.crt` gets when the value has none.
    pub ca_pem: Option<String>,
}

/// Parses a PEM certificate chain: leaf first, each certificate issued (and signed) by the
/// next; when `key` is given, its public key (SPKI DER) must be the leaf's.
pub(crate) fn certificate_chain(text: &str, key_spki: Option<&[u8]>) -> Result<Chain, String> {
    let blocks = pem_blocks(text)?;
    if let Some(b) = blocks.iter().find(|b| b.label != "CERTIFICATE") {
        return Err(format!(
            "must hold only CERTIFICATE blocks, it has a {:?} block",
            b.label
        ));
    }
    let mut certs: Vec<X509Certificate<'_>> = vec![];
    for (i, b) in blocks.iter().enumerate() {
        let (rest, cert) = X509Certificate::from_der(&b.der)
            .map_err(|_| format!("certificate {} is not a valid X.509 certificate", i + 1))?;
        if !rest.is_empty() {
            return Err(format!(
                "certificate {} has trailing bytes after its DER",
                i + 1
            ));
        }
        certs.push(cert);
    }
    for (i, pair) in certs.windows(2).enumerate() {
        let (child, issuer) = (&pair[0], &pair[1]);
        if child.issuer().as_raw() != issuer.subject().as_raw()
            || child.verify_signature(Some(issuer.public_key())).is_err()
        {
            return Err(format!(
                "is not in chain order: certificate {} was not issued by certificate {} (leaf first, then each issuer)",
                i + 1,
                i + 2
            ));
        }
    }
    let leaf = &certs[0];
    if let Some(spki) = key_spki {
        let (_, key_pub) = SubjectPublicKeyInfo::from_der(spki)
            .map_err(|_| "has a key whose public key cannot be read".to_owned())?;
        if key_pub.subject_public_key.data != leaf.public_key().subject_public_key.data {
            return Err("does not match the leaf certificate (tls.key is not its key)".into());
        }
    }
    let ca_pem = if blocks.len() > 1 {
        Some(certs_pem(&blocks[1..]))
    } else if leaf.issuer().as_raw() == leaf.subject().as_raw() {
        Some(certs_pem(&blocks[..1]))
    } else {
        None
    };
    Ok(Chain {
        not_after: leaf.validity().not_after.timestamp(),
        ca_pem,
    })
}

fn certs_pem(blocks: &[PemBlock]) -> String {
    let mut out = String::new();
    for b in blocks {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&b.der);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Parses an OpenSSH private key (RSA, ECDSA, Ed25519); an encrypted one is decrypted with
/// `passphrase` when given. Returns the public key in OpenSSH format.
pub(crate) fn ssh_public_key(text: &str, passphrase: Option<&[u8]>) -> Result<String, String> {
    let key = ssh_key::PrivateKey::from_openssh(text).map_err(|_| {
        "is not an OpenSSH private key (-----BEGIN OPENSSH PRIVATE KEY-----)".to_owned()
    })?;
    match key.algorithm() {
        ssh_key::Algorithm::Ed25519
        | ssh_key::Algorithm::Ecdsa { .. }
        | ssh_key::Algorithm::Rsa { .. } => {}
        other => {
            return Err(format!(
                "is a {other} key; RSA, ECDSA and Ed25519 are supported"
            ));
        }
    }
    if key.is_encrypted() {
        let Some(passphrase) = passphrase else {
            return Err("is encrypted: set key `passphrase`".into());
        };
        if let ssh_key::Kdf::Bcrypt { rounds, .. } = key.kdf()
            && *rounds > super::kdf::MAX_BCRYPT_ROUNDS
        {
            return Err(format!(
                "uses {rounds} bcrypt-pbkdf rounds; at most {} are accepted",
                super::kdf::MAX_BCRYPT_ROUNDS
            ));
        }
        // Whether the passphrase opens it, derived once per key and passphrase.
        super::kdf::once("openssh", &[text.as_bytes(), passphrase], || {
            let _memory = super::kdf::reserve(super::kdf::MIB);
            key.decrypt(passphrase)
                .map(|_| vec![])
                .map_err(|_| "cannot be decrypted with the given passphrase".to_owned())
        })?;
    }
    key.public_key()
        .to_openssh()
        .map_err(|_| "has a public key that cannot be encoded".to_owned())
}

/// Opens a PKCS#12 keystore with its password; it must hold at least one entry. Returns
/// the number of entries.
pub(crate) fn keystore(data: &[u8], password: &str) -> Result<usize, String> {
    keystore_facts(data, password).map(|(entries, _)| entries)
}

/// Opens a PKCS#12 keystore with its password, as [`keystore`]; returns the number of
/// entries and the [facts](super::facts) of its first private key entry (by alias) and that
/// entry's leaf certificate. The outcome is remembered per keystore and password
/// ([`super::kdf::once`]): a refresh of the same keystore, or its compliance check, derives
/// nothing.
pub(crate) fn keystore_facts(
    data: &[u8],
    password: &str,
) -> Result<(usize, super::facts::Facts), String> {
    let outcome = super::kdf::once("pkcs12", &[data, password.as_bytes()], || {
        // Every KDF inside checked first (see there); p12-keystore runs them one at a time.
        let memory = super::kdf::inspect_pkcs12(data, password)?;
        let _memory = super::kdf::reserve(memory);
        let store = p12_keystore::KeyStore::from_pkcs12(
            data,
            password,
            p12_keystore::Pkcs12ImportPolicy::Relaxed,
        )
        .map_err(|_| "is not a PKCS#12 keystore that opens with `password`".to_owned())?;
        if store.entries_len() == 0 {
            return Err("is a PKCS#12 keystore with no entries".into());
        }
        // Public facts only (algorithm, sizes, validity): never a key byte in the cache.
        let facts = store
            .private_key_chain()
            .map(|(_, chain)| {
                let leaf = chain.certs().first().map(p12_keystore::Certificate::as_der);
                super::facts::keystore_entry_facts(chain.key().as_der(), leaf)
            })
            .unwrap_or_default();
        let mut out = (store.entries_len() as u64).to_be_bytes().to_vec();
        out.extend_from_slice(&super::facts::encode(&facts));
        Ok(out)
    })?;
    let (entries, facts) = outcome.split_at(8);
    let entries: [u8; 8] = entries.try_into().expect("8 bytes, as stored");
    let facts = facts.try_into().expect("the encoded facts, as stored");
    Ok((
        u64::from_be_bytes(entries) as usize,
        super::facts::decode(facts),
    ))
}

/// Checks a JWT's shape: three base64url parts, a JSON header with `alg`, JSON claims.
/// Returns `exp` (Unix seconds) when the claims have one.
pub(crate) fn jwt(token: &str) -> Result<Option<i64>, String> {
    let token = token.trim_end();
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(format!(
            "must have three '.'-separated parts, it has {}",
            parts.len()
        ));
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let decode = |i: usize, what: &str| {
        b64.decode(parts[i])
            .map_err(|_| format!("has a {what} that is not base64url (unpadded)"))
    };
    let header: serde_json::Value = serde_json::from_slice(&decode(0, "header")?)
        .map_err(|_| "has a header that is not JSON".to_owned())?;
    if !header.get("alg").is_some_and(serde_json::Value::is_string) {
        return Err("has a header without a string `alg`".into());
    }
    let claims: serde_json::Value = serde_json::from_slice(&decode(1, "claims part")?)
        .map_err(|_| "has claims that are not JSON".to_owned())?;
    if !claims.is_object() {
        return Err("has claims that are not a JSON object".into());
    }
    decode(2, "signature")?;
    match claims.get("exp") {
        None => Ok(None),
        Some(exp) => exp
            .as_i64()
            .or_else(|| exp.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| "has an `exp` claim that is not a number".into()),
    }
}
