//! How stored bytes appear inside JSON responses, and list cursors.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;

/// `application/json`, `application/problem+json`, `text/json`, ... with any parameters.
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

pub struct EmbeddedValue {
    pub value: serde_json::Value,
    /// `Some("base64")` when the value is not UTF-8 text.
    pub encoding: Option<&'static str>,
}

/// JSON values are embedded as JSON, UTF-8 text as a string, anything else as base64.
pub fn embed_value(bytes: &[u8], content_type: &str) -> EmbeddedValue {
    if is_json_content_type(content_type) {
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) {
            return EmbeddedValue { value, encoding: None };
        }
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => EmbeddedValue { value: serde_json::Value::String(text.to_string()), encoding: None },
        Err(_) => EmbeddedValue { value: serde_json::Value::String(STANDARD.encode(bytes)), encoding: Some("base64") },
    }
}

const FORWARD: u8 = b'f';
const REVERSE: u8 = b'r';

/// An opaque cursor: the direction and the last item returned.
pub fn encode_cursor(last: &[u8], reverse: bool) -> String {
    let mut raw = Vec::with_capacity(last.len() + 1);
    raw.push(if reverse { REVERSE } else { FORWARD });
    raw.extend_from_slice(last);
    URL_SAFE_NO_PAD.encode(raw)
}

/// The last item of the previous page, or a message saying what is wrong.
pub fn decode_cursor(cursor: &str, reverse: bool) -> Result<Vec<u8>, String> {
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| "invalid cursor: not one this server issued".to_string())?;
    let (direction, last) = raw.split_first().ok_or_else(|| "invalid cursor: empty".to_string())?;
    match (*direction, reverse) {
        (FORWARD, false) | (REVERSE, true) => Ok(last.to_vec()),
        (FORWARD, true) | (REVERSE, false) => {
            Err("invalid cursor: it was issued for the other direction; pass the same `reverse` as before".into())
        }
        _ => Err("invalid cursor: not one this server issued".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding() {
        let v = embed_value(br#"{"a":1}"#, "application/json; charset=utf-8");
        assert_eq!(v.value, serde_json::json!({"a": 1}));
        let v = embed_value(b"{not json", "application/json");
        assert_eq!(v.value, serde_json::json!("{not json"));
        let v = embed_value(b"hi", "text/plain");
        assert_eq!((v.value, v.encoding), (serde_json::json!("hi"), None));
        let v = embed_value(&[0xff, 0x00], "application/octet-stream");
        assert_eq!((v.value, v.encoding), (serde_json::json!("/wA="), Some("base64")));
    }

    #[test]
    fn cursors_round_trip_and_check_direction() {
        let c = encode_cursor("k/ü".as_bytes(), false);
        assert_eq!(decode_cursor(&c, false).unwrap(), "k/ü".as_bytes());
        assert!(decode_cursor(&c, true).is_err());
        assert!(decode_cursor("!!", false).is_err());
        assert!(decode_cursor("", false).is_err());
    }
}
