//! What a namespace, an object id and a key may be.

use std::fmt;

pub const MAX_ID_BYTES: usize = 256;
pub const MAX_KEY_BYTES: usize = 2048;
pub const MAX_NS_BYTES: usize = 63;

/// A client sent a name that is not allowed; the message says which rule it broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidName(pub String);

impl fmt::Display for InvalidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An object: its namespace and its id, both validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub ns: String,
    pub id: String,
}

impl ObjectRef {
    pub fn new(ns: &str, id: &str) -> Result<ObjectRef, InvalidName> {
        validate_ns(ns)?;
        validate_id(id)?;
        Ok(ObjectRef { ns: ns.to_string(), id: id.to_string() })
    }

    /// The object whose lease makes one replica of the cluster the only one
    /// doing `role` (the exporter, the blob sweeper): in `_system`, a
    /// namespace clients cannot name.
    pub fn singleton(role: &str) -> ObjectRef {
        ObjectRef { ns: "_system".into(), id: role.into() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ns, self.id)
    }
}

/// `[a-z0-9][a-z0-9._-]{0,62}`
pub fn validate_ns(ns: &str) -> Result<(), InvalidName> {
    let bytes = ns.as_bytes();
    let first_ok = bytes.first().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b));
    if first_ok && rest_ok && bytes.len() <= MAX_NS_BYTES {
        Ok(())
    } else {
        Err(InvalidName(format!(
            "invalid namespace {:?}: expected 1-{MAX_NS_BYTES} characters of [a-z0-9._-], starting with [a-z0-9]",
            truncate_for_message(ns)
        )))
    }
}

/// 1-256 URL-safe bytes: the unreserved characters of RFC 3986. `.` and `..`
/// are refused: ids become path segments in the object store.
pub fn validate_id(id: &str) -> Result<(), InvalidName> {
    let ok = !id.is_empty() && id.len() <= MAX_ID_BYTES && id != "." && id != ".." && id.bytes().all(is_id_byte);
    if ok {
        Ok(())
    } else {
        Err(InvalidName(format!(
            "invalid object id {:?}: expected 1-{MAX_ID_BYTES} characters of [A-Za-z0-9-._~], not `.` or `..`",
            truncate_for_message(id)
        )))
    }
}

/// Any UTF-8 string of 1-2048 bytes (it arrives percent-decoded).
pub fn validate_key(key: &str) -> Result<(), InvalidName> {
    if key.is_empty() {
        return Err(InvalidName("invalid key: it must not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(InvalidName(format!("invalid key: {} bytes, at most {MAX_KEY_BYTES} allowed", key.len())));
    }
    Ok(())
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// A prefix of some valid id: the same characters and length bound (`.` is a fine prefix).
pub fn validate_id_prefix(prefix: &str) -> Result<(), InvalidName> {
    if prefix.len() <= MAX_ID_BYTES && prefix.bytes().all(is_id_byte) {
        Ok(())
    } else {
        Err(InvalidName(format!("invalid id prefix: at most {MAX_ID_BYTES} characters of [A-Za-z0-9-._~]")))
    }
}

fn truncate_for_message(s: &str) -> String {
    if s.len() <= 80 {
        return s.to_string();
    }
    let mut end = 80;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        for ok in ["a", "payments.do", "0-x_y", &"a".repeat(63)] {
            assert!(validate_ns(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", ".a", "-a", "a/b", "a b", &"a".repeat(64), "é"] {
            assert!(validate_ns(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_and_keys() {
        assert!(validate_id("user-42_x.y~z").is_ok());
        assert!(validate_id(&"i".repeat(256)).is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "é", &"i".repeat(257)] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
        assert!(validate_key("any/thing ünïcode").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key(&"k".repeat(2049)).is_err());
    }
}
