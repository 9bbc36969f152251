//! Replica-to-replica trust. A forwarded write carries an HMAC-SHA256 of what
//! it asks for (method, path, forwarder, time, the caller's credential, body)
//! under the shared `STATEHOUSE_PEER_SECRET`, so the secret never travels, and
//! a signature cannot be lifted onto another request or replayed after a minute.
//! The owner still authenticates the caller's own credential: a forwarded
//! request acts with the caller's identity, never the forwarder's.

use axum::http::{HeaderName, HeaderValue, Method};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::long_secret;

pub const PEER_SIGNATURE: HeaderName = HeaderName::from_static("statehouse-peer-signature");

/// How far a signature's time may be from ours (clock skew plus travel).
const MAX_SKEW_MS: i64 = 60_000;

/// What a signature covers.
pub struct Signed<'a> {
    pub method: &'a Method,
    pub path_and_query: &'a str,
    pub forwarded_by: &'a str,
    pub authorization: Option<&'a [u8]>,
    pub body: &'a [u8],
}

#[derive(Clone)]
pub struct PeerKey(Vec<u8>);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(<redacted>)")
    }
}

impl PeerKey {
    pub fn from_secret(secret: &str) -> Result<PeerKey, String> {
        Ok(PeerKey(long_secret(secret, "STATEHOUSE_PEER_SECRET")?))
    }

    /// The `statehouse-peer-signature` value: `t=<unix ms>,v1=<hex HMAC>`.
    pub fn sign(&self, request: &Signed<'_>, now_ms: i64) -> HeaderValue {
        let mac = self.mac(request, now_ms).finalize().into_bytes();
        HeaderValue::from_str(&format!("t={now_ms},v1={}", hex::encode(mac))).expect("digits and hex are header-safe")
    }

    /// Checks a signature in constant time; the error says what is wrong.
    pub fn verify(
        &self,
        signature: Option<&HeaderValue>,
        request: &Signed<'_>,
        now_ms: i64,
    ) -> Result<(), &'static str> {
        let text =
            signature.ok_or("it carries no peer signature")?.to_str().map_err(|_| "its signature is not ASCII")?;
        let (t, v1) = text
            .split_once(',')
            .and_then(|(t, v1)| Some((t.strip_prefix("t=")?.parse::<i64>().ok()?, v1.strip_prefix("v1=")?)))
            .ok_or("its signature is malformed")?;
        if (now_ms - t).abs() > MAX_SKEW_MS {
            return Err("its signature is too old or from the future (are the replicas' clocks in sync?)");
        }
        let expected = hex::decode(v1).map_err(|_| "its signature is malformed")?;
        self.mac(request, t).verify_slice(&expected).map_err(|_| "its signature does not verify")
    }

    fn mac(&self, request: &Signed<'_>, t: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        let authorization = Sha256::digest(request.authorization.unwrap_or_default());
        let body = Sha256::digest(request.body);
        // Fixed-size digests and newline-free fields keep the encoding unambiguous.
        mac.update(
            format!(
                "statehouse-peer-v1\n{}\n{}\n{}\n{t}\n{}\n{}",
                request.method,
                request.path_and_query,
                request.forwarded_by,
                hex::encode(authorization),
                hex::encode(body)
            )
            .as_bytes(),
        );
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_the_request_and_expire() {
        let key = PeerKey::from_secret(&"s".repeat(32)).unwrap();
        let request = Signed {
            method: &Method::PUT,
            path_and_query: "/v1/objects/a/o/kv/k",
            forwarded_by: "replica-1",
            authorization: Some(b"Bearer x"),
            body: b"value",
        };
        let signature = key.sign(&request, 1_000_000);
        assert_eq!(key.verify(Some(&signature), &request, 1_030_000), Ok(()));
        assert!(key.verify(Some(&signature), &request, 1_070_000).is_err(), "expired");
        let other_body = Signed { body: b"other", ..request };
        assert!(key.verify(Some(&signature), &other_body, 1_000_000).is_err());
        let other_caller = Signed { authorization: Some(b"Bearer y"), ..other_body };
        let resigned = key.sign(&other_caller, 1_000_000);
        let other_key = PeerKey::from_secret(&"t".repeat(32)).unwrap();
        assert!(other_key.verify(Some(&resigned), &other_caller, 1_000_000).is_err());
        assert!(key.verify(None, &other_caller, 1_000_000).is_err());
        assert!(PeerKey::from_secret("short").is_err());
    }
}
