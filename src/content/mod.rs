//! Secret types: what each requires of a value, how it is generated, and how it becomes a
//! native Secret.

pub mod cpu;
pub(crate) mod facts;
mod generate;
pub(crate) mod kdf;
mod parse;

pub use facts::{CertificateFacts, Facts, KeyFacts, facts};
pub use generate::{generate, generate_with};
pub use kdf::{MAX_KDF_MEMORY, MAX_PBKDF2_ITERATIONS, MAX_PKCS12_ITERATIONS};

use crate::api::SecretType;
use crate::secret_data::SecretData;
use std::collections::BTreeMap;

/// A value does not fit its type. Names keys, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    #[error("a {type_} secret needs key {key:?}; it has keys {present:?}")]
    MissingKey {
        type_: &'static str,
        key: &'static str,
        present: Vec<String>,
    },
    #[error("a {type_} secret's key {key:?} must not be empty")]
    EmptyKey {
        type_: &'static str,
        key: &'static str,
    },
    #[error("a {type_} secret's key {key:?} must be UTF-8 text")]
    NotText {
        type_: &'static str,
        key: &'static str,
    },
    #[error("a {type_} secret needs at least one key")]
    NoKeys { type_: &'static str },
    #[error("a {type_} secret's key {key:?} {problem}")]
    Invalid {
        type_: &'static str,
        key: &'static str,
        problem: String,
    },
    #[error("key name {0:?} is not a valid Secret key (letters, digits, '-', '_', '.')")]
    BadKeyName(String),
    #[error("target.template key {key:?} {problem}")]
    Template { key: String, problem: String },
    #[error("cannot generate a {type_} secret: {problem}")]
    Generate {
        type_: &'static str,
        problem: String,
    },
}

/// Rules that come from the spec rather than the type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules {
    /// secret-key: the declared length in bytes.
    pub secret_key_bytes: Option<usize>,
    /// password: the profile's policy.
    pub password: Option<crate::api::PasswordPolicy>,
}

/// Why `password` falls short of `policy`, if it does. Says how, never what.
pub fn password_weakness(password: &str, policy: &crate::api::PasswordPolicy) -> Option<String> {
    let length = password.chars().count();
    if length < policy.min_length as usize {
        return Some(format!(
            "is {length} characters long; the profile's policy asks for at least {}",
            policy.min_length
        ));
    }
    let classes = character_classes(password).iter().filter(|x| **x).count();
    let wanted = policy.min_classes.unwrap_or(1) as usize;
    (classes < wanted).then(|| {
        format!(
            "uses {classes} of the 4 character classes (lower, upper, digit, other); the profile's policy asks for {wanted}"
        )
    })
}

/// Which of the four character classes `password` uses: lower-case, upper-case, (ASCII)
/// digits, other (not alphanumeric). A letter or digit of none of the first three (e.g. a
/// CJK character) counts in none.
pub fn character_classes(password: &str) -> [bool; 4] {
    [
        password.chars().any(|c| c.is_lowercase()),
        password.chars().any(|c| c.is_uppercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_alphanumeric()),
    ]
}

/// What validation learnt about a value (never the value itself).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inspected {
    /// When it expires: api-key `expires-at`, certificate notAfter, jwt `exp`.
    pub expires_at: Option<jiff::Timestamp>,
}

/// Checks `data` against the rules of `secret_type`.
pub fn validate(secret_type: SecretType, data: &SecretData) -> Result<Inspected, ContentError> {
    validate_with(secret_type, data, Rules::default())
}

/// Checks `data` against the rules of `secret_type` and the spec's `rules`.
pub fn validate_with(
    secret_type: SecretType,
    data: &SecretData,
    rules: Rules,
) -> Result<Inspected, ContentError> {
    for key in data.keys() {
        if !is_key_name(key) {
            return Err(ContentError::BadKeyName(key.to_owned()));
        }
    }
    let value = Value {
        type_: secret_type.as_str(),
        data,
    };
    let expires_at = match secret_type {
        SecretType::KeyValue | SecretType::Generic => key_value(&value)?,
        SecretType::BasicAuth => basic_auth(&value)?,
        SecretType::Password => password(&value, rules.password.as_ref())?,
        SecretType::ApiKey => api_key(&value)?,
        SecretType::Jwt => jwt(&value)?,
        SecretType::PrivateKey => private_key(&value)?,
        SecretType::SecretKey => secret_key(&value, rules.secret_key_bytes)?,
        SecretType::Keystore => keystore(&value)?,
        SecretType::Certificate => certificate(&value)?,
        SecretType::SshKey => ssh_key(&value)?,
    };
    Ok(Inspected { expires_at })
}

/// Whether `key` may name a Secret key: letters, digits, '-', '_', '.'.
fn is_key_name(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A value under validation: its type's name (for errors) and its keys.
struct Value<'a> {
    type_: &'static str,
    data: &'a SecretData,
}

/// What a type's validator learnt: when the value expires, if it does.
type Expiry = Option<jiff::Timestamp>;

impl<'a> Value<'a> {
    /// The bytes of `key`, which must be present.
    fn bytes(&self, key: &'static str) -> Result<&'a [u8], ContentError> {
        self.data.get(key).ok_or_else(|| ContentError::MissingKey {
            type_: self.type_,
            key,
            present: self.data.keys().map(str::to_owned).collect(),
        })
    }

    /// The text of `key`, which must be present, UTF-8 and not empty.
    fn text(&self, key: &'static str) -> Result<&'a str, ContentError> {
        let text = self.utf8(key)?;
        if text.is_empty() {
            return Err(ContentError::EmptyKey {
                type_: self.type_,
                key,
            });
        }
        Ok(text)
    }

    /// The text of `key`, which must be present and UTF-8 (it may be empty).
    fn utf8(&self, key: &'static str) -> Result<&'a str, ContentError> {
        std::str::from_utf8(self.bytes(key)?).map_err(|_| ContentError::NotText {
            type_: self.type_,
            key,
        })
    }

    /// The text of the optional `key`: checked as [`Value::text`] when present.
    fn optional_text(&self, key: &'static str) -> Result<Option<&'a str>, ContentError> {
        match self.data.get(key) {
            Some(_) => self.text(key).map(Some),
            None => Ok(None),
        }
    }

    /// The passphrase of an encrypted key, if the value has a non-empty one.
    fn passphrase(&self) -> Option<&'a [u8]> {
        self.data.get("passphrase").filter(|p| !p.is_empty())
    }

    fn invalid(&self, key: &'static str, problem: String) -> ContentError {
        ContentError::Invalid {
            type_: self.type_,
            key,
            problem,
        }
    }

    /// An expiry in Unix seconds, read from `key`.
    fn timestamp(&self, key: &'static str, secs: i64) -> Result<jiff::Timestamp, ContentError> {
        jiff::Timestamp::from_second(secs)
            .map_err(|_| self.invalid(key, "has an expiry out of range".into()))
    }
}

/// key-value, generic: any keys, at least one.
fn key_value(value: &Value) -> Result<Expiry, ContentError> {
    if value.data.is_empty() {
        return Err(ContentError::NoKeys { type_: value.type_ });
    }
    Ok(None)
}

/// basic-auth: `username` and `password`.
fn basic_auth(value: &Value) -> Result<Expiry, ContentError> {
    value.text("username")?;
    value.text("password")?;
    Ok(None)
}

/// password: `password`, within the profile's policy if it has one.
fn password(
    value: &Value,
    policy: Option<&crate::api::PasswordPolicy>,
) -> Result<Expiry, ContentError> {
    let password = value.text("password")?;
    if let Some(problem) = policy.and_then(|p| password_weakness(password, p)) {
        return Err(value.invalid("password", problem));
    }
    Ok(None)
}

/// api-key: `api-key`, and an optional RFC 3339 `expires-at`.
fn api_key(value: &Value) -> Result<Expiry, ContentError> {
    value.text("api-key")?;
    value
        .optional_text("expires-at")?
        .map(|at| {
            at.parse::<jiff::Timestamp>()
                .map_err(|_| value.invalid("expires-at", "must be an RFC 3339 timestamp".into()))
        })
        .transpose()
}

/// jwt: a well-formed `token`; its `exp` claim is the expiry.
fn jwt(value: &Value) -> Result<Expiry, ContentError> {
    let exp = parse::jwt(value.text("token")?).map_err(|p| value.invalid("token", p))?;
    exp.map(|exp| value.timestamp("token", exp)).transpose()
}

/// private-key: a PEM `private-key`, opened with the `passphrase` if there is one.
fn private_key(value: &Value) -> Result<Expiry, ContentError> {
    parse::private_key_spki(value.text("private-key")?, value.passphrase())
        .map_err(|p| value.invalid("private-key", p))?;
    Ok(None)
}

/// secret-key: raw bytes in `key`, of the declared length if there is one.
fn secret_key(value: &Value, want: Option<usize>) -> Result<Expiry, ContentError> {
    let key = value.bytes("key")?;
    if key.is_empty() {
        return Err(ContentError::EmptyKey {
            type_: value.type_,
            key: "key",
        });
    }
    if let Some(want) = want
        && key.len() != want
    {
        return Err(value.invalid(
            "key",
            format!(
                "must be {want} bytes (the declared length), it is {}",
                key.len()
            ),
        ));
    }
    Ok(None)
}

/// keystore: a PKCS#12 `keystore.p12` that its `password` (possibly empty) opens.
fn keystore(value: &Value) -> Result<Expiry, ContentError> {
    let store = value.bytes("keystore.p12")?;
    let password = value.utf8("password")?;
    parse::keystore(store, password).map_err(|p| value.invalid("keystore.p12", p))?;
    Ok(None)
}

/// certificate: `tls.key` and the `tls.crt` chain it signs, an optional `ca.crt`; the
/// leaf's notAfter is the expiry.
fn certificate(value: &Value) -> Result<Expiry, ContentError> {
    let key = value.text("tls.key")?;
    let chain = value.text("tls.crt")?;
    let spki = parse::private_key_spki(key, None).map_err(|p| value.invalid("tls.key", p))?;
    let chain =
        parse::certificate_chain(chain, Some(&spki)).map_err(|p| value.invalid("tls.crt", p))?;
    if let Some(ca) = value.optional_text("ca.crt")? {
        parse::certificate_chain(ca, None).map_err(|p| value.invalid("ca.crt", p))?;
    }
    value.timestamp("tls.crt", chain.not_after).map(Some)
}

/// ssh-key: an OpenSSH `ssh-privatekey`, and an optional `ssh-publickey` that matches it.
fn ssh_key(value: &Value) -> Result<Expiry, ContentError> {
    let public = parse::ssh_public_key(value.text("ssh-privatekey")?, value.passphrase())
        .map_err(|p| value.invalid("ssh-privatekey", p))?;
    if let Some(given) = value.optional_text("ssh-publickey")?
        && !same_ssh_public_key(given, &public)
    {
        return Err(value.invalid("ssh-publickey", "does not match the private key".into()));
    }
    Ok(None)
}

/// Compares two OpenSSH public keys by algorithm and key, ignoring comments.
fn same_ssh_public_key(a: &str, b: &str) -> bool {
    let fields = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    fields(a) == fields(b)
}

/// A native Secret's type and data for a value of `secret_type`.
pub struct Rendered {
    pub type_: &'static str,
    pub data: SecretData,
}

/// The native Secret for a (validated) value: basic-auth becomes `kubernetes.io/basic-auth`;
/// certificate `kubernetes.io/tls` with `tls.crt`, `tls.key` and `ca.crt` (the chain's
/// issuers, or the leaf when self-signed, unless the value has one); ssh-key
/// `kubernetes.io/ssh-auth` with `ssh-privatekey` and the derived `ssh-publickey`;
/// private-key gains the derived `public-key`. The other types become `Opaque` Secrets with
/// the value's keys.
pub fn render(secret_type: SecretType, data: &SecretData) -> Rendered {
    let text = |key: &str| data.get(key).and_then(|v| std::str::from_utf8(v).ok());
    let passphrase = data.get("passphrase").filter(|p| !p.is_empty());
    let mut out = data.clone();
    let type_ = match secret_type {
        SecretType::BasicAuth => "kubernetes.io/basic-auth",
        SecretType::Certificate => {
            if data.get("ca.crt").is_none()
                && let Some(ca) = text("tls.crt")
                    .and_then(|c| parse::certificate_chain(c, None).ok())
                    .and_then(|c| c.ca_pem)
            {
                out.insert("ca.crt", ca.into_bytes());
            }
            "kubernetes.io/tls"
        }
        SecretType::SshKey => {
            if data.get("ssh-publickey").is_none()
                && let Some(public) =
                    text("ssh-privatekey").and_then(|k| parse::ssh_public_key(k, passphrase).ok())
            {
                out.insert("ssh-publickey", format!("{public}\n").into_bytes());
            }
            "kubernetes.io/ssh-auth"
        }
        SecretType::PrivateKey => {
            if data.get("public-key").is_none()
                && let Some(spki) =
                    text("private-key").and_then(|k| parse::private_key_spki(k, passphrase).ok())
            {
                out.insert("public-key", parse::spki_pem(&spki).into_bytes());
            }
            "Opaque"
        }
        _ => "Opaque",
    };
    Rendered { type_, data: out }
}

/// Applies `target.template` to a rendered native Secret: each template key's text with every
/// `{{ .key }}` replaced by the value of `key`.
pub fn apply_template(
    rendered: &mut Rendered,
    template: &crate::api::TargetTemplate,
    data: &SecretData,
) -> Result<(), ContentError> {
    use crate::api::TemplateMergePolicy;
    let err = |key: &str, problem: String| ContentError::Template {
        key: key.to_owned(),
        problem,
    };
    if template.merge_policy == TemplateMergePolicy::Replace && rendered.type_ != "Opaque" {
        let key = template.data.keys().next().map_or("", String::as_str);
        return Err(err(
            key,
            format!(
                "cannot use mergePolicy Replace: this type renders as {}, whose keys are required",
                rendered.type_
            ),
        ));
    }
    let mut out = SecretData::new();
    // What is left of MAX_TEMPLATE_OUTPUT: checked as the output grows, so that a template
    // repeating a large value is refused before it takes the memory.
    let mut budget = MAX_TEMPLATE_OUTPUT;
    let too_large = || {
        format!(
            "makes the Secret's values larger than {MAX_TEMPLATE_OUTPUT} bytes (1 MiB, all keys together)"
        )
    };
    for (key, text) in &template.data {
        if !is_key_name(key) {
            return Err(ContentError::BadKeyName(key.clone()));
        }
        out.insert(
            key.clone(),
            expand(text, data, &mut budget).map_err(|p| err(key, p.unwrap_or_else(too_large)))?,
        );
    }
    if template.merge_policy == TemplateMergePolicy::Merge {
        for (k, v) in rendered.data.iter() {
            if out.get(k).is_none() {
                budget = budget
                    .checked_sub(v.len())
                    .ok_or_else(|| err(k, too_large()))?;
                out.insert(k, v);
            }
        }
    }
    rendered.data = out;
    Ok(())
}

/// The most a template may make of a native Secret's data, keys and values together: well
/// below what the API server stores in one object.
pub const MAX_TEMPLATE_OUTPUT: usize = 1 << 20;

/// `text` with every `{{ .key }}` replaced by the value of `key`, taking its size out of
/// `budget` (`Err(None)` once the budget is spent). Errors quote the template (spec text),
/// never a value.
fn expand(text: &str, data: &SecretData, budget: &mut usize) -> Result<Vec<u8>, Option<String>> {
    let mut out = zeroize::Zeroizing::new(Vec::new());
    let mut rest = text;
    let mut spend = |n: usize| budget.checked_sub(n).map(|left| *budget = left).ok_or(None);
    while let Some(start) = rest.find("{{") {
        spend(start)?;
        out.extend_from_slice(&rest.as_bytes()[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| "has a '{{' without '}}'".to_owned())?;
        let expr = after[..end].trim();
        let key = expr
            .strip_prefix('.')
            .filter(|k| !k.is_empty())
            .ok_or_else(|| format!("has {{{{ {expr} }}}}: expected {{{{ .key }}}}"))?;
        let value = data
            .get(key)
            .ok_or_else(|| format!("refers to key {key:?}, which the value does not have"))?;
        spend(value.len())?;
        out.extend_from_slice(value);
        rest = &after[end + 2..];
    }
    spend(rest.len())?;
    out.extend_from_slice(rest.as_bytes());
    Ok(out.to_vec())
}

/// Labels keyhaven puts on every native Secret it manages; the controller watches Secrets
/// through this selector only.
pub fn native_secret_labels(managed_secret: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_LABEL.to_owned(), MANAGED_LABEL_VALUE.to_owned()),
        (MANAGED_SECRET_LABEL.to_owned(), managed_secret.to_owned()),
    ])
}

pub use crate::labels::{MANAGED_LABEL, MANAGED_LABEL_VALUE, MANAGED_SECRET_LABEL};

#[cfg(test)]
pub(crate) mod type_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn data(kv: &[(&str, &[u8])]) -> SecretData {
        kv.iter().map(|(k, v)| (*k, v.to_vec())).collect()
    }

    #[test]
    fn basic_auth() {
        assert!(
            validate(
                SecretType::BasicAuth,
                &data(&[("username", b"u"), ("password", b"p")])
            )
            .is_ok()
        );
        let err = validate(
            SecretType::BasicAuth,
            &data(&[("username", b"u"), ("pass", b"s3cr3t")]),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            ContentError::MissingKey {
                key: "password",
                ..
            }
        ));
        assert!(!err.to_string().contains("s3cr3t"));
        assert!(
            validate(
                SecretType::BasicAuth,
                &data(&[("username", b""), ("password", b"p")])
            )
            .is_err()
        );
        assert!(
            validate(
                SecretType::BasicAuth,
                &data(&[("username", b"\xff"), ("password", b"p")])
            )
            .is_err()
        );
        assert_eq!(
            render(SecretType::BasicAuth, &data(&[])).type_,
            "kubernetes.io/basic-auth"
        );
    }

    #[test]
    fn password_api_key_key_value_generic() {
        assert!(validate(SecretType::Password, &data(&[("password", b"x")])).is_ok());
        assert!(validate(SecretType::Password, &data(&[("pw", b"x")])).is_err());
        assert!(validate(SecretType::ApiKey, &data(&[("api-key", b"k")])).is_ok());
        assert!(
            validate(
                SecretType::ApiKey,
                &data(&[("api-key", b"k"), ("expires-at", b"2030-01-01T00:00:00Z")])
            )
            .is_ok()
        );
        assert!(
            validate(
                SecretType::ApiKey,
                &data(&[("api-key", b"k"), ("expires-at", b"tomorrow")])
            )
            .is_err()
        );
        assert!(validate(SecretType::KeyValue, &data(&[])).is_err());
        assert!(validate(SecretType::KeyValue, &data(&[("a", b"\x00\x01")])).is_ok());
        assert!(validate(SecretType::Generic, &data(&[("bad key", b"x")])).is_err());
        assert_eq!(
            render(SecretType::KeyValue, &data(&[("a", b"1")])).type_,
            "Opaque"
        );
    }

    #[test]
    fn template_output_is_capped_at_1_mib() {
        use crate::api::{TargetTemplate, TemplateMergePolicy};
        let big = vec![b'x'; 300 * 1024];
        let value = data(&[("v", &big)]);
        let template = |text: &str, policy| TargetTemplate {
            data: [("out".to_owned(), text.to_owned())].into(),
            merge_policy: policy,
        };
        // 3 x 300 KiB: fits.
        let mut r = render(SecretType::KeyValue, &value);
        let fits = template("{{ .v }}{{ .v }}{{ .v }}", TemplateMergePolicy::Replace);
        apply_template(&mut r, &fits, &value).unwrap();
        // A thousand references would make 300 MiB: refused before it is built.
        let mut r = render(SecretType::KeyValue, &value);
        let huge = template(&"{{ .v }}".repeat(1000), TemplateMergePolicy::Replace);
        let e = apply_template(&mut r, &huge, &value)
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than 1048576 bytes"), "{e}");
        assert!(!e.contains("xxx"));
        // The merged keys count too: 3 x 300 KiB plus the value's own 300 KiB.
        let mut r = render(SecretType::KeyValue, &value);
        let merged = template("{{ .v }}{{ .v }}{{ .v }}", TemplateMergePolicy::Merge);
        assert!(apply_template(&mut r, &merged, &value).is_err());
        // Literal text counts as well.
        let mut r = render(SecretType::KeyValue, &value);
        let text = template(
            &"y".repeat(MAX_TEMPLATE_OUTPUT + 1),
            TemplateMergePolicy::Replace,
        );
        assert!(apply_template(&mut r, &text, &value).is_err());
    }

    #[test]
    fn scrypt_above_64_mib_is_refused_before_deriving() {
        use pkcs8::der::Encode as _;
        use pkcs8::pkcs5::{pbes2, scrypt};
        let key = |log_n: u8, r: u32| {
            let kdf = pbes2::ScryptParams::from_params_and_salt(
                scrypt::Params::new(log_n, r, 1, 32).unwrap(),
                &[1; 16],
            )
            .unwrap();
            let params = pbes2::Parameters {
                kdf: kdf.into(),
                encryption: pbes2::EncryptionScheme::Aes256Cbc { iv: &[2; 16] },
            };
            let info = pkcs8::EncryptedPrivateKeyInfo {
                encryption_algorithm: pkcs8::pkcs5::EncryptionScheme::Pbes2(params),
                encrypted_data: &[0; 48],
            };
            let der = info.to_der().unwrap();
            pkcs8::der::pem::encode_string("ENCRYPTED PRIVATE KEY", pkcs8::LineEnding::LF, &der)
                .unwrap()
        };
        let problem = |pem: String| {
            validate(
                SecretType::PrivateKey,
                &data(&[("private-key", pem.as_bytes()), ("passphrase", b"x")]),
            )
            .unwrap_err()
            .to_string()
        };
        // N = 2^17, r = 8: 128 MiB.
        let e = problem(key(17, 8));
        assert!(e.contains("128 MiB; at most 64 MiB"), "{e}");
        // N = 2^10, r = 8: 1 MiB is within the cap (and fails on the fake ciphertext).
        let e = problem(key(10, 8));
        assert!(e.contains("cannot be decrypted"), "{e}");
    }
}
