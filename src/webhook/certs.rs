//! The webhook's serving certificate, managed by keyhaven itself so that no cert-manager is
//! needed: a CA and a serving certificate signed by it, kept in the Secret
//! `keyhaven-webhook-tls` of the operator's namespace (every replica serves the same one),
//! and the `caBundle` of keyhaven's webhook configurations patched to match. The serving
//! certificate is renewed when a third of its life is left or its names change; the CA when
//! a year of its ten is left, the old CA staying in the bundle until the new one has signed
//! everything in use.

use crate::error::{Error, Result, Verb};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::net::IpAddr;
use zeroize::Zeroizing;

/// The Secret holding the webhook's CA and serving certificate.
pub const TLS_SECRET: &str = "keyhaven-webhook-tls";
const CA_LIFETIME: jiff::SignedDuration = jiff::SignedDuration::from_hours(24 * 3650);
const CA_RENEW_BEFORE: jiff::SignedDuration = jiff::SignedDuration::from_hours(24 * 365);
const SERVING_LIFETIME: jiff::SignedDuration = jiff::SignedDuration::from_hours(24 * 90);

/// The names the serving certificate is for: the Service's DNS names, and the addresses
/// the API server calls it at when it calls by URL (the test bed: 127.0.0.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl Subject {
    /// The DNS names of Service `service` in `namespace`, plus `hosts` (names or addresses).
    pub fn new(service: Option<&str>, namespace: &str, hosts: &[String]) -> Subject {
        let mut dns_names = Vec::new();
        if let Some(svc) = service {
            dns_names.extend([
                format!("{svc}.{namespace}.svc"),
                format!("{svc}.{namespace}.svc.cluster.local"),
            ]);
        }
        let mut ips = Vec::new();
        for host in hosts {
            match host.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => dns_names.push(host.clone()),
            }
        }
        Subject { dns_names, ips }
    }
}

/// What the Secret holds: PEM text.
#[derive(Clone, PartialEq, Eq)]
pub struct Stored {
    /// The CAs clients trust: the current one first, then the previous one while rolling.
    pub ca_bundle: String,
    pub ca_cert: String,
    pub ca_key: Zeroizing<String>,
    pub cert: String,
    pub key: Zeroizing<String>,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored").finish_non_exhaustive()
    }
}

impl Stored {
    fn from_secret(secret: &Secret) -> Option<Stored> {
        let data = secret.data.as_ref()?;
        let text = |k: &str| {
            data.get(k)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        Some(Stored {
            ca_bundle: text("ca.crt")?,
            ca_cert: text("ca-current.crt")?,
            ca_key: Zeroizing::new(text("ca.key")?),
            cert: text("tls.crt")?,
            key: Zeroizing::new(text("tls.key")?),
        })
    }

    fn to_data(&self) -> BTreeMap<String, ByteString> {
        let b = |s: &str| ByteString(s.as_bytes().to_vec());
        BTreeMap::from([
            ("ca.crt".into(), b(&self.ca_bundle)),
            ("ca-current.crt".into(), b(&self.ca_cert)),
            ("ca.key".into(), b(&self.ca_key)),
            ("tls.crt".into(), b(&self.cert)),
            ("tls.key".into(), b(&self.key)),
        ])
    }
}

/// What a certificate says about itself, as far as renewal cares.
#[derive(Debug)]
struct Seen {
    not_before: jiff::Timestamp,
    not_after: jiff::Timestamp,
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
}

fn seen(pem: &str) -> Option<Seen> {
    use x509_parser::extensions::GeneralName;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let ts = |t: x509_parser::time::ASN1Time| jiff::Timestamp::from_second(t.timestamp()).ok();
    let mut dns_names = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns_names.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?)),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?)),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Some(Seen {
        not_before: ts(cert.validity().not_before)?,
        not_after: ts(cert.validity().not_after)?,
        dns_names,
        ips,
    })
}

/// What to do with what the Secret holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    Keep,
    /// A new serving certificate from the current CA.
    Serving,
    /// A new CA (the old one stays in the bundle) and a serving certificate from it.
    Ca,
}

/// Decides renewal (pure): nothing or unreadable → a new CA; a CA with less than a year left
/// → a new CA; a serving certificate with a third of its life left, or for other names →
/// a new serving certificate.
pub fn renewal(stored: Option<&Stored>, subject: &Subject, now: jiff::Timestamp) -> Renewal {
    let Some(stored) = stored else {
        return Renewal::Ca;
    };
    let (Some(ca), Some(serving)) = (seen(&stored.ca_cert), seen(&stored.cert)) else {
        return Renewal::Ca;
    };
    if ca.not_after.duration_since(now) < CA_RENEW_BEFORE {
        return Renewal::Ca;
    }
    let life = serving.not_after.duration_since(serving.not_before);
    let left = serving.not_after.duration_since(now);
    let mut want_dns = subject.dns_names.clone();
    let mut have_dns = serving.dns_names.clone();
    want_dns.sort();
    have_dns.sort();
    let mut want_ips = subject.ips.clone();
    let mut have_ips = serving.ips.clone();
    want_ips.sort();
    have_ips.sort();
    if left * 3 < life || want_dns != have_dns || want_ips != have_ips {
        return Renewal::Serving;
    }
    Renewal::Keep
}

fn tls_err(e: rcgen::Error) -> Error {
    Error::config(
        crate::api::Reason::WebhookCertificateFailed,
        format!("webhook certificate: {e}"),
    )
}

fn offset(t: jiff::Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .unwrap_or(time::OffsetDateTime::now_utc())
}

/// Carries out `renewal` on `stored` (CPU work: run it on a blocking thread).
pub fn renew(
    stored: Option<&Stored>,
    renewal: &Renewal,
    subject: &Subject,
    now: jiff::Timestamp,
) -> Result<Stored> {
    let (ca_cert, ca_key, bundle) = match (renewal, stored) {
        (Renewal::Serving | Renewal::Keep, Some(s)) => {
            (s.ca_cert.clone(), s.ca_key.clone(), s.ca_bundle.clone())
        }
        _ => {
            let mut params = rcgen::CertificateParams::default();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "keyhaven webhook CA");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            params.not_before = offset(now - jiff::SignedDuration::from_hours(1));
            params.not_after = offset(now + CA_LIFETIME);
            let key = rcgen::KeyPair::generate().map_err(tls_err)?;
            let cert = params.self_signed(&key).map_err(tls_err)?.pem();
            // The previous CA stays trusted until everything it signed is replaced.
            let previous = stored
                .filter(|s| seen(&s.ca_cert).is_some_and(|c| c.not_after > now))
                .map(|s| s.ca_cert.clone())
                .unwrap_or_default();
            let bundle = format!("{cert}{previous}");
            (cert, Zeroizing::new(key.serialize_pem()), bundle)
        }
    };
    let ca_keypair = rcgen::KeyPair::from_pem(&ca_key).map_err(tls_err)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert, ca_keypair).map_err(tls_err)?;
    let mut params = rcgen::CertificateParams::new(subject.dns_names.clone()).map_err(tls_err)?;
    params
        .subject_alt_names
        .extend(subject.ips.iter().map(|ip| rcgen::SanType::IpAddress(*ip)));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keyhaven webhook");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = offset(now - jiff::SignedDuration::from_hours(1));
    params.not_after = offset(now + SERVING_LIFETIME);
    let key = rcgen::KeyPair::generate().map_err(tls_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(tls_err)?.pem();
    Ok(Stored {
        ca_bundle: bundle,
        ca_cert,
        ca_key,
        cert,
        key: Zeroizing::new(key.serialize_pem()),
    })
}

/// Reads the Secret, renews what is due (creating the Secret on first start; two replicas
/// racing: the loser reads the winner's), and returns what is in force.
pub async fn ensure(client: &Client, namespace: &str, subject: &Subject) -> Result<Stored> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let object = format!("Secret {namespace}/{TLS_SECRET}");
    let existing = api
        .get_opt(TLS_SECRET)
        .await
        .map_err(Error::kube(Verb::Read, object.clone()))?;
    let stored = existing.as_ref().and_then(Stored::from_secret);
    let now = jiff::Timestamp::now();
    let due = renewal(stored.as_ref(), subject, now);
    if due == Renewal::Keep {
        return Ok(stored.expect("Keep means a stored certificate"));
    }
    let (s, subj) = (stored.clone(), subject.clone());
    let renewed = tokio::task::spawn_blocking(move || renew(s.as_ref(), &due, &subj, now))
        .await
        .map_err(|e| {
            Error::config(
                crate::api::Reason::WebhookCertificateFailed,
                format!("webhook certificate: {e}"),
            )
        })??;
    let mut secret = existing.unwrap_or_else(|| Secret {
        metadata: ObjectMeta {
            name: Some(TLS_SECRET.into()),
            labels: Some(BTreeMap::from([(
                crate::labels::MANAGED_BY.into(),
                crate::labels::MANAGED_BY_VALUE.into(),
            )])),
            annotations: Some(BTreeMap::from([(
                crate::labels::DESCRIPTION_ANNOTATION.into(),
                "keyhaven's admission webhook CA and serving certificate; keyhaven renews them"
                    .into(),
            )])),
            ..Default::default()
        },
        ..Default::default()
    });
    secret.data = Some(renewed.to_data());
    let written = match secret.metadata.resource_version.is_some() {
        true => {
            api.replace(TLS_SECRET, &PostParams::default(), &secret)
                .await
        }
        false => api.create(&PostParams::default(), &secret).await,
    };
    match written {
        Ok(_) => {
            tracing::info!(secret = %object, "webhook certificate issued");
            Ok(renewed)
        }
        // Another replica renewed it first: use theirs.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let theirs = api
                .get(TLS_SECRET)
                .await
                .map_err(Error::kube(Verb::Read, object.clone()))?;
            Stored::from_secret(&theirs).ok_or_else(|| {
                Error::config(
                    crate::api::Reason::WebhookCertificateFailed,
                    format!("{object} is malformed"),
                )
            })
        }
        Err(e) => Err(Error::kube(Verb::Replace, object)(e)),
    }
}

/// The certificate someone else issues (cert-manager) into the Secret `name`: `tls.crt`,
/// `tls.key` and, if present, `ca.crt`. keyhaven only reads it (and reloads it when it
/// changes).
pub async fn external(client: &Client, namespace: &str, name: &str) -> Result<Stored> {
    let object = format!("Secret {namespace}/{name}");
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(Error::kube(Verb::Read, object.clone()))?;
    let data = secret.data.unwrap_or_default();
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    let missing = |k: &str| {
        Error::config(
            crate::api::Reason::WebhookCertificateFailed,
            format!("{object} has no {k}"),
        )
    };
    let ca = text("ca.crt").unwrap_or_default();
    Ok(Stored {
        ca_bundle: ca.clone(),
        ca_cert: ca,
        ca_key: Zeroizing::new(String::new()),
        cert: text("tls.crt").ok_or_else(|| missing("tls.crt"))?,
        key: Zeroizing::new(text("tls.key").ok_or_else(|| missing("tls.key"))?),
    })
}

/// Sets `caBundle` of every webhook of the configurations named `name` (validating and
/// mutating) to `bundle`; a configuration that does not exist is skipped.
pub async fn patch_ca_bundles(client: &Client, name: &str, bundle: &str) -> Result<()> {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(bundle);
    patch_bundle::<ValidatingWebhookConfiguration>(client, name, &encoded).await?;
    patch_bundle::<MutatingWebhookConfiguration>(client, name, &encoded).await
}

/// Sets `caBundle` (base64, as stored) of every webhook of the configuration `name` of kind
/// `K`, when one differs.
async fn patch_bundle<K>(client: &Client, name: &str, encoded: &str) -> Result<()>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object = format!("{} {name}", K::kind(&()));
    let api: Api<K> = Api::all(client.clone());
    let Some(config) = api
        .get_opt(name)
        .await
        .map_err(Error::kube(Verb::Read, object.clone()))?
    else {
        return Ok(());
    };
    let mut value = serde_json::to_value(&config).unwrap_or_default();
    let Some(hooks) = value.get_mut("webhooks").and_then(|w| w.as_array_mut()) else {
        return Ok(());
    };
    if hooks
        .iter()
        .all(|w| w["clientConfig"]["caBundle"] == encoded)
    {
        return Ok(());
    }
    for w in hooks.iter_mut() {
        w["clientConfig"]["caBundle"] = encoded.into();
    }
    let patch = serde_json::json!({"webhooks": hooks});
    api.patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .map_err(Error::kube(Verb::Patch, object))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> Subject {
        Subject::new(
            Some("keyhaven-webhook"),
            "keyhaven-system",
            &["127.0.0.1".into()],
        )
    }

    #[test]
    fn issues_a_ca_and_a_serving_certificate_and_renews_when_due() {
        let now = jiff::Timestamp::now();
        assert_eq!(renewal(None, &subject(), now), Renewal::Ca);
        let first = renew(None, &Renewal::Ca, &subject(), now).unwrap();
        assert_eq!(renewal(Some(&first), &subject(), now), Renewal::Keep);
        let served = seen(&first.cert).unwrap();
        assert!(
            served
                .dns_names
                .contains(&"keyhaven-webhook.keyhaven-system.svc".into())
        );
        assert_eq!(served.ips, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        // Two thirds of its life later: a new serving certificate from the same CA.
        let later = now + jiff::SignedDuration::from_hours(24 * 61);
        assert_eq!(renewal(Some(&first), &subject(), later), Renewal::Serving);
        let second = renew(Some(&first), &Renewal::Serving, &subject(), later).unwrap();
        assert_eq!(second.ca_cert, first.ca_cert);
        assert_ne!(second.cert, first.cert);
        // Other names: renewed at once.
        let moved = Subject::new(Some("other"), "keyhaven-system", &[]);
        assert_eq!(renewal(Some(&first), &moved, now), Renewal::Serving);
        // The CA's last year: a new CA, the old one still in the bundle.
        let old = now + jiff::SignedDuration::from_hours(24 * 3300);
        assert_eq!(renewal(Some(&first), &subject(), old), Renewal::Ca);
        let rolled = renew(Some(&first), &Renewal::Ca, &subject(), old).unwrap();
        assert_ne!(rolled.ca_cert, first.ca_cert);
        assert!(rolled.ca_bundle.starts_with(&rolled.ca_cert));
        assert!(rolled.ca_bundle.contains(&first.ca_cert));
        // Unreadable: start over.
        let broken = Stored {
            cert: "garbage".into(),
            ..first
        };
        assert_eq!(renewal(Some(&broken), &subject(), now), Renewal::Ca);
    }
}
