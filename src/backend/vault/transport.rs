//! How a vault store reaches its server: over `https://`, or over plaintext `http://` only
//! when the store says so (`insecureHTTP`).

use crate::api::VaultProvider;

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
}
