//! JWTs from an identity provider: HS256 with a shared secret, RS256/ES256
//! with the keys of a JWKS file. The grants are in the `statehouse` claim:
//! `{"statehouse": {"namespaces": ["payments.*"], "rights": ["read", "write"]}}`.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{long_secret, AuthError, Caller, NamespacePattern, Rights};
use crate::config::AccessSettings;

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    /// (kid, algorithm, key) of every usable JWKS key.
    jwks: Vec<(Option<String>, Algorithm, DecodingKey)>,
    audience: String,
    issuer: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    statehouse: Option<Scope>,
}

#[derive(Deserialize)]
struct Scope {
    namespaces: Vec<String>,
    rights: Vec<String>,
}

impl JwtVerifier {
    pub fn from_settings(settings: &AccessSettings) -> Result<Option<JwtVerifier>, String> {
        let hs256 = match &settings.jwt_hs256_secret {
            Some(secret) => {
                Some(DecodingKey::from_secret(&long_secret(secret.expose(), "STATEHOUSE_JWT_HS256_SECRET")?))
            }
            None => None,
        };
        let jwks = match &settings.jwt_jwks_file {
            Some(path) => read_jwks(path)?,
            None => Vec::new(),
        };
        if hs256.is_none() && jwks.is_empty() {
            if settings.jwt_audience.is_some() || settings.jwt_issuer.is_some() {
                return Err("STATEHOUSE_JWT_AUDIENCE / STATEHOUSE_JWT_ISSUER are set but no JWT key is: set \
                            STATEHOUSE_JWT_HS256_SECRET or STATEHOUSE_JWT_JWKS_FILE"
                    .into());
            }
            return Ok(None);
        }
        // Without both, a token minted by the same provider for another service would work here.
        let (Some(audience), Some(issuer)) = (&settings.jwt_audience, &settings.jwt_issuer) else {
            return Err(
                "JWTs are accepted, so STATEHOUSE_JWT_AUDIENCE and STATEHOUSE_JWT_ISSUER must both be set".into()
            );
        };
        Ok(Some(JwtVerifier { hs256, jwks, audience: audience.clone(), issuer: issuer.clone() }))
    }

    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed("not a JWT"))?;
        // The key is chosen by the algorithm, and each key serves one algorithm:
        // an HS256 token can never be checked against a public key used as a secret.
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 | Algorithm::ES256 => {
                let mut candidates = self.jwks.iter().filter(|(_, alg, _)| *alg == header.alg);
                match &header.kid {
                    Some(kid) => candidates.find(|(k, _, _)| k.as_deref() == Some(kid)).map(|(_, _, key)| key),
                    None => match (candidates.next(), candidates.next()) {
                        (Some((_, _, key)), None) => Some(key),
                        _ => None,
                    },
                }
            }
            _ => return Err(AuthError::Invalid(format!("algorithm {:?} is not accepted", header.alg))),
        }
        .ok_or_else(|| AuthError::Invalid(format!("no {:?} key here matches the token's kid", header.alg)))?;

        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| AuthError::Invalid(describe(e.kind())))?
            .claims;

        let name = format!("jwt:{}", claims.sub.as_deref().unwrap_or("-"));
        // A valid token without grants authenticates but may do nothing (403s).
        let Some(scope) = claims.statehouse else {
            return Ok(Caller::new(name, Vec::new(), Rights::default(), None));
        };
        let namespaces = scope
            .namespaces
            .iter()
            .map(|p| NamespacePattern::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AuthError::Invalid(format!("the statehouse claim has an {e}")))?;
        let rights = Rights::parse(scope.rights.iter().map(String::as_str))
            .map_err(|e| AuthError::Invalid(format!("the statehouse claim: {e}")))?;
        Ok(Caller::new(name, namespaces, rights, None))
    }
}

/// Why validation failed, without quoting the token.
fn describe(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind::*;
    match kind {
        ExpiredSignature => "it has expired".into(),
        ImmatureSignature => "it is not valid yet (nbf)".into(),
        InvalidAudience => "its aud is not this service".into(),
        InvalidIssuer => "its iss is not the configured issuer".into(),
        InvalidSignature => "its signature does not verify".into(),
        MissingRequiredClaim(claim) => format!("it has no {claim} claim"),
        InvalidAlgorithm => "its algorithm does not match the key".into(),
        Json(_) => "its claims are not the expected JSON (statehouse: {namespaces, rights})".into(),
        _ => "it is malformed".into(),
    }
}

/// The RSA and P-256 keys of a JWKS file; others are skipped with a warning.
fn read_jwks(path: &std::path::Path) -> Result<Vec<(Option<String>, Algorithm, DecodingKey)>, String> {
    let place = format!("STATEHOUSE_JWT_JWKS_FILE={}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {place}: {e}"))?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| format!("{place} is not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone();
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => Algorithm::ES256,
            _ => {
                tracing::warn!(kid = ?kid, "skipping a JWKS key that is neither RSA nor P-256");
                continue;
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{place}: key {kid:?} is unusable: {e}"))?;
        keys.push((kid, algorithm, key));
    }
    if keys.is_empty() {
        return Err(format!("{place} has no RSA or P-256 key"));
    }
    Ok(keys)
}
