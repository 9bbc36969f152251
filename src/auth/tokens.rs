//! Opaque bearer tokens. The configuration holds only their SHA-256 hashes, so
//! a leaked configuration (env dump, mounted secret, `--dump-config`) grants
//! nothing; a presented token is hashed and compared in constant time.

use std::sync::Arc;

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Caller, NamespacePattern, Rights};
use crate::limits::Rate;

/// Prefix of the tokens `statehouse token` makes: recognisable in secret scanners.
const TOKEN_PREFIX: &str = "sh_";

#[derive(Default)]
pub struct TokenTable {
    entries: Vec<([u8; 32], Arc<Caller>)>,
}

/// A fresh random token (256 bits).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    format!("{TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The `sha256:<hex>` form a token is configured by.
pub fn hash_token(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

impl TokenTable {
    /// Parses token lines (newline- or `;`-separated; `#` starts a comment):
    /// `<name> sha256:<hex> <namespaces> <rights> [rate=<per-sec>[/<burst>]]`.
    /// Errors say where (`source`, line) and what, never echoing a hash.
    pub fn parse(text: &str, source: &str) -> Result<TokenTable, String> {
        let mut table = TokenTable::default();
        for (index, line) in text.split(['\n', ';']).enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let entry = parse_line(line).map_err(|e| format!("{source}, entry {}: {e}", index + 1))?;
            table.extend(TokenTable { entries: vec![entry] }).map_err(|e| format!("{source}: {e}"))?;
        }
        Ok(table)
    }

    /// Adds `other`'s tokens; a name or a hash configured twice is an error.
    pub fn extend(&mut self, other: TokenTable) -> Result<(), String> {
        for (hash, caller) in other.entries {
            if self.entries.iter().any(|(h, c)| *h == hash || c.name == caller.name) {
                return Err(format!("token {:?} is configured twice (same name or same hash)", caller.name));
            }
            self.entries.push((hash, caller));
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The caller a presented token belongs to. Every entry is compared, and
    /// without branching on the bytes, so timing reveals nothing about the hashes.
    pub fn find(&self, token: &str) -> Option<&Arc<Caller>> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (hash, caller) in &self.entries {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(caller);
            }
        }
        found
    }
}

fn parse_line(line: &str) -> Result<([u8; 32], Arc<Caller>), String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [name, hash, namespaces, rights, rest @ ..] = fields.as_slice() else {
        return Err("expected `<name> sha256:<hex> <namespaces> <rights> [rate=<per-sec>[/<burst>]]`".into());
    };
    let name_ok = name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !name_ok {
        return Err("a token name is 1-64 characters of [A-Za-z0-9._-]".into());
    }
    let hash = parse_hash(hash).ok_or_else(|| {
        format!("token {name:?}: the second field must be sha256:<64 hex digits> (`statehouse token` prints it)")
    })?;
    let namespaces =
        namespaces.split(',').map(NamespacePattern::parse).collect::<Result<Vec<_>, _>>().map_err(prefixed(name))?;
    let rights = Rights::parse(rights.split(',')).map_err(prefixed(name))?;
    if rights.server_wide() && !namespaces.contains(&NamespacePattern::Any) {
        return Err(format!("token {name:?}: admin and analytics are server-wide; grant them with namespaces *"));
    }
    let rate = match rest {
        [] => None,
        [rate] => Some(parse_rate(rate).map_err(prefixed(name))?),
        _ => return Err(format!("token {name:?}: unexpected fields after the rights")),
    };
    Ok((hash, Arc::new(Caller::new(name.to_string(), namespaces, rights, rate))))
}

fn prefixed(name: &str) -> impl Fn(String) -> String + '_ {
    move |e| format!("token {name:?}: {e}")
}

fn parse_hash(field: &str) -> Option<[u8; 32]> {
    let hex_digits = field.strip_prefix("sha256:")?;
    hex::decode(hex_digits).ok()?.try_into().ok()
}

/// `rate=<per-sec>` or `rate=<per-sec>/<burst>`.
fn parse_rate(field: &str) -> Result<Rate, String> {
    let spec = field.strip_prefix("rate=").ok_or("the fifth field must be rate=<per-sec>[/<burst>]")?;
    let (per_sec, burst) = spec.split_once('/').unwrap_or((spec, "0"));
    let number = |s: &str| s.parse::<u64>().map_err(|_| format!("rate must be whole numbers, got {spec:?}"));
    let per_sec = number(per_sec)?;
    if per_sec == 0 {
        return Err("rate must be at least 1 request per second".into());
    }
    Ok(Rate::new(per_sec, number(burst)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Right;

    #[test]
    fn lines_hashes_and_lookup() {
        let token = new_token();
        assert!(token.starts_with("sh_") && token.len() == 46);
        let text = format!(
            "# comment\nalice {} payments.*,orders read,write rate=5/10\n; ops {} * admin",
            hash_token(&token),
            hash_token("other")
        );
        let table = TokenTable::parse(&text, "test").unwrap();
        let alice = table.find(&token).unwrap();
        assert_eq!(alice.name, "alice");
        assert!(alice.may(Right::Write, Some("payments.eu")));
        assert!(!alice.may(Right::Write, Some("billing")));
        assert_eq!(alice.rate, Some(Rate::new(5, 10)));
        assert_eq!(table.find("other").unwrap().name, "ops");
        assert!(table.find("nope").is_none());
        assert!(table.find(&hash_token(&token)).is_none(), "the hash itself is not a credential");
    }

    #[test]
    fn bad_lines_are_named() {
        let hash = hash_token("t");
        for (line, expected) in [
            ("alice", "expected"),
            ("alice plain-token * read", "sha256"),
            (&format!("alice {hash} * fly") as &str, "unknown right"),
            (&format!("alice {hash} Bad read"), "namespace pattern"),
            (&format!("alice {hash} a.* admin"), "server-wide"),
            (&format!("alice {hash} * read rate=0"), "at least 1"),
            (&format!("a!ice {hash} * read"), "token name"),
        ] {
            let err = TokenTable::parse(line, "X").err().unwrap_or_else(|| panic!("{line} parsed"));
            assert!(err.contains(expected) && err.starts_with("X, entry 1"), "{err}");
            assert!(!err.contains(&hash[7..]), "errors never echo a hash: {err}");
        }
        let twice = format!("a {hash} * read; b {hash} * read");
        assert!(TokenTable::parse(&twice, "X").err().unwrap().contains("twice"));
    }
}
