//! What an upload must be before its metadata is committed: header-safe
//! descriptive fields, bounded user metadata, and, for bytes a client put
//! through a presigned URL, their size and SHA-256 read back from the store.
//! The HTTP layer parses requests into these and formats the answers.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path;
use sha2::{Digest, Sha256};

use super::meta::MAX_USER_META_BYTES;
use super::{Storage, StorageError};

/// Longest value of a descriptive field (cache control, disposition, metadata).
pub const MAX_FIELD_BYTES: usize = 1024;

/// Why an upload cannot be committed. Nothing was committed.
#[derive(Debug, thiserror::Error)]
pub enum UploadRefused {
    /// A field breaks a rule; the message says which.
    #[error("{0}")]
    BadInput(String),
    #[error("nothing was uploaded under upload_key")]
    NothingUploaded,
    /// The sweeper may already be deleting it.
    #[error("the upload is too old to commit; upload it again")]
    TooOld,
    #[error("the blob is larger than {0} bytes (STATEHOUSE_MAX_BLOB_BYTES)")]
    TooLarge(u64),
    #[error(transparent)]
    Store(#[from] StorageError),
}

/// A descriptive field is sent back as a response header, so it must be one:
/// visible ASCII, bounded.
pub fn check_field(value: &str) -> Result<(), UploadRefused> {
    if value.len() <= MAX_FIELD_BYTES && value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        Ok(())
    } else {
        Err(UploadRefused::BadInput(format!("header values are at most {MAX_FIELD_BYTES} visible ASCII characters")))
    }
}

/// User metadata from `(name, value)` pairs (from `x-statehouse-meta-<name>`
/// headers, or a commit request's `metadata`): each name a header token, kept
/// lowercase; each value a field; all of it within `MAX_USER_META_BYTES`.
pub fn user_metadata<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<BTreeMap<String, String>, UploadRefused> {
    let mut meta = BTreeMap::new();
    let mut total = 0;
    for (name, value) in pairs {
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if name.is_empty() || !name.chars().all(token) {
            return Err(UploadRefused::BadInput(format!(
                "metadata name {name:?} is not a header name (x-statehouse-meta-<name>)"
            )));
        }
        check_field(value)?;
        total += name.len() + value.len();
        meta.insert(name.to_ascii_lowercase(), value.to_string());
    }
    if total > MAX_USER_META_BYTES {
        return Err(UploadRefused::BadInput(format!(
            "user metadata is {total} bytes, at most {MAX_USER_META_BYTES} allowed"
        )));
    }
    Ok(meta)
}

/// Size and SHA-256 of bytes uploaded through a presigned URL, read once from
/// the store. An upload older than `max_age` is refused rather than raced
/// with the sweeper; one over `max_bytes` is deleted and refused.
pub async fn read_presigned(
    storage: &Storage,
    key: &Path,
    max_age: Duration,
    max_bytes: u64,
) -> Result<(u64, String), UploadRefused> {
    let got = storage.get(key, None).await.map_err(|err| match err {
        StorageError::NotFound(_) => UploadRefused::NothingUploaded,
        other => other.into(),
    })?;
    let age_ms = crate::clock::now_ms() - got.meta.last_modified.timestamp_millis();
    if age_ms > max_age.as_millis() as i64 {
        return Err(UploadRefused::TooOld);
    }
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = got.into_stream();
    while let Some(chunk) = stream.try_next().await.map_err(StorageError::from)? {
        size += chunk.len() as u64;
        hasher.update(&chunk);
    }
    if size > max_bytes {
        discard(storage, key).await;
        return Err(UploadRefused::TooLarge(max_bytes));
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// Deletes bytes no row will ever name (their commit was refused). Best
/// effort: the sweeper removes them after the grace period otherwise.
pub async fn discard(storage: &Storage, key: &Path) {
    if let Err(err) = storage.delete(key).await {
        tracing::warn!(key = %key, error = %err, "could not delete an uncommitted upload; the sweeper will");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_metadata_is_bounded_and_header_safe() {
        let meta = user_metadata([("Owner", "ann"), ("x-1", "a b")]).unwrap();
        assert_eq!(meta.get("owner").map(String::as_str), Some("ann"));
        assert!(user_metadata([("", "v")]).is_err());
        assert!(user_metadata([("a b", "v")]).is_err());
        assert!(user_metadata([("a", "line\nbreak")]).is_err());
        let big = "v".repeat(MAX_FIELD_BYTES);
        let many: Vec<(String, &str)> = (0..10).map(|i| (format!("k{i}"), big.as_str())).collect();
        assert!(user_metadata(many.iter().map(|(k, v)| (k.as_str(), *v))).is_err());
    }
}
