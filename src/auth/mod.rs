//! Who is calling and what they may touch.
//!
//! A credential is an opaque bearer token from a table that holds only SHA-256
//! hashes, or a JWT (HS256 shared secret, or RS256/ES256 keys from a JWKS
//! file). Either becomes a [`Caller`]: a name for logs and rate limits, the
//! namespace patterns it may touch and its rights there. Without any
//! credential source configured the server runs in development mode, where
//! every caller is [`Caller::anonymous`] (allowed only on loopback).

mod jwt;
mod peer;
mod tokens;

use std::fmt;
use std::sync::Arc;

use axum::http::HeaderValue;

pub use peer::{PeerKey, Signed, PEER_SIGNATURE};
pub use tokens::{hash_token, new_token, TokenTable};

use crate::config::AccessSettings;
use crate::limits::Rate;
use crate::model::validate_ns;

/// Secrets shorter than this are refused at start: they could be guessed offline.
const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    Read,
    Write,
    /// Server-wide operations: `/metrics`, `/v1/admin/*`, `/v1/analytics/*`, the Iceberg catalog.
    Admin,
    /// Reading the exported tables (`/v1/analytics/tables`, the Iceberg REST
    /// catalog): every table holds every namespace's rows, so it is granted
    /// only with namespaces `*`, like admin, and admin includes it.
    Analytics,
}

impl Right {
    fn bit(self) -> u8 {
        match self {
            Right::Read => 1,
            Right::Write => 2,
            Right::Admin => 4,
            Right::Analytics => 8,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Write => "write",
            Right::Admin => "admin",
            Right::Analytics => "analytics",
        }
    }
}

/// A set of rights, parsed from `read,write,admin`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rights(u8);

impl Rights {
    pub fn all() -> Rights {
        Rights(15)
    }

    /// Rights that span every namespace, so they are granted only with namespaces `*`.
    pub fn server_wide(self) -> bool {
        self.contains(Right::Admin) || self.contains(Right::Analytics)
    }

    pub fn contains(self, right: Right) -> bool {
        self.0 & right.bit() != 0
    }

    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Rights, String> {
        let mut rights = Rights::default();
        for name in names {
            let right = match name.trim() {
                "read" => Right::Read,
                "write" => Right::Write,
                "admin" => Right::Admin,
                "analytics" => Right::Analytics,
                other => return Err(format!("unknown right {other:?} (expected read, write, admin or analytics)")),
            };
            rights.0 |= right.bit();
        }
        if rights.0 == 0 {
            return Err("no rights given (expected read, write, admin or analytics)".into());
        }
        Ok(rights)
    }
}

/// `*`, one namespace, or a prefix ending in `*` (`payments.*` matches `payments.eu`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespacePattern {
    Any,
    Exact(String),
    Prefix(String),
}

impl NamespacePattern {
    pub fn parse(raw: &str) -> Result<NamespacePattern, String> {
        let raw = raw.trim();
        if raw == "*" {
            return Ok(NamespacePattern::Any);
        }
        if let Some(prefix) = raw.strip_suffix('*') {
            // A prefix is a namespace cut short: check it as one, with a stand-in last character.
            validate_ns(&format!("{prefix}x")).map_err(|_| format!("invalid namespace pattern {raw:?}"))?;
            return Ok(NamespacePattern::Prefix(prefix.to_string()));
        }
        validate_ns(raw).map_err(|_| format!("invalid namespace pattern {raw:?}"))?;
        Ok(NamespacePattern::Exact(raw.to_string()))
    }

    pub fn matches(&self, ns: &str) -> bool {
        match self {
            NamespacePattern::Any => true,
            NamespacePattern::Exact(exact) => exact == ns,
            NamespacePattern::Prefix(prefix) => ns.starts_with(prefix.as_str()),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name or the JWT's subject: for logs and rate limits, never a secret.
    pub name: String,
    namespaces: Vec<NamespacePattern>,
    rights: Rights,
    /// This caller's own rate limit, overriding the server's.
    pub rate: Option<Rate>,
}

impl Caller {
    pub fn new(name: String, namespaces: Vec<NamespacePattern>, rights: Rights, rate: Option<Rate>) -> Caller {
        Caller { name, namespaces, rights, rate }
    }

    /// Development mode: no credentials configured, everything allowed.
    pub fn anonymous() -> Caller {
        Caller::new("anonymous".into(), vec![NamespacePattern::Any], Rights::all(), None)
    }

    /// Whether this caller holds `right` on `ns` (admin and analytics are
    /// server-wide and count only when granted on every namespace; admin
    /// includes analytics).
    pub fn may(&self, right: Right, ns: Option<&str>) -> bool {
        let held = self.rights.contains(right) || (right == Right::Analytics && self.rights.contains(Right::Admin));
        if !held {
            return false;
        }
        match (right, ns) {
            (Right::Admin | Right::Analytics, _) => self.namespaces.contains(&NamespacePattern::Any),
            (_, Some(ns)) => self.namespaces.iter().any(|pattern| pattern.matches(ns)),
            (_, None) => false,
        }
    }
}

/// Why a request carries no usable credential (always a 401). The texts name
/// what is wrong, never the credential itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Malformed(&'static str),
    Unknown,
    Invalid(String),
}

impl AuthError {
    /// A metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::Unknown => "unknown_token",
            AuthError::Invalid(_) => "invalid_jwt",
        }
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Missing => f.write_str("this route needs an `Authorization: Bearer <token>` header"),
            AuthError::Malformed(what) => write!(f, "the Authorization header is malformed: {what}"),
            AuthError::Unknown => f.write_str("the bearer token is not known here"),
            AuthError::Invalid(why) => write!(f, "the JWT was refused: {why}"),
        }
    }
}

/// Every credential source this server accepts.
pub struct Authenticator {
    tokens: TokenTable,
    jwt: Option<jwt::JwtVerifier>,
}

impl Authenticator {
    /// The configured sources, or `None` for development mode. Errors name the setting.
    pub fn from_settings(settings: &AccessSettings) -> Result<Option<Authenticator>, String> {
        let mut tokens = TokenTable::default();
        if let Some(text) = &settings.auth_tokens {
            tokens.extend(TokenTable::parse(text.expose(), "STATEHOUSE_AUTH_TOKENS")?)?;
        }
        if let Some(path) = &settings.auth_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read STATEHOUSE_AUTH_FILE={}: {e}", path.display()))?;
            tokens.extend(TokenTable::parse(&text, &format!("STATEHOUSE_AUTH_FILE={}", path.display()))?)?;
        }
        let jwt = jwt::JwtVerifier::from_settings(settings)?;
        if tokens.is_empty() && jwt.is_none() {
            if settings.auth_tokens.is_some() || settings.auth_file.is_some() {
                return Err("STATEHOUSE_AUTH_TOKENS / STATEHOUSE_AUTH_FILE hold no token lines".into());
            }
            return Ok(None);
        }
        Ok(Some(Authenticator { tokens, jwt }))
    }

    /// The caller a request's credential names (shared: tokens are looked up, not copied, per request).
    pub fn authenticate(&self, authorization: Option<&HeaderValue>) -> Result<Arc<Caller>, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let text = header.to_str().map_err(|_| AuthError::Malformed("not visible ASCII"))?;
        let (scheme, credential) = text.split_once(' ').ok_or(AuthError::Malformed("expected `Bearer <token>`"))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed("only the Bearer scheme is accepted"));
        }
        let credential = credential.trim();
        if credential.is_empty() {
            return Err(AuthError::Malformed("the token is empty"));
        }
        if let Some(jwt) = &self.jwt {
            if credential.split('.').count() == 3 {
                return jwt.verify(credential).map(Arc::new);
            }
        }
        self.tokens.find(credential).cloned().ok_or(AuthError::Unknown)
    }
}

/// A secret from the environment, long enough to resist guessing.
fn long_secret(value: &str, variable: &str) -> Result<Vec<u8>, String> {
    if value.len() < MIN_SECRET_BYTES {
        return Err(format!("{variable} must be at least {MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)"));
    }
    Ok(value.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let prefix = NamespacePattern::parse("payments.*").unwrap();
        assert!(prefix.matches("payments.eu"));
        assert!(!prefix.matches("payments"));
        assert!(!prefix.matches("orders"));
        assert!(NamespacePattern::parse("*").unwrap().matches("anything"));
        assert!(NamespacePattern::parse("orders").unwrap().matches("orders"));
        assert!(!NamespacePattern::parse("orders").unwrap().matches("orders2"));
        for bad in ["", "Upper", "a b", "pay*ments", "**", ".x*"] {
            assert!(NamespacePattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rights_and_admin() {
        let reader = Caller::new(
            "r".into(),
            vec![NamespacePattern::parse("a.*").unwrap()],
            Rights::parse(["read"]).unwrap(),
            None,
        );
        assert!(reader.may(Right::Read, Some("a.x")));
        assert!(!reader.may(Right::Write, Some("a.x")));
        assert!(!reader.may(Right::Read, Some("b")));
        assert!(!reader.may(Right::Read, None));
        let scoped_admin = Caller::new(
            "s".into(),
            vec![NamespacePattern::parse("a.*").unwrap()],
            Rights::parse(["admin"]).unwrap(),
            None,
        );
        assert!(!scoped_admin.may(Right::Admin, None), "admin counts only on *");
        assert!(Caller::anonymous().may(Right::Admin, None));
        assert!(Rights::parse(["owner"]).is_err());
    }
}
