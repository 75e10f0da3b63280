//! Unit tests of the structured types, the generators and the renderers. Every random
//! input comes from a generator seeded per run ([`seeded`]); a failing test prints the seed.

mod kdf_costs;
pub(crate) mod seeded;

use super::*;
use crate::api::{CharClass, Generate, KeyAlgorithm};
use pkcs8::{EncodePrivateKey as _, LineEnding};
use rand::RngExt as _;
use rsa::pkcs1::EncodeRsaPrivateKey as _;
use seeded::{SeededKey, TestRng, data, jwt, p256_pkcs8, pki, problem};

#[test]
fn jwt_good_and_bad() {
    let good = jwt(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        r#"{"sub":"x","exp":1900000000}"#,
    );
    let r = validate(SecretType::Jwt, &data(&[("token", good.as_bytes())])).unwrap();
    assert_eq!(r.expires_at.unwrap().as_second(), 1_900_000_000);
    let no_exp = jwt(r#"{"alg":"none"}"#, r#"{}"#);
    assert_eq!(
        validate(SecretType::Jwt, &data(&[("token", no_exp.as_bytes())]))
            .unwrap()
            .expires_at,
        None
    );
    for (bad, want) in [
        ("a.b".to_owned(), "three"),
        ("!!.e30.c2ln".to_owned(), "base64url"),
        (jwt("not json", "{}"), "header that is not JSON"),
        (jwt(r#"{"typ":"JWT"}"#, "{}"), "alg"),
        (jwt(r#"{"alg":"x"}"#, "[1]"), "not a JSON object"),
        (jwt(r#"{"alg":"x"}"#, r#"{"exp":"soon"}"#), "exp"),
    ] {
        let p = problem(validate(
            SecretType::Jwt,
            &data(&[("token", bad.as_bytes())]),
        ));
        assert!(p.contains(want), "{p}");
    }
    assert!(validate(SecretType::Jwt, &data(&[("jwt", good.as_bytes())])).is_err());
}

#[test]
fn private_key_formats() {
    let mut rng = TestRng::new("private_key_formats");
    let ok = |pem: &str| {
        let d = data(&[("private-key", pem.as_bytes())]);
        validate(SecretType::PrivateKey, &d).unwrap();
        let r = render(SecretType::PrivateKey, &d);
        assert_eq!(r.type_, "Opaque");
        let public = String::from_utf8(r.data.get("public-key").unwrap().to_vec()).unwrap();
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
    };
    // PKCS#8: EC P-256, P-384, Ed25519, RSA; SEC1; PKCS#1.
    let ec = p256::SecretKey::random(&mut rng);
    ok(&ec.to_pkcs8_pem(LineEnding::LF).unwrap());
    ok(&ec.to_sec1_pem(LineEnding::LF).unwrap());
    ok(&p384::SecretKey::random(&mut rng)
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap());
    ok(&ed25519_dalek::SigningKey::generate(&mut rng)
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap());
    let rsa_key = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
    ok(&rsa_key.to_pkcs8_pem(LineEnding::LF).unwrap());
    ok(&rsa_key.to_pkcs1_pem(LineEnding::LF).unwrap());

    // Encrypted PKCS#8 (scrypt at OpenSSL's default cost, 16 MiB; the crate's default of
    // 128 MiB is above the cap): needs the right passphrase.
    let params = pkcs8::pkcs5::pbes2::Parameters::scrypt_aes256cbc(
        pkcs8::pkcs5::scrypt::Params::new(14, 8, 1, 32).unwrap(),
        &[7; 16],
        &[9; 16],
    )
    .unwrap();
    let encrypted = pkcs8::PrivateKeyInfo::try_from(ec.to_pkcs8_der().unwrap().as_bytes())
        .unwrap()
        .encrypt_with_params(params, b"open sesame")
        .unwrap()
        .to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
        .unwrap();
    let with = |p: &[u8]| {
        validate(
            SecretType::PrivateKey,
            &data(&[("private-key", encrypted.as_bytes()), ("passphrase", p)]),
        )
    };
    with(b"open sesame").unwrap();
    assert!(problem(with(b"wrong")).contains("cannot be decrypted"));
    let p = problem(validate(
        SecretType::PrivateKey,
        &data(&[("private-key", encrypted.as_bytes())]),
    ));
    assert!(p.contains("passphrase"), "{p}");
    let r = render(
        SecretType::PrivateKey,
        &data(&[
            ("private-key", encrypted.as_bytes()),
            ("passphrase", b"open sesame"),
        ]),
    );
    assert!(r.data.get("public-key").is_some());

    // Refused: legacy encrypted PEM, garbage, two keys, an OpenSSH key, a certificate.
    let legacy = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n";
    let two = format!("{}{}", p256_pkcs8(&mut rng), p256_pkcs8(&mut rng));
    let ssh = ssh_key::PrivateKey::random(&mut rng, ssh_key::Algorithm::Ed25519)
        .unwrap()
        .to_openssh(ssh_key::LineEnding::LF)
        .unwrap()
        .to_string();
    let garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    for (bad, want) in [
        (legacy, "legacy"),
        ("hello", "no PEM block"),
        (two.as_str(), "more than one"),
        (ssh.as_str(), "ssh-key"),
        (pki(&mut rng).leaf.as_str(), "no PEM private key"),
        (garbage, "not a valid PKCS#8"),
    ] {
        let p = problem(validate(
            SecretType::PrivateKey,
            &data(&[("private-key", bad.as_bytes())]),
        ));
        assert!(p.contains(want), "{want}: {p}");
    }
}

#[test]
fn secret_key_lengths() {
    let rules = Rules {
        secret_key_bytes: Some(32),
        ..Rules::default()
    };
    assert!(validate_with(SecretType::SecretKey, &data(&[("key", &[7; 32])]), rules).is_ok());
    assert!(validate(SecretType::SecretKey, &data(&[("key", &[0xff; 5])])).is_ok());
    let p = problem(validate_with(
        SecretType::SecretKey,
        &data(&[("key", &[7; 31])]),
        rules,
    ));
    assert!(p.contains("must be 32 bytes"), "{p}");
    assert!(validate(SecretType::SecretKey, &data(&[("key", b"")])).is_err());
    assert!(validate(SecretType::SecretKey, &data(&[("secret", b"x")])).is_err());
}

fn p12(rng: &mut TestRng, password: &str) -> Vec<u8> {
    let key = SeededKey::new(rng);
    let cert = rcgen::CertificateParams::new(vec!["a.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let chain = p12_keystore::PrivateKeyChain::new(
        vec![1u8; 20],
        p12_keystore::PrivateKey::from_der(&key.der()).unwrap(),
        [p12_keystore::Certificate::from_der(cert.der()).unwrap()],
    );
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry("a", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
    store.writer(password).write().unwrap()
}

#[test]
fn keystore_opens_with_its_password() {
    let store = p12(
        &mut TestRng::new("keystore_opens_with_its_password"),
        "changeit",
    );
    let with = |pw: &[u8]| {
        validate(
            SecretType::Keystore,
            &data(&[("keystore.p12", &store), ("password", pw)]),
        )
    };
    with(b"changeit").unwrap();
    assert!(problem(with(b"wrong")).contains("opens with `password`"));
    assert!(
        validate(
            SecretType::Keystore,
            &data(&[("keystore.p12", b"not pkcs12"), ("password", b"x")])
        )
        .is_err()
    );
    assert!(validate(SecretType::Keystore, &data(&[("keystore.p12", &store)])).is_err());
    assert_eq!(
        render(SecretType::Keystore, &data(&[("keystore.p12", &store)])).type_,
        "Opaque"
    );
}

#[test]
fn certificate_chains() {
    let mut rng = TestRng::new("certificate_chains");
    let pki = pki(&mut rng);
    let chain = format!("{}{}", pki.leaf, pki.intermediate);
    let d = data(&[
        ("tls.crt", chain.as_bytes()),
        ("tls.key", pki.leaf_key.as_bytes()),
    ]);
    let r = validate(SecretType::Certificate, &d).unwrap();
    assert!(r.expires_at.is_some());
    let rendered = render(SecretType::Certificate, &d);
    assert_eq!(rendered.type_, "kubernetes.io/tls");
    assert_eq!(
        rendered.data.keys().collect::<Vec<_>>(),
        ["ca.crt", "tls.crt", "tls.key"]
    );
    assert_eq!(
        rendered.data.get("ca.crt"),
        Some(pki.intermediate.as_bytes())
    );
    // A full chain to the root, and an explicit ca.crt, are fine too.
    let full = format!("{}{}{}", pki.leaf, pki.intermediate, pki.root);
    validate(
        SecretType::Certificate,
        &data(&[
            ("tls.crt", full.as_bytes()),
            ("tls.key", pki.leaf_key.as_bytes()),
            ("ca.crt", pki.root.as_bytes()),
        ]),
    )
    .unwrap();

    let bad = |crt: &str, key: &str| {
        problem(validate(
            SecretType::Certificate,
            &data(&[("tls.crt", crt.as_bytes()), ("tls.key", key.as_bytes())]),
        ))
    };
    // Wrong order; a gap in the chain; the wrong key; not a certificate; garbage.
    let swapped = format!("{}{}", pki.intermediate, pki.leaf);
    assert!(bad(&swapped, &pki.leaf_key).contains("chain order"));
    let wrong_order = format!("{}{}{}", pki.leaf, pki.root, pki.intermediate);
    assert!(bad(&wrong_order, &pki.leaf_key).contains("chain order"));
    assert!(bad(&pki.leaf, &p256_pkcs8(&mut rng)).contains("does not match the leaf"));
    assert!(bad(&pki.leaf_key, &pki.leaf_key).contains("only CERTIFICATE"));
    let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    assert!(bad(junk, &pki.leaf_key).contains("not a valid X.509"));
    assert!(bad("", &pki.leaf_key).contains("must not be empty"));
    let p = problem(validate(
        SecretType::Certificate,
        &data(&[("tls.crt", pki.leaf.as_bytes())]),
    ));
    assert!(p.contains("tls.key"), "{p}");
    // The error never quotes the key (its base64 starts "MIG" for P-256, "MII" for RSA).
    let key_body = pki.leaf_key.lines().nth(1).unwrap();
    let quoted = bad(&pki.leaf, &pki.leaf_key.replace("PRIVATE KEY", "X"));
    assert!(
        !quoted.contains("MII") && !quoted.contains(&key_body[..16]),
        "{quoted}"
    );
}

#[test]
fn ssh_keys() {
    let mut rng = TestRng::new("ssh_keys");
    for algorithm in [
        ssh_key::Algorithm::Ed25519,
        ssh_key::Algorithm::Ecdsa {
            curve: ssh_key::EcdsaCurve::NistP256,
        },
    ] {
        let key = ssh_key::PrivateKey::random(&mut rng, algorithm).unwrap();
        let pem = key.to_openssh(ssh_key::LineEnding::LF).unwrap();
        let d = data(&[("ssh-privatekey", pem.as_bytes())]);
        validate(SecretType::SshKey, &d).unwrap();
        let r = render(SecretType::SshKey, &d);
        assert_eq!(r.type_, "kubernetes.io/ssh-auth");
        let public = std::str::from_utf8(r.data.get("ssh-publickey").unwrap()).unwrap();
        assert_eq!(
            public.trim_end(),
            key.public_key().to_openssh().unwrap().as_str()
        );

        // Encrypted: the passphrase must open it.
        let enc = key.encrypt(&mut rng, "pass phrase").unwrap();
        let enc = enc.to_openssh(ssh_key::LineEnding::LF).unwrap();
        let with = |p: Option<&[u8]>| {
            let mut d = data(&[("ssh-privatekey", enc.as_bytes())]);
            if let Some(p) = p {
                d.insert("passphrase", p);
            }
            validate(SecretType::SshKey, &d)
        };
        with(Some(b"pass phrase")).unwrap();
        assert!(problem(with(Some(b"nope"))).contains("cannot be decrypted"));
        assert!(problem(with(None)).contains("passphrase"));
    }
    let key = ssh_key::PrivateKey::random(&mut rng, ssh_key::Algorithm::Ed25519).unwrap();
    let other = ssh_key::PrivateKey::random(&mut rng, ssh_key::Algorithm::Ed25519).unwrap();
    let pem = key.to_openssh(ssh_key::LineEnding::LF).unwrap();
    let mismatched = other.public_key().to_openssh().unwrap();
    let p = problem(validate(
        SecretType::SshKey,
        &data(&[
            ("ssh-privatekey", pem.as_bytes()),
            ("ssh-publickey", mismatched.as_bytes()),
        ]),
    ));
    assert!(p.contains("does not match"), "{p}");
    assert!(
        validate(
            SecretType::SshKey,
            &data(&[("ssh-privatekey", p256_pkcs8(&mut rng).as_bytes())])
        )
        .is_err()
    );
}

fn gen_spec() -> Generate {
    Generate::default()
}

#[test]
fn password_generator_follows_its_policy() {
    let pw = generate(SecretType::Password, &gen_spec(), "n").unwrap();
    validate(SecretType::Password, &pw).unwrap();
    let text = std::str::from_utf8(pw.get("password").unwrap()).unwrap();
    assert_eq!(text.chars().count(), 32);
    assert!(text.chars().any(|c| c.is_ascii_lowercase()));
    assert!(text.chars().any(|c| c.is_ascii_uppercase()));
    assert!(text.chars().any(|c| c.is_ascii_digit()));
    assert!(text.chars().any(|c| !c.is_ascii_alphanumeric()));
    for _ in 0..50 {
        let spec = Generate {
            length: Some(12),
            classes: vec![CharClass::Digits, CharClass::Lowercase],
            exclude: Some("0o1l".into()),
            ..gen_spec()
        };
        let pw = generate(SecretType::Password, &spec, "n").unwrap();
        let text = std::str::from_utf8(pw.get("password").unwrap()).unwrap();
        assert_eq!(text.len(), 12);
        assert!(
            text.chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        );
        assert!(!text.contains(['0', 'o', '1', 'l']));
        assert!(text.chars().any(|c| c.is_ascii_digit()));
        assert!(text.chars().any(|c| c.is_ascii_lowercase()));
    }
    let impossible = Generate {
        classes: vec![CharClass::Digits],
        exclude: Some("0123456789".into()),
        ..gen_spec()
    };
    assert!(generate(SecretType::Password, &impossible, "n").is_err());
    // Two generated passwords differ.
    assert_ne!(
        generate(SecretType::Password, &gen_spec(), "n").unwrap(),
        generate(SecretType::Password, &gen_spec(), "n").unwrap()
    );
}

#[test]
fn every_generator_output_parses_back_as_its_type() {
    let key = generate(
        SecretType::SecretKey,
        &Generate {
            bytes: Some(48),
            ..gen_spec()
        },
        "n",
    )
    .unwrap();
    validate_with(
        SecretType::SecretKey,
        &key,
        Rules {
            secret_key_bytes: Some(48),
            ..Rules::default()
        },
    )
    .unwrap();
    let api = generate(
        SecretType::ApiKey,
        &Generate {
            prefix: Some("kh_live_".into()),
            ..gen_spec()
        },
        "n",
    )
    .unwrap();
    validate(SecretType::ApiKey, &api).unwrap();
    let text = std::str::from_utf8(api.get("api-key").unwrap()).unwrap();
    assert!(
        text.starts_with("kh_live_") && text.len() == 8 + 40,
        "{}",
        text.len()
    );

    for alg in [
        None,
        Some(KeyAlgorithm::EcdsaP256),
        Some(KeyAlgorithm::Ed25519),
        Some(KeyAlgorithm::Rsa),
    ] {
        let spec = Generate {
            algorithm: alg,
            ..gen_spec()
        };
        let ssh = generate(SecretType::SshKey, &spec, "n").unwrap();
        validate(SecretType::SshKey, &ssh).unwrap();
        let pk = generate(SecretType::PrivateKey, &spec, "n").unwrap();
        validate(SecretType::PrivateKey, &pk).unwrap();
        if alg == Some(KeyAlgorithm::Rsa) {
            let public = render(SecretType::SshKey, &ssh).data;
            assert!(
                public
                    .get("ssh-publickey")
                    .unwrap()
                    .starts_with(b"ssh-rsa ")
            );
            assert!(generate(SecretType::Certificate, &spec, "n").is_err());
        } else {
            let cert = generate(SecretType::Certificate, &spec, "n").unwrap();
            let r = validate(SecretType::Certificate, &cert).unwrap();
            let days =
                (r.expires_at.unwrap().as_second() - jiff::Timestamp::now().as_second()) / 86400;
            assert!((364..=365).contains(&days), "{days}");
        }
    }
    let cert = generate(
        SecretType::Certificate,
        &Generate {
            dns_names: vec!["api.example".into()],
            validity: Some("48h".into()),
            ..gen_spec()
        },
        "n",
    )
    .unwrap();
    let r = validate(SecretType::Certificate, &cert).unwrap();
    assert!(r.expires_at.unwrap().as_second() - jiff::Timestamp::now().as_second() <= 48 * 3600);
    assert!(generate(SecretType::Jwt, &gen_spec(), "n").is_err());
}

/// Every type and key, on random bytes and on mutations of valid values: never a panic.
#[test]
fn fuzzed_inputs_never_panic() {
    let mut rng = TestRng::new("fuzzed_inputs_never_panic");
    let pki = pki(&mut rng);
    // An OpenSSH key like the generator's (Ed25519, comment "keyhaven"), from the seed.
    let mut ssh = ssh_key::PrivateKey::random(&mut rng, ssh_key::Algorithm::Ed25519).unwrap();
    ssh.set_comment("keyhaven");
    let ssh = ssh.to_openssh(ssh_key::LineEnding::LF).unwrap();
    let seeds: Vec<Vec<u8>> = vec![
        pki.leaf.clone().into_bytes(),
        pki.leaf_key.clone().into_bytes(),
        p12(&mut rng, "pw"),
        ssh.as_bytes().to_vec(),
        jwt(r#"{"alg":"HS256"}"#, r#"{"exp":1}"#).into_bytes(),
        b"-----BEGIN PRIVATE KEY-----\n".to_vec(),
        b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".to_vec(),
    ];
    let types = [
        SecretType::KeyValue,
        SecretType::Generic,
        SecretType::BasicAuth,
        SecretType::Password,
        SecretType::ApiKey,
        SecretType::Jwt,
        SecretType::PrivateKey,
        SecretType::SecretKey,
        SecretType::Keystore,
        SecretType::Certificate,
        SecretType::SshKey,
    ];
    let keys = [
        "token",
        "private-key",
        "passphrase",
        "key",
        "keystore.p12",
        "password",
        "tls.crt",
        "tls.key",
        "ca.crt",
        "ssh-privatekey",
        "ssh-publickey",
        "api-key",
        "expires-at",
        "username",
    ];
    let random_value = |rng: &mut rand::rngs::StdRng| -> Vec<u8> {
        match rng.random_range(0..3) {
            0 => {
                let mut v = vec![0u8; rng.random_range(0..200)];
                rng.fill(&mut v[..]);
                v
            }
            1 => {
                let mut v = seeds[rng.random_range(0..seeds.len())].clone();
                for _ in 0..rng.random_range(1..8) {
                    if v.is_empty() {
                        break;
                    }
                    let i = rng.random_range(0..v.len());
                    v[i] = rng.random();
                }
                v
            }
            _ => {
                let v = &seeds[rng.random_range(0..seeds.len())];
                v[..rng.random_range(0..=v.len())].to_vec()
            }
        }
    };
    let rng = rng.rand();
    for _ in 0..400 {
        let mut d = SecretData::new();
        for k in keys {
            if rng.random_bool(0.7) {
                d.insert(k, random_value(rng));
            }
        }
        for t in types {
            let _ = validate(t, &d);
            let _ = render(t, &d);
        }
    }
}

/// Key derivation costs come from the value: an absurd one is refused before deriving.
#[test]
fn generated_certificate_signed_by_a_generated_ca() {
    let ca = generate(
        SecretType::Certificate,
        &Generate {
            common_name: Some("keyhaven test CA".into()),
            is_ca: true,
            ..gen_spec()
        },
        "ca",
    )
    .unwrap();
    validate(SecretType::Certificate, &ca).unwrap();
    let spec = Generate {
        dns_names: vec!["svc.example".into()],
        issuer_ref: Some(crate::api::IssuerRef { name: "ca".into() }),
        ..gen_spec()
    };
    let leaf = generate_with(SecretType::Certificate, &spec, "svc", Some(&ca)).unwrap();
    validate(SecretType::Certificate, &leaf).unwrap();
    let chain = std::str::from_utf8(leaf.get("tls.crt").unwrap()).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(chain.ends_with(std::str::from_utf8(ca.get("tls.crt").unwrap()).unwrap()));
    assert_eq!(leaf.get("ca.crt"), ca.get("tls.crt"));
    // Without the issuer's value there is nothing to sign with.
    assert!(generate_with(SecretType::Certificate, &spec, "svc", None).is_err());
}

#[test]
fn target_templates() {
    use crate::api::{TargetTemplate, TemplateMergePolicy};
    let value = data(&[("username", b"app"), ("password", b"s3cr3t-tpl")]);
    let template = |policy, kv: &[(&str, &str)]| TargetTemplate {
        data: kv
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        merge_policy: policy,
    };
    let mut r = render(SecretType::BasicAuth, &value);
    apply_template(
        &mut r,
        &template(
            TemplateMergePolicy::Merge,
            &[("dsn", "postgres://{{ .username }}:{{.password}}@db/app")],
        ),
        &value,
    )
    .unwrap();
    assert_eq!(
        r.data.get("dsn"),
        Some(&b"postgres://app:s3cr3t-tpl@db/app"[..])
    );
    assert_eq!(
        r.data.keys().collect::<Vec<_>>(),
        ["dsn", "password", "username"]
    );
    // Replace: only the template's keys (Opaque types only).
    let mut r = render(SecretType::KeyValue, &value);
    apply_template(
        &mut r,
        &template(
            TemplateMergePolicy::Replace,
            &[("DB_PASSWORD", "{{ .password }}")],
        ),
        &value,
    )
    .unwrap();
    assert_eq!(r.data.keys().collect::<Vec<_>>(), ["DB_PASSWORD"]);
    let mut tls = Rendered {
        type_: "kubernetes.io/tls",
        data: value.clone(),
    };
    assert!(
        apply_template(
            &mut tls,
            &template(TemplateMergePolicy::Replace, &[("x", "y")]),
            &value
        )
        .is_err()
    );
    for (bad, want) in [
        ("{{ .nope }}", "which the value does not have"),
        ("{{ password }}", "expected"),
        ("{{ .password", "without"),
    ] {
        let mut r = render(SecretType::KeyValue, &value);
        let e = apply_template(
            &mut r,
            &template(TemplateMergePolicy::Merge, &[("k", bad)]),
            &value,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(want) && !e.contains("s3cr3t"), "{e}");
    }
}

#[test]
fn passwords_meet_the_profile_policy() {
    let policy = crate::api::PasswordPolicy {
        min_length: 12,
        min_classes: Some(3),
    };
    let rules = Rules {
        password: Some(policy),
        ..Rules::default()
    };
    let check = |pw: &str| {
        validate_with(
            SecretType::Password,
            &data(&[("password", pw.as_bytes())]),
            rules,
        )
    };
    assert!(check("Correct-horse-9").is_ok());
    let short = problem(check("Ab1-short"));
    assert!(
        short.contains("9 characters") && short.contains("at least 12"),
        "{short}"
    );
    assert!(
        !short.contains("Ab1-short"),
        "the value must not appear: {short}"
    );
    let classes = problem(check("alllowercaseletters"));
    assert!(classes.contains("1 of the 4"), "{classes}");
    // Without a policy any non-empty password passes, as before.
    assert!(validate(SecretType::Password, &data(&[("password", b"x")])).is_ok());
    // Every generated password with enough length and classes passes a strict policy.
    let strict = crate::api::PasswordPolicy {
        min_length: 24,
        min_classes: Some(4),
    };
    assert!(password_weakness("aB3$aB3$aB3$aB3$aB3$aB3$", &strict).is_none());
}
