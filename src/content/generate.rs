//! Generators for `content.generate`: each makes a value of its type that passes
//! [`super::validate`]. Randomness comes from the OS (rand's thread RNG, seeded from the OS,
//! for characters and bytes; `OsRng` for keys).

use super::ContentError;
use crate::api::{CharClass, Generate, KeyAlgorithm, SecretType, parse_duration};
use crate::secret_data::SecretData;
use pkcs8::{EncodePrivateKey as _, LineEnding};
use rsa::rand_core::OsRng;
use zeroize::Zeroizing;

const LOWER: &str = "abcdefghijklmnopqrstuvwxyz";
const UPPER: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const DIGITS: &str = "0123456789";
const SYMBOLS: &str = "!#$%&()*+,-./:;<=>?@[]^_{|}~";
const ALPHANUMERIC: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

fn invalid(type_: SecretType, problem: impl Into<String>) -> ContentError {
    ContentError::Generate {
        type_: type_.as_str(),
        problem: problem.into(),
    }
}

/// Generates a value of `secret_type` as `spec` says. `name` is the default certificate
/// common name.
pub fn generate(
    secret_type: SecretType,
    spec: &Generate,
    name: &str,
) -> Result<SecretData, ContentError> {
    generate_with(secret_type, spec, name, None)
}

/// [`generate`], with the value of the CA ManagedSecret named by `spec.issuerRef` (a
/// validated certificate value) when there is one.
pub fn generate_with(
    secret_type: SecretType,
    spec: &Generate,
    name: &str,
    issuer: Option<&SecretData>,
) -> Result<SecretData, ContentError> {
    let mut data = SecretData::new();
    match secret_type {
        SecretType::Password => {
            data.insert("password", password(spec)?.as_bytes());
        }
        SecretType::SecretKey => {
            let mut key = Zeroizing::new(vec![0u8; spec.bytes.unwrap_or(32) as usize]);
            rand::fill(&mut key[..]);
            data.insert("key", key.to_vec());
        }
        SecretType::ApiKey => {
            let len = spec.length.unwrap_or(40) as usize;
            let mut key = Zeroizing::new(spec.prefix.clone().unwrap_or_default());
            key.push_str(&random_string(ALPHANUMERIC, len));
            data.insert("api-key", key.as_bytes());
        }
        SecretType::SshKey => {
            let key = ssh_key(spec)?;
            let private = key
                .to_openssh(ssh_key::LineEnding::LF)
                .map_err(|_| invalid(secret_type, "cannot encode the key"))?;
            data.insert("ssh-privatekey", private.as_bytes());
        }
        SecretType::PrivateKey => {
            let pem = private_key_pem(spec)?;
            data.insert("private-key", pem.as_bytes());
        }
        SecretType::Certificate => {
            let (cert, key, ca) = certificate(spec, name, issuer)?;
            data.insert("tls.crt", cert.as_bytes());
            data.insert("tls.key", key.as_bytes());
            data.insert("ca.crt", ca.as_bytes());
        }
        other => {
            return Err(invalid(
                other,
                "cannot be generated (password, secret-key, api-key, ssh-key, private-key and certificate can)",
            ));
        }
    }
    Ok(data)
}

fn random_string(alphabet: &str, len: usize) -> String {
    let chars: Vec<char> = alphabet.chars().collect();
    (0..len)
        .map(|_| chars[rand::random_range(0..chars.len())])
        .collect()
}

/// A password of `length` characters from the chosen classes (each at least once), none
/// of them excluded.
fn password(spec: &Generate) -> Result<Zeroizing<String>, ContentError> {
    let length = spec.length.unwrap_or(32) as usize;
    let classes = if spec.classes.is_empty() {
        vec![
            CharClass::Lowercase,
            CharClass::Uppercase,
            CharClass::Digits,
            CharClass::Symbols,
        ]
    } else {
        spec.classes.clone()
    };
    let exclude = spec.exclude.as_deref().unwrap_or_default();
    let mut sets: Vec<Vec<char>> = vec![];
    for class in &classes {
        let chars = match class {
            CharClass::Lowercase => LOWER,
            CharClass::Uppercase => UPPER,
            CharClass::Digits => DIGITS,
            CharClass::Symbols => SYMBOLS,
        };
        let set: Vec<char> = chars.chars().filter(|c| !exclude.contains(*c)).collect();
        if set.is_empty() {
            return Err(invalid(
                SecretType::Password,
                format!("class {class:?} has no characters left after `exclude`"),
            ));
        }
        if !sets.contains(&set) {
            sets.push(set);
        }
    }
    if length < sets.len() {
        return Err(invalid(
            SecretType::Password,
            format!(
                "length {length} is shorter than the number of classes ({})",
                sets.len()
            ),
        ));
    }
    let all: Vec<char> = sets.iter().flatten().copied().collect();
    // One of each class, the rest from all of them, then shuffled (Fisher-Yates).
    let mut chars: Zeroizing<Vec<char>> = Zeroizing::new(
        sets.iter()
            .map(|s| s[rand::random_range(0..s.len())])
            .collect(),
    );
    while chars.len() < length {
        chars.push(all[rand::random_range(0..all.len())]);
    }
    for i in (1..chars.len()).rev() {
        let j = rand::random_range(0..=i);
        chars.swap(i, j);
    }
    Ok(Zeroizing::new(chars.iter().collect()))
}

fn rsa_bits(spec: &Generate) -> Result<usize, ContentError> {
    match spec.bits.unwrap_or(3072) {
        b @ (3072 | 4096) => Ok(b as usize),
        other => Err(ContentError::Generate {
            type_: "key",
            problem: format!("rsa bits must be 3072 or 4096, not {other}"),
        }),
    }
}

fn ssh_key(spec: &Generate) -> Result<ssh_key::PrivateKey, ContentError> {
    let err = |_| invalid(SecretType::SshKey, "key generation failed");
    let mut key = match spec.algorithm.unwrap_or(KeyAlgorithm::Ed25519) {
        KeyAlgorithm::Ed25519 => {
            ssh_key::PrivateKey::random(&mut OsRng, ssh_key::Algorithm::Ed25519).map_err(err)?
        }
        KeyAlgorithm::EcdsaP256 | KeyAlgorithm::Ec => ssh_key::PrivateKey::random(
            &mut OsRng,
            ssh_key::Algorithm::Ecdsa {
                curve: ssh_key::EcdsaCurve::NistP256,
            },
        )
        .map_err(err)?,
        KeyAlgorithm::Rsa => {
            let pair =
                ssh_key::private::RsaKeypair::random(&mut OsRng, rsa_bits(spec)?).map_err(err)?;
            ssh_key::PrivateKey::new(ssh_key::private::KeypairData::from(pair), "").map_err(err)?
        }
    };
    key.set_comment(spec.comment.clone().unwrap_or_else(|| "keyhaven".into()));
    Ok(key)
}

fn private_key_pem(spec: &Generate) -> Result<Zeroizing<String>, ContentError> {
    let err = |_| invalid(SecretType::PrivateKey, "key generation failed");
    match spec.algorithm.unwrap_or(KeyAlgorithm::Ec) {
        KeyAlgorithm::Ec | KeyAlgorithm::EcdsaP256 => p256::SecretKey::random(&mut OsRng)
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(err),
        KeyAlgorithm::Ed25519 => ed25519_dalek::SigningKey::generate(&mut OsRng)
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(err),
        KeyAlgorithm::Rsa => rsa::RsaPrivateKey::new(&mut OsRng, rsa_bits(spec)?)
            .map_err(|_| invalid(SecretType::PrivateKey, "key generation failed"))?
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(err),
    }
}

/// A certificate (and its PKCS#8 key, and the CA bundle) for the common name and DNS names:
/// self-signed, or signed by `issuer` when `spec.issuerRef` names one.
fn certificate(
    spec: &Generate,
    name: &str,
    issuer: Option<&SecretData>,
) -> Result<(String, Zeroizing<String>, String), ContentError> {
    let err = |e: rcgen::Error| invalid(SecretType::Certificate, format!("{e}"));
    let validity = match &spec.validity {
        Some(v) => parse_duration(v)
            .map_err(|e| invalid(SecretType::Certificate, format!("generate.validity: {e}")))?,
        None => std::time::Duration::from_secs(365 * 24 * 3600),
    };
    let mut params = rcgen::CertificateParams::new(spec.dns_names.clone()).map_err(err)?;
    let cn = spec
        .common_name
        .clone()
        .or_else(|| spec.dns_names.first().cloned())
        .unwrap_or_else(|| name.to_owned());
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    // Checked: a date past what X.509 and `time` can hold is an error, not a panic.
    let out_of_range = || {
        invalid(
            SecretType::Certificate,
            "generate.validity: the certificate would end past the year 9999",
        )
    };
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = time::Duration::try_from(validity)
        .ok()
        .and_then(|d| now.checked_add(d))
        .filter(|t| t.year() <= 9999)
        .ok_or_else(out_of_range)?;
    let alg = match spec.algorithm.unwrap_or(KeyAlgorithm::Ec) {
        KeyAlgorithm::Ec | KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        KeyAlgorithm::Rsa => {
            return Err(invalid(
                SecretType::Certificate,
                "generated certificates use ec or ed25519 keys",
            ));
        }
    };
    if spec.is_ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
    }
    let key = rcgen::KeyPair::generate_for(alg).map_err(err)?;
    match (&spec.issuer_ref, issuer) {
        (None, _) => {
            let cert = params.self_signed(&key).map_err(err)?;
            Ok((cert.pem(), Zeroizing::new(key.serialize_pem()), cert.pem()))
        }
        (Some(r), None) => Err(invalid(
            SecretType::Certificate,
            format!("the issuer {} has no value yet", r.name),
        )),
        (Some(r), Some(ca)) => {
            let text = |k: &str| {
                ca.get(k)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .ok_or_else(|| {
                        invalid(
                            SecretType::Certificate,
                            format!("the issuer {} has no {k}", r.name),
                        )
                    })
            };
            let ca_chain = text("tls.crt")?;
            let ca_key = rcgen::KeyPair::from_pem(text("tls.key")?).map_err(|_| {
                invalid(
                    SecretType::Certificate,
                    format!(
                        "the issuer {}'s tls.key is not a PKCS#8 key rcgen can sign with",
                        r.name
                    ),
                )
            })?;
            let issuer = rcgen::Issuer::from_ca_cert_pem(ca_chain, ca_key).map_err(|_| {
                invalid(
                    SecretType::Certificate,
                    format!("the issuer {}'s tls.crt cannot be read", r.name),
                )
            })?;
            let cert = params.signed_by(&key, &issuer).map_err(err)?;
            let bundle = match ca.get("ca.crt").and_then(|v| std::str::from_utf8(v).ok()) {
                Some(b) => b.to_owned(),
                None => ca_chain.to_owned(),
            };
            Ok((
                format!("{}{}", cert.pem(), ca_chain),
                Zeroizing::new(key.serialize_pem()),
                bundle,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_validity_past_any_date_is_an_error_naming_the_field() {
        for validity in ["1000000000000h", "18446744073709551615s", "876001h"] {
            let spec = Generate {
                validity: Some(validity.into()),
                ..Generate::default()
            };
            let e = generate(SecretType::Certificate, &spec, "n").unwrap_err();
            assert!(
                e.to_string().contains("generate.validity"),
                "{validity}: {e}"
            );
        }
        // 100 years from now is still a date a certificate can hold.
        let spec = Generate {
            validity: Some("876000h".into()),
            ..Generate::default()
        };
        generate(SecretType::Certificate, &spec, "n").unwrap();
    }
}
