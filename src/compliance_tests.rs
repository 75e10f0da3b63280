//! The compliance rules against real values: keys generated here (seeded per run: a failing
//! test prints `KEYHAVEN_TEST_SEED`), certificates made with rcgen, PKCS#12 keystores.

use super::*;
use crate::api::{CertificateRules, KeyRules, PasswordRules};
use crate::content::type_tests::seeded::{SeededKey, TestRng, data, jwt, pki};
use pkcs8::{EncodePrivateKey as _, LineEnding};
use rsa::pkcs1::EncodeRsaPrivateKey as _;
use std::sync::OnceLock;

/// One RSA 2048 key for every test (generating one takes a while).
fn rsa_2048() -> &'static rsa::RsaPrivateKey {
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut TestRng::new("rsa_2048"), 2048).unwrap())
}

fn keys(
    allowed: &[KeyKind],
    min_rsa_bits: Option<u32>,
    min_ec_bits: Option<u32>,
) -> CompliancePolicy {
    CompliancePolicy {
        keys: Some(KeyRules {
            allowed_algorithms: allowed.to_vec(),
            min_rsa_bits,
            min_ec_bits,
        }),
        ..Default::default()
    }
}

fn certificates(max_validity: Option<&str>, forbid_self_signed_leaf: bool) -> CompliancePolicy {
    CompliancePolicy {
        certificates: Some(CertificateRules {
            max_validity: max_validity.map(str::to_owned),
            forbid_self_signed_leaf,
        }),
        ..Default::default()
    }
}

fn password_rules(
    min_length: Option<u32>,
    min_classes: Option<u8>,
    bits: Option<u32>,
) -> CompliancePolicy {
    CompliancePolicy {
        password: Some(PasswordRules {
            min_length,
            min_classes,
            min_entropy_bits: bits,
        }),
        ..Default::default()
    }
}

fn private_key(pem: &str) -> SecretData {
    data(&[("private-key", pem.as_bytes())])
}

fn check(
    secret_type: SecretType,
    value: &SecretData,
    policy: &CompliancePolicy,
) -> Vec<&'static str> {
    let failing = evaluate(secret_type, value, policy, None);
    assert!(failing.iter().all(|r| RULES.contains(r)), "{failing:?}");
    failing
}

#[test]
fn rule_names_are_stable_sorted_and_fit_the_status() {
    let mut sorted = RULES;
    sorted.sort_unstable();
    assert_eq!(sorted, RULES);
    assert_eq!(
        RULES,
        [
            "certificate-max-validity",
            "certificate-self-signed-leaf",
            "ec-min-bits",
            "expiry-required",
            "key-algorithm",
            "max-version-age",
            "password-min-classes",
            "password-min-entropy",
            "password-min-length",
            "password-policy",
            "rsa-min-bits",
        ]
    );
    assert!(RULES.len() <= crate::api::MAX_FAILING_RULES);
    assert!(RULES.iter().all(|r| r.len() <= 64));
}

#[test]
fn the_entropy_estimate() {
    let close = |password: &str, bits: f64| {
        let got = entropy_bits(password);
        assert!((got - bits).abs() < 0.01, "{password}: {got} != {bits}");
    };
    // 8 distinct lower-case letters: 8 × log2 26.
    close("abcdefgh", 8.0 * 26f64.log2());
    // Lower, upper, digit, other: the alphabet is 95.
    close("aB3$eF7*", 8.0 * 95f64.log2());
    // Repeats earn little: at most twice the distinct characters count.
    close("aaaaaaaaaaaaaaaa", 2.0 * 26f64.log2());
    close("abababababababab", 4.0 * 26f64.log2());
    // A letter of no class counts as other.
    close("密码密码", 4.0 * 33f64.log2());
    close("", 0.0);
    assert!(entropy_bits("correct horse battery staple") > 100.0);
}

#[test]
fn password_rules_weak_and_strong() {
    let policy = password_rules(Some(12), Some(3), Some(60));
    let pw = |p: &str| data(&[("password", p.as_bytes())]);
    assert_eq!(
        check(SecretType::Password, &pw("hunter2"), &policy),
        [
            PASSWORD_MIN_CLASSES,
            PASSWORD_MIN_ENTROPY,
            PASSWORD_MIN_LENGTH
        ]
    );
    // Long enough, one class, repeated: only the length rule is met.
    assert_eq!(
        check(SecretType::Password, &pw("aaaaaaaaaaaaaaaaaaaa"), &policy),
        [PASSWORD_MIN_CLASSES, PASSWORD_MIN_ENTROPY]
    );
    // Three classes and long, but repeating two characters.
    assert_eq!(
        check(SecretType::Password, &pw("aA1aA1aA1aA1aA1"), &policy),
        [PASSWORD_MIN_ENTROPY]
    );
    assert!(check(SecretType::Password, &pw("x7#Kq2!vR9@mZ4"), &policy).is_empty());
    // basic-auth: its `password`, not its username.
    let basic = |u: &str, p: &str| data(&[("username", u.as_bytes()), ("password", p.as_bytes())]);
    assert_eq!(
        check(
            SecretType::BasicAuth,
            &basic("x7#Kq2!vR9@mZ4", "short"),
            &policy
        ),
        [
            PASSWORD_MIN_CLASSES,
            PASSWORD_MIN_ENTROPY,
            PASSWORD_MIN_LENGTH
        ]
    );
    assert!(
        check(
            SecretType::BasicAuth,
            &basic("u", "x7#Kq2!vR9@mZ4"),
            &policy
        )
        .is_empty()
    );
    // Another type with a `password` key is not judged by them.
    assert!(check(SecretType::KeyValue, &pw("a"), &policy).is_empty());
}

#[test]
fn the_password_policy_is_folded_in() {
    let legacy = PasswordPolicy {
        min_length: 10,
        min_classes: Some(2),
    };
    let none = CompliancePolicy::default();
    let weak = data(&[("password", b"abcdefghijkl")]);
    let strong = data(&[("password", b"abcdef123456")]);
    assert_eq!(
        evaluate(SecretType::Password, &weak, &none, Some(&legacy)),
        [PASSWORD_POLICY]
    );
    assert!(evaluate(SecretType::Password, &strong, &none, Some(&legacy)).is_empty());
    assert!(evaluate(SecretType::Password, &weak, &none, None).is_empty());
    // As content validation, which still refuses the weak one (unchanged).
    let rules = crate::content::Rules {
        password: Some(legacy),
        ..Default::default()
    };
    assert!(crate::content::validate_with(SecretType::Password, &weak, rules).is_err());
    assert!(crate::content::validate_with(SecretType::Password, &strong, rules).is_ok());
    // Validation applies it to type password only: so does this.
    let basic = data(&[("username", b"u"), ("password", b"abcdefghijkl")]);
    assert!(evaluate(SecretType::BasicAuth, &basic, &none, Some(&legacy)).is_empty());
    // With the profile's own rules as well: one sorted list.
    let both = evaluate(
        SecretType::Password,
        &weak,
        &password_rules(Some(20), None, None),
        Some(&legacy),
    );
    assert_eq!(both, [PASSWORD_MIN_LENGTH, PASSWORD_POLICY]);
}

#[test]
fn rsa_keys_in_every_format() {
    let key = rsa_2048();
    let mut rng = TestRng::new("rsa_keys_in_every_format");
    let pkcs1 = key.to_pkcs1_pem(LineEnding::LF).unwrap().to_string();
    let pkcs8 = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let salt: [u8; 16] = rand::RngExt::random(rng.rand());
    let params =
        pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(1000, &salt, &[3; 16]).unwrap();
    let encrypted = pkcs8::PrivateKeyInfo::try_from(key.to_pkcs8_der().unwrap().as_bytes())
        .unwrap()
        .encrypt_with_params(params, b"open sesame")
        .unwrap()
        .to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
        .unwrap();
    let mut encrypted = private_key(&encrypted);
    encrypted.insert("passphrase", b"open sesame".to_vec());
    for value in [private_key(&pkcs1), private_key(&pkcs8), encrypted] {
        crate::content::validate(SecretType::PrivateKey, &value).unwrap();
        assert_eq!(
            check(SecretType::PrivateKey, &value, &keys(&[], Some(3072), None)),
            [RSA_MIN_BITS]
        );
        assert!(
            check(
                SecretType::PrivateKey,
                &value,
                &keys(&[], Some(2048), Some(384))
            )
            .is_empty()
        );
        assert_eq!(
            check(
                SecretType::PrivateKey,
                &value,
                &keys(&[KeyKind::Ec], None, None)
            ),
            [KEY_ALGORITHM]
        );
        assert!(
            check(
                SecretType::PrivateKey,
                &value,
                &keys(&[KeyKind::Rsa], None, None)
            )
            .is_empty()
        );
    }
}

#[test]
fn ec_and_ed25519_keys() {
    let mut rng = TestRng::new("ec_and_ed25519_keys");
    let p256 = p256::SecretKey::random(&mut rng);
    let p256_sec1 = p256.to_sec1_pem(LineEnding::LF).unwrap().to_string();
    let p256_pkcs8 = p256.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let p384 = p384::SecretKey::random(&mut rng)
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap()
        .to_string();
    let ed25519 = ed25519_dalek::SigningKey::generate(&mut rng)
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap()
        .to_string();
    let min_384 = keys(&[], Some(4096), Some(384));
    for small in [&p256_sec1, &p256_pkcs8] {
        assert_eq!(
            check(SecretType::PrivateKey, &private_key(small), &min_384),
            [EC_MIN_BITS]
        );
    }
    assert!(check(SecretType::PrivateKey, &private_key(&p384), &min_384).is_empty());
    // The size rules leave Ed25519 alone; the algorithm rule does not.
    let ed = private_key(&ed25519);
    assert!(check(SecretType::PrivateKey, &ed, &min_384).is_empty());
    assert_eq!(
        check(
            SecretType::PrivateKey,
            &ed,
            &keys(&[KeyKind::Rsa, KeyKind::Ec], None, None)
        ),
        [KEY_ALGORITHM]
    );
    assert!(
        check(
            SecretType::PrivateKey,
            &ed,
            &keys(&[KeyKind::Ed25519], None, None)
        )
        .is_empty()
    );
    assert_eq!(
        check(
            SecretType::PrivateKey,
            &private_key(&p384),
            &keys(&[KeyKind::Ed25519], None, None)
        ),
        [KEY_ALGORITHM]
    );
}

#[test]
fn ssh_keys() {
    let mut rng = TestRng::new("ssh_keys");
    let ssh = |key: ssh_key::PrivateKey| {
        let pem = key.to_openssh(ssh_key::LineEnding::LF).unwrap();
        data(&[("ssh-privatekey", pem.as_bytes())])
    };
    let ed25519 = ssh(ssh_key::PrivateKey::random(&mut rng, ssh_key::Algorithm::Ed25519).unwrap());
    let rsa = ssh_key::private::RsaKeypair::try_from(rsa_2048()).unwrap();
    let rsa = ssh(ssh_key::PrivateKey::from(rsa));
    let p256 = ssh(ssh_key::PrivateKey::random(
        &mut rng,
        ssh_key::Algorithm::Ecdsa {
            curve: ssh_key::EcdsaCurve::NistP256,
        },
    )
    .unwrap());
    for value in [&ed25519, &rsa, &p256] {
        crate::content::validate(SecretType::SshKey, value).unwrap();
    }
    let ed_only = keys(&[KeyKind::Ed25519], None, None);
    assert!(check(SecretType::SshKey, &ed25519, &ed_only).is_empty());
    assert_eq!(check(SecretType::SshKey, &rsa, &ed_only), [KEY_ALGORITHM]);
    let strict = keys(&[], Some(3072), Some(384));
    assert_eq!(check(SecretType::SshKey, &rsa, &strict), [RSA_MIN_BITS]);
    assert_eq!(check(SecretType::SshKey, &p256, &strict), [EC_MIN_BITS]);
    assert!(check(SecretType::SshKey, &ed25519, &strict).is_empty());
    assert!(
        check(
            SecretType::SshKey,
            &rsa,
            &keys(&[KeyKind::Rsa], Some(2048), None)
        )
        .is_empty()
    );
    // Encrypted: read with its passphrase, through the validation's KDF cache.
    let key = ssh_key::PrivateKey::random(&mut rng, ssh_key::Algorithm::Ed25519).unwrap();
    let enc = key.encrypt(&mut rng, "pass phrase").unwrap();
    let pem = enc.to_openssh(ssh_key::LineEnding::LF).unwrap();
    let enc = data(&[
        ("ssh-privatekey", pem.as_bytes()),
        ("passphrase", b"pass phrase"),
    ]);
    assert_eq!(
        check(SecretType::SshKey, &enc, &keys(&[KeyKind::Rsa], None, None)),
        [KEY_ALGORITHM]
    );
}

/// A self-signed certificate valid for `days` (a leaf, or a CA), with its key.
fn self_signed(rng: &mut TestRng, days: i64, is_ca: bool) -> SecretData {
    let key = SeededKey::new(rng);
    let mut params = rcgen::CertificateParams::new(vec!["svc.example".to_owned()]).unwrap();
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = params.not_before + time::Duration::days(days);
    if is_ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let cert = params.self_signed(&key).unwrap();
    data(&[
        ("tls.crt", cert.pem().as_bytes()),
        ("tls.key", key.pem().as_bytes()),
    ])
}

#[test]
fn certificate_validity() {
    let mut rng = TestRng::new("certificate_validity");
    let two_years = self_signed(&mut rng, 730, false);
    let ninety_days = self_signed(&mut rng, 90, false);
    for value in [&two_years, &ninety_days] {
        crate::content::validate(SecretType::Certificate, value).unwrap();
    }
    let max_90d = certificates(Some("2160h"), false);
    assert_eq!(
        check(SecretType::Certificate, &two_years, &max_90d),
        [CERTIFICATE_MAX_VALIDITY]
    );
    assert!(check(SecretType::Certificate, &ninety_days, &max_90d).is_empty());
    assert!(
        check(
            SecretType::Certificate,
            &two_years,
            &certificates(Some("17520h"), false)
        )
        .is_empty()
    );
    // A certificate always has an expiry.
    let expiry = CompliancePolicy {
        require_expiry: true,
        ..Default::default()
    };
    assert!(check(SecretType::Certificate, &two_years, &expiry).is_empty());
}

#[test]
fn self_signed_leaves() {
    let mut rng = TestRng::new("self_signed_leaves");
    let forbid = certificates(None, true);
    let leaf = self_signed(&mut rng, 90, false);
    assert_eq!(
        check(SecretType::Certificate, &leaf, &forbid),
        [CERTIFICATE_SELF_SIGNED_LEAF]
    );
    assert!(check(SecretType::Certificate, &leaf, &certificates(None, false)).is_empty());
    // A CA is not a leaf.
    let ca = self_signed(&mut rng, 90, true);
    crate::content::validate(SecretType::Certificate, &ca).unwrap();
    assert!(check(SecretType::Certificate, &ca, &forbid).is_empty());
    // A leaf a CA signed (the chain after it) is not self-signed.
    let pki = pki(&mut rng);
    let chain = format!("{}{}", pki.leaf, pki.intermediate);
    let signed = data(&[
        ("tls.crt", chain.as_bytes()),
        ("tls.key", pki.leaf_key.as_bytes()),
    ]);
    crate::content::validate(SecretType::Certificate, &signed).unwrap();
    assert!(check(SecretType::Certificate, &signed, &forbid).is_empty());
    // The leaf's key is judged too (P-256 here).
    assert_eq!(
        check(
            SecretType::Certificate,
            &signed,
            &keys(&[], None, Some(384))
        ),
        [EC_MIN_BITS]
    );
}

#[test]
fn self_signed_is_more_than_subject_equals_issuer() {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let mut rng = TestRng::new("self_signed_is_more_than_subject_equals_issuer");
    // The CA and the leaf both have rcgen's default name: subject = issuer, another key.
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca, SeededKey::new(&mut rng)).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["svc.example".to_owned()]).unwrap();
    // Key ids: an authority key id, and (rcgen writes it with basicConstraints) a subject one.
    params.use_authority_key_identifier_extension = true;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let leaf_key = SeededKey::new(&mut rng);
    let leaf = params.signed_by(&leaf_key, &ca).unwrap();
    let (_, parsed) = X509Certificate::from_der(leaf.der()).unwrap();
    assert_eq!(parsed.subject().as_raw(), parsed.issuer().as_raw());
    let value = data(&[
        ("tls.crt", format!("{}{}", leaf.pem(), ca.pem()).as_bytes()),
        ("tls.key", leaf_key.pem().as_bytes()),
    ]);
    crate::content::validate(SecretType::Certificate, &value).unwrap();
    assert!(check(SecretType::Certificate, &value, &certificates(None, true)).is_empty());

    // A self-signed leaf whose signature cannot be verified (damaged here) is still told by
    // its key ids: authority key id = subject key id.
    let own_key = SeededKey::new(&mut rng);
    let own = params.self_signed(&own_key).unwrap();
    let mut der = own.der().to_vec();
    let last = der.len() - 1;
    der[last] ^= 1;
    let (_, damaged) = X509Certificate::from_der(&der).unwrap();
    assert!(damaged.verify_signature(None).is_err());
    assert!(crate::content::facts::certificate_facts(&damaged).self_signed_leaf);
    let (_, parsed) = X509Certificate::from_der(leaf.der()).unwrap();
    assert!(!crate::content::facts::certificate_facts(&parsed).self_signed_leaf);
}

/// A PKCS#12 with one private key entry: `key` and a self-signed leaf valid `days`.
fn keystore(rng: &mut TestRng, days: i64) -> SecretData {
    let key = SeededKey::new(rng);
    let mut params = rcgen::CertificateParams::new(vec!["a.example".to_owned()]).unwrap();
    params.not_after = params.not_before + time::Duration::days(days);
    let cert = params.self_signed(&key).unwrap();
    let chain = p12_keystore::PrivateKeyChain::new(
        vec![1u8; 20],
        p12_keystore::PrivateKey::from_der(&key.der()).unwrap(),
        [p12_keystore::Certificate::from_der(cert.der()).unwrap()],
    );
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry("a", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    let p12 = store.writer("changeit").write().unwrap();
    data(&[("keystore.p12", &p12), ("password", b"changeit")])
}

#[test]
fn keystores_are_judged_by_their_key_and_leaf() {
    let mut rng = TestRng::new("keystores_are_judged_by_their_key_and_leaf");
    let store = keystore(&mut rng, 730);
    crate::content::validate(SecretType::Keystore, &store).unwrap();
    assert_eq!(
        check(
            SecretType::Keystore,
            &store,
            &keys(&[KeyKind::Rsa], None, Some(384))
        ),
        [EC_MIN_BITS, KEY_ALGORITHM]
    );
    assert!(
        check(
            SecretType::Keystore,
            &store,
            &keys(&[KeyKind::Ec], None, Some(256))
        )
        .is_empty()
    );
    assert_eq!(
        check(
            SecretType::Keystore,
            &store,
            &certificates(Some("2160h"), true)
        ),
        [CERTIFICATE_MAX_VALIDITY, CERTIFICATE_SELF_SIGNED_LEAF]
    );
    assert!(
        check(
            SecretType::Keystore,
            &store,
            &certificates(Some("17520h"), false)
        )
        .is_empty()
    );
    // The facts came from the validation's KDF run: checking derives nothing again.
    let before = crate::content::kdf::DERIVED.with(|n| n.get());
    check(
        SecretType::Keystore,
        &store,
        &keys(&[KeyKind::Rsa], None, None),
    );
    assert_eq!(crate::content::kdf::DERIVED.with(|n| n.get()), before);

    // A truststore (certificates only): nothing to judge.
    let cert = rcgen::CertificateParams::new(vec!["ca.example".to_owned()])
        .unwrap()
        .self_signed(&SeededKey::new(&mut rng))
        .unwrap();
    let mut trust = p12_keystore::KeyStore::new();
    trust.add_entry(
        "ca",
        p12_keystore::KeyStoreEntry::Certificate(
            p12_keystore::Certificate::from_der(cert.der()).unwrap(),
        ),
    );
    let p12 = trust.writer("changeit").write().unwrap();
    let trust = data(&[("keystore.p12", &p12), ("password", b"changeit")]);
    crate::content::validate(SecretType::Keystore, &trust).unwrap();
    let everything = CompliancePolicy {
        keys: keys(&[KeyKind::Rsa], Some(4096), Some(521)).keys,
        certificates: certificates(Some("1h"), true).certificates,
        ..Default::default()
    };
    assert!(check(SecretType::Keystore, &trust, &everything).is_empty());
}

#[test]
fn expiry_required_for_api_keys_and_jwts() {
    let policy = CompliancePolicy {
        require_expiry: true,
        ..Default::default()
    };
    let api_key = data(&[("api-key", b"k-123")]);
    let expiring = data(&[
        ("api-key", b"k-123"),
        ("expires-at", b"2030-01-01T00:00:00Z"),
    ]);
    assert_eq!(
        check(SecretType::ApiKey, &api_key, &policy),
        [EXPIRY_REQUIRED]
    );
    assert!(check(SecretType::ApiKey, &expiring, &policy).is_empty());
    let token = |claims: &str| data(&[("token", jwt(r#"{"alg":"HS256"}"#, claims).as_bytes())]);
    let without = token(r#"{"sub":"svc"}"#);
    let with = token(r#"{"sub":"svc","exp":1893456000}"#);
    for value in [&without, &with] {
        crate::content::validate(SecretType::Jwt, value).unwrap();
    }
    assert_eq!(check(SecretType::Jwt, &without, &policy), [EXPIRY_REQUIRED]);
    assert!(check(SecretType::Jwt, &with, &policy).is_empty());
    // Without the rule, or for a type it does not judge: nothing.
    assert!(check(SecretType::ApiKey, &api_key, &CompliancePolicy::default()).is_empty());
    assert!(check(SecretType::KeyValue, &data(&[("a", b"1")]), &policy).is_empty());
}

#[test]
fn rules_of_other_types_are_skipped() {
    let everything = CompliancePolicy {
        enforcement: crate::api::Enforcement::Deny,
        password: password_rules(Some(1024), Some(4), Some(4096)).password,
        keys: keys(&[KeyKind::Rsa], Some(16384), Some(571)).keys,
        certificates: certificates(Some("1s"), true).certificates,
        require_expiry: true,
        max_version_age: Some("1s".into()),
    };
    assert!(
        check(
            SecretType::SecretKey,
            &data(&[("key", &[1; 32])]),
            &everything
        )
        .is_empty()
    );
    assert!(
        check(
            SecretType::Generic,
            &data(&[("password", b"a")]),
            &everything
        )
        .is_empty()
    );
    let mut rng = TestRng::new("rules_of_other_types_are_skipped");
    let ed = ed25519_dalek::SigningKey::generate(&mut rng)
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap()
        .to_string();
    // A private key: the key rules only.
    assert_eq!(
        check(SecretType::PrivateKey, &private_key(&ed), &everything),
        [KEY_ALGORITHM]
    );
}

#[test]
fn max_version_age() {
    let policy = CompliancePolicy {
        max_version_age: Some("720h".into()),
        ..Default::default()
    };
    let created: jiff::Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
    let deadline: jiff::Timestamp = "2025-01-31T00:00:00Z".parse().unwrap();
    let before = deadline - jiff::SignedDuration::from_secs(1);
    assert!(!age_breaks(&policy, Some(created), before));
    assert!(age_breaks(&policy, Some(created), deadline));
    assert_eq!(
        next_age_check(&policy, Some(created), before),
        Some(deadline)
    );
    assert_eq!(
        next_age_check(&policy, Some(created), created),
        Some(deadline)
    );
    assert_eq!(next_age_check(&policy, Some(created), deadline), None);
    // No version, or no rule: never.
    assert!(!age_breaks(&policy, None, deadline));
    assert_eq!(next_age_check(&policy, None, created), None);
    let none = CompliancePolicy::default();
    assert!(!age_breaks(&none, Some(created), deadline));
    assert_eq!(next_age_check(&none, Some(created), created), None);
    // A version dated near the end of time does not overflow.
    let late: jiff::Timestamp = "9999-12-01T00:00:00Z".parse().unwrap();
    assert!(!age_breaks(&policy, Some(late), late));
}

#[test]
fn unreadable_durations_are_named() {
    assert_eq!(policy_problem(&CompliancePolicy::default()), None);
    assert_eq!(policy_problem(&certificates(Some("2160h"), false)), None);
    let p = policy_problem(&certificates(Some("900000h"), false)).unwrap();
    assert!(
        p.starts_with("compliance.certificates.maxValidity: "),
        "{p}"
    );
    let p = policy_problem(&CompliancePolicy {
        max_version_age: Some("1y".into()),
        ..Default::default()
    })
    .unwrap();
    assert!(p.starts_with("compliance.maxVersionAge: "), "{p}");
}
