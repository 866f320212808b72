//! Credentials, read the way each ecosystem does it, and never printed.
//!
//! s3: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`); when absent,
//! OpenDAL's own chain (profile files, IMDS, web identity) still applies.
//! oss: `ALIBABA_CLOUD_ACCESS_KEY_ID` / `ALIBABA_CLOUD_ACCESS_KEY_SECRET`
//! (+ `ALIBABA_CLOUD_SECURITY_TOKEN`), or RRSA (`ALIBABA_CLOUD_ROLE_ARN`,
//! `ALIBABA_CLOUD_OIDC_PROVIDER_ARN`, `ALIBABA_CLOUD_OIDC_TOKEN_FILE`).
//! This module owns the secret values; `Debug` shows only which ones are present.

use std::fmt;

use super::Scheme;

/// A secret string whose `Debug`/`Display` never reveal it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The only way to see the value: at the call that hands it to the signer.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// RRSA: exchange a Kubernetes service-account token for STS credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rrsa {
    pub role_arn: String,
    pub oidc_provider_arn: String,
    pub oidc_token_file: String,
}

/// What a store is signed with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    pub rrsa: Option<Rrsa>,
}

impl Credentials {
    /// Whether the static keys (id, secret, session token) are the same. RRSA settings are
    /// not compared: a role is a volume attribute, and its token is refreshed by itself.
    pub fn same_keys(&self, other: &Credentials) -> bool {
        let eq = |a: &Option<Secret>, b: &Option<Secret>| {
            a.as_ref().map(Secret::expose) == b.as_ref().map(Secret::expose)
        };
        eq(&self.access_key_id, &other.access_key_id)
            && eq(&self.secret_access_key, &other.secret_access_key)
            && eq(&self.session_token, &other.session_token)
    }

    /// Reads the environment variables of the scheme's ecosystem.
    pub fn from_env(scheme: Scheme) -> Self {
        Self::from_lookup(scheme, |k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Same as [`from_env`](Self::from_env) over any lookup (tests, CSI secrets).
    pub fn from_lookup(scheme: Scheme, get: impl Fn(&str) -> Option<String>) -> Self {
        let secret = |k: &str| get(k).map(Secret);
        match scheme {
            Scheme::S3 => Credentials {
                access_key_id: secret("AWS_ACCESS_KEY_ID"),
                secret_access_key: secret("AWS_SECRET_ACCESS_KEY"),
                session_token: secret("AWS_SESSION_TOKEN"),
                rrsa: None,
            },
            Scheme::Oss => {
                let rrsa = match (
                    get("ALIBABA_CLOUD_ROLE_ARN"),
                    get("ALIBABA_CLOUD_OIDC_PROVIDER_ARN"),
                    get("ALIBABA_CLOUD_OIDC_TOKEN_FILE"),
                ) {
                    (Some(role_arn), Some(oidc_provider_arn), Some(oidc_token_file)) => {
                        Some(Rrsa {
                            role_arn,
                            oidc_provider_arn,
                            oidc_token_file,
                        })
                    }
                    _ => None,
                };
                Credentials {
                    access_key_id: secret("ALIBABA_CLOUD_ACCESS_KEY_ID"),
                    secret_access_key: secret("ALIBABA_CLOUD_ACCESS_KEY_SECRET"),
                    session_token: secret("ALIBABA_CLOUD_SECURITY_TOKEN"),
                    rrsa,
                }
            }
            Scheme::File => Credentials::default(),
        }
    }

    /// A short, secret-free description for logs: "static key", "RRSA role ...", "default chain".
    pub fn describe(&self) -> String {
        match (&self.access_key_id, &self.rrsa) {
            (Some(_), _) => "static access key".to_string(),
            (None, Some(r)) => format!("RRSA role {}", r.role_arn),
            (None, None) => "default credential chain".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn debug_never_shows_secrets() {
        let env: HashMap<&str, &str> = [
            ("ALIBABA_CLOUD_ACCESS_KEY_ID", "LTAIsecretid"),
            ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "verysecret"),
        ]
        .into();
        let c = Credentials::from_lookup(Scheme::Oss, |k| env.get(k).map(|v| v.to_string()));
        let shown = format!("{c:?} {}", c.describe());
        assert!(
            !shown.contains("LTAIsecretid") && !shown.contains("verysecret"),
            "{shown}"
        );
        assert_eq!(c.secret_access_key.unwrap().expose(), "verysecret");
    }

    #[test]
    fn rrsa_needs_all_three_variables() {
        let env: HashMap<&str, &str> = [
            ("ALIBABA_CLOUD_ROLE_ARN", "acs:ram::1:role/r"),
            (
                "ALIBABA_CLOUD_OIDC_PROVIDER_ARN",
                "acs:ram::1:oidc-provider/p",
            ),
        ]
        .into();
        let get = |k: &str| env.get(k).map(|v| v.to_string());
        assert!(Credentials::from_lookup(Scheme::Oss, get).rrsa.is_none());
        let mut env = env.clone();
        env.insert("ALIBABA_CLOUD_OIDC_TOKEN_FILE", "/var/run/token");
        let c = Credentials::from_lookup(Scheme::Oss, |k| env.get(k).map(|v| v.to_string()));
        assert_eq!(c.rrsa.unwrap().oidc_token_file, "/var/run/token");
    }
}
