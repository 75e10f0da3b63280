//! How a vault store reaches its server: over `https://`, or over plaintext `http://` only
//! when the store says so (`insecureHTTP`); through an HTTP client built here, with the
//! store's CA bundle added in memory (never written to a file) and TLS verification on.

use super::error_chain;
use crate::api::VaultProvider;
use std::time::Duration;

/// Whether the store may use its server: `https://` always; `http://` only with
/// `insecureHTTP`. The refusal says what to do; the caller names the store.
pub(super) fn check_scheme(spec: &VaultProvider) -> Result<(), String> {
    let server = spec.server.trim();
    if spec.is_plaintext() {
        return if spec.insecure_http {
            Ok(())
        } else {
            Err(format!(
                "server {server} is plaintext http://, which would send the token and every \
                 secret value unencrypted: use https://, or set provider.vault.insecureHTTP: \
                 true to accept plaintext (a development server on loopback only)"
            ))
        };
    }
    let https = server
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
    if https {
        Ok(())
    } else {
        Err(format!("server {server} is not an https:// address"))
    }
}

/// A CA bundle: what it is (for messages) and its PEM text.
pub(super) struct CaBundle {
    pub what: String,
    pub pem: Vec<u8>,
}

/// The HTTP client of a store: rustls, verifying the server's certificate against the
/// system's roots and, when given, the CA bundle's certificates (parsed in memory);
/// `https://` only unless the server is `http://` (then no TLS is set up: vaultrs does the
/// same, reqwest#2988). Every request is bounded by `timeout`.
pub(super) fn http_client(
    server: &str,
    timeout: Duration,
    ca: Option<&CaBundle>,
) -> Result<reqwest::Client, String> {
    let plaintext = server
        .trim()
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"));
    let mut builder = reqwest::Client::builder()
        .tls_backend_rustls()
        .tls_danger_accept_invalid_certs(false)
        .timeout(timeout);
    if plaintext {
        builder = builder.tls_certs_only(Vec::new());
    } else {
        builder = builder.https_only(true);
        if let Some(ca) = ca {
            builder = builder.tls_certs_merge(ca_certificates(ca)?);
        }
    }
    builder
        .build()
        .map_err(|e| format!("HTTP client: {}", error_chain(&e)))
}

/// The certificates of a CA bundle; an error when it holds none.
fn ca_certificates(ca: &CaBundle) -> Result<Vec<reqwest::Certificate>, String> {
    let certs = reqwest::Certificate::from_pem_bundle(&ca.pem)
        .map_err(|e| format!("{}: not a PEM bundle: {}", ca.what, error_chain(&e)))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no PEM certificate", ca.what));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(server: &str, insecure_http: bool) -> VaultProvider {
        let mut v = serde_json::json!({"server": server, "auth": {"kubernetes": {"role": "r"}}});
        if insecure_http {
            v["insecureHTTP"] = true.into();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn https_is_required_unless_the_store_allows_plaintext() {
        assert!(check_scheme(&provider("https://vault:8200", false)).is_ok());
        assert!(check_scheme(&provider("HTTPS://vault:8200", false)).is_ok());
        for server in ["http://127.0.0.1:8200", "HTTP://vault"] {
            let refused = check_scheme(&provider(server, false)).unwrap_err();
            assert!(
                refused.starts_with(&format!("server {server} is plaintext http://")),
                "{refused}"
            );
            assert!(refused.contains("use https://"), "{refused}");
            assert!(
                refused.contains("provider.vault.insecureHTTP: true"),
                "{refused}"
            );
            assert!(check_scheme(&provider(server, true)).is_ok());
        }
        assert!(check_scheme(&provider("ftp://vault", true)).is_err());
    }

    #[test]
    fn insecure_http_is_only_serialized_when_set() {
        let json = serde_json::to_value(provider("https://vault", false)).unwrap();
        assert!(json.get("insecureHTTP").is_none(), "{json}");
        let json = serde_json::to_value(provider("http://vault", true)).unwrap();
        assert_eq!(json["insecureHTTP"], true);
    }

    /// A self-signed CA, as PEM.
    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["vault".into()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_ca_bundle_is_parsed_in_memory_and_must_hold_a_certificate() {
        crate::install_crypto_provider();
        let bundle = |pem: &str| CaBundle {
            what: "CA bundle ConfigMap op/ca key ca.crt".into(),
            pem: pem.as_bytes().to_vec(),
        };
        let two = format!("{}{}", ca_pem(), ca_pem());
        assert_eq!(ca_certificates(&bundle(&two)).unwrap().len(), 2);
        let timeout = Duration::from_secs(5);
        assert!(http_client("https://vault:8200", timeout, Some(&bundle(&two))).is_ok());
        assert!(http_client("https://vault:8200", timeout, None).is_ok());
        assert!(http_client("http://127.0.0.1:8200", timeout, None).is_ok());
        for bad in ["", "not a certificate"] {
            let refused =
                http_client("https://vault:8200", timeout, Some(&bundle(bad))).unwrap_err();
            assert!(
                refused.starts_with("CA bundle ConfigMap op/ca key ca.crt: "),
                "{refused}"
            );
        }
    }

    #[tokio::test]
    async fn an_https_client_refuses_plaintext_urls() {
        crate::install_crypto_provider();
        let client = http_client("https://vault:8200", Duration::from_secs(5), None).unwrap();
        let refused = client.get("http://127.0.0.1:1/v1/sys/health").send().await;
        assert!(refused.is_err_and(|e| e.is_builder()));
    }
}
