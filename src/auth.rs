//! Bearer-token auth: which tenant a request acts for.
//!
//! The config holds only each token's SHA-256, so a leaked config file leaks no token. A
//! presented token is hashed and compared with every configured digest in constant time, so
//! neither the comparison nor its position in the list tells an attacker how close a guess
//! was. Tokens are never logged. With no tokens configured, auth is off and every request acts
//! for the default tenant.

use crate::config::AuthConfig;
use crate::store::DEFAULT_TENANT;
use base64::Engine;
use sha2::{Digest, Sha256};

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header.
    Missing,
    /// An `Authorization` header that is not `Bearer TOKEN`.
    Malformed,
    /// More than one `Authorization` header: which one counts would be a guess.
    Several,
    /// A token that matches no configured digest.
    Unknown,
}

impl AuthError {
    /// A message a person can act on.
    pub fn message(self) -> &'static str {
        match self {
            AuthError::Missing => "this server needs `Authorization: Bearer TOKEN`",
            AuthError::Malformed => "the Authorization header must be `Bearer TOKEN`",
            AuthError::Several => "send one Authorization header, not several",
            AuthError::Unknown => "the bearer token is not valid",
        }
    }
}

/// The configured tokens.
pub struct Auth {
    tenants: Vec<([u8; 32], String)>,
}

impl Auth {
    /// From the `[auth]` section, already validated.
    pub fn new(config: &AuthConfig) -> Auth {
        let tenants = config
            .tokens
            .iter()
            .filter_map(|entry| Some((from_hex(&entry.sha256)?, entry.tenant.clone())))
            .collect();
        Auth { tenants }
    }

    /// Whether tokens are required.
    pub fn is_on(&self) -> bool {
        !self.tenants.is_empty()
    }

    /// The tenant the request acts for, given its `Authorization` headers (there must be one).
    pub fn tenant(&self, authorization: &[&str]) -> Result<&str, AuthError> {
        if !self.is_on() {
            return Ok(DEFAULT_TENANT);
        }
        let header = match authorization {
            [] => return Err(AuthError::Missing),
            [one] => one,
            _ => return Err(AuthError::Several),
        };
        let token = bearer_token(header).ok_or(AuthError::Malformed)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (expected, tenant) in &self.tenants {
            if constant_time_eq(&digest, expected) {
                found = Some(tenant.as_str());
            }
        }
        found.ok_or(AuthError::Unknown)
    }
}

/// The token of `Bearer TOKEN`: the scheme in any case, then spaces or tabs (RFC 9110).
fn bearer_token(header: &str) -> Option<&str> {
    let blank = |c: char| c == ' ' || c == '\t';
    let (scheme, token) = header.trim_matches(blank).split_once(blank)?;
    let token = token.trim_start_matches(blank);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(blank))
        .then_some(token)
}

/// Equality of two digests in time independent of where they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

fn from_hex(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Lowercase hex of a token's SHA-256, as `[auth] tokens` holds it.
pub fn digest_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new token: 256 bits from the OS's random source, URL-safe base64 behind a `cp_` prefix
/// that makes it easy to recognise (and to find in a leak scanner).
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(format!(
        "cp_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenEntry;

    fn auth_with(token: &str, tenant: &str) -> Auth {
        let entry = TokenEntry {
            tenant: tenant.into(),
            sha256: digest_hex(token),
        };
        Auth::new(&AuthConfig {
            tokens: vec![entry],
        })
    }

    #[test]
    fn off_means_the_default_tenant() {
        let auth = Auth::new(&AuthConfig::default());
        assert!(!auth.is_on());
        assert_eq!(auth.tenant(&[]), Ok(DEFAULT_TENANT));
    }

    #[test]
    fn on_maps_a_token_to_its_tenant_and_refuses_the_rest() {
        let auth = auth_with("secret-1", "alice");
        assert_eq!(auth.tenant(&["Bearer secret-1"]), Ok("alice"));
        assert_eq!(auth.tenant(&[]), Err(AuthError::Missing));
        assert_eq!(auth.tenant(&["Basic c2VjcmV0"]), Err(AuthError::Malformed));
        assert_eq!(auth.tenant(&["Bearer "]), Err(AuthError::Malformed));
        assert_eq!(auth.tenant(&["Bearer secret-2"]), Err(AuthError::Unknown));
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_blanks_may_be_tabs() {
        let auth = auth_with("secret-1", "alice");
        for header in ["BEARER secret-1", "bearer\tsecret-1", "Bearer \t secret-1 "] {
            assert_eq!(auth.tenant(&[header]), Ok("alice"), "{header:?}");
        }
        for header in ["Bearersecret-1", "Bearer secret-1 extra", "Bear secret-1"] {
            assert_eq!(
                auth.tenant(&[header]),
                Err(AuthError::Malformed),
                "{header:?}"
            );
        }
    }

    #[test]
    fn two_authorization_headers_are_refused() {
        let auth = auth_with("secret-1", "alice");
        assert_eq!(
            auth.tenant(&["Bearer secret-1", "Bearer other"]),
            Err(AuthError::Several)
        );
        assert_eq!(
            auth.tenant(&["Bearer other", "Bearer secret-1"]),
            Err(AuthError::Several)
        );
    }

    #[test]
    fn new_tokens_are_long_random_and_url_safe() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + 43);
        assert!(a[3..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(
            digest_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(from_hex(&digest_hex("abc")).map(|d| d[0]), Some(0xba));
    }
}
