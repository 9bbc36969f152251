//! The one place that talks to the object store: a local folder by default,
//! any S3-compatible store (R2, S3, Tigris, MinIO) when R2_* is set. Blobs and
//! the Iceberg export share this configuration and client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    ClientOptions, GetOptions, GetRange, GetResult, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use sha2::{Digest, Sha256};

use crate::config::ObjectStoreSettings;

/// Bodies up to this size are sent in one PUT; larger ones as a multipart
/// upload of parts this size (S3 needs parts of at least 5 MiB).
pub const MULTIPART_PART_BYTES: usize = 8 * 1024 * 1024;
const MULTIPART_CONCURRENCY: usize = 2;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("not found in the object store: {0}")]
    NotFound(String),
    #[error("the object store is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    NotSupported(String),
    #[error("bad object-store settings: {0}")]
    Config(String),
}

impl From<object_store::Error> for StorageError {
    fn from(err: object_store::Error) -> Self {
        match err {
            object_store::Error::NotFound { path, .. } => StorageError::NotFound(path),
            object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. } => {
                StorageError::NotSupported(err.to_string())
            }
            // Ranges are checked against the blob's recorded size before the store
            // is asked, so a store-side range error means stored bytes and metadata disagree.
            other => StorageError::Unavailable(other.to_string()),
        }
    }
}

/// Why an upload did not complete; nothing was left visible under its key.
#[derive(Debug, thiserror::Error)]
pub enum UploadError<E> {
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("reading the request body failed: {0}")]
    Body(E),
    #[error(transparent)]
    Store(#[from] StorageError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    LocalFolder,
    S3,
}

#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    signer: Option<Arc<AmazonS3>>,
    backend: Backend,
    /// The store's root as an absolute location other tools understand
    /// (`/abs/objects/dir` or `s3://bucket`), for the Iceberg tables.
    iceberg_root: String,
    /// Where it is, for logs: a folder or `s3://bucket` at an endpoint.
    pub location: String,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("location", &self.location).finish()
    }
}

impl Storage {
    /// Opens the configured store, creating the bucket first when asked to.
    pub async fn open(settings: &ObjectStoreSettings) -> Result<Storage, StorageError> {
        match settings.s3()? {
            None => {
                let dir = &settings.objects_dir;
                std::fs::create_dir_all(dir).map_err(|e| {
                    StorageError::Config(format!("cannot create STATEHOUSE_OBJECTS_DIR={}: {e}", dir.display()))
                })?;
                let store = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| StorageError::Config(format!("STATEHOUSE_OBJECTS_DIR={}: {e}", dir.display())))?;
                let absolute = std::fs::canonicalize(dir)
                    .map_err(|e| StorageError::Config(format!("STATEHOUSE_OBJECTS_DIR={}: {e}", dir.display())))?;
                Ok(Storage {
                    store: Arc::new(store),
                    signer: None,
                    backend: Backend::LocalFolder,
                    iceberg_root: absolute.display().to_string(),
                    location: dir.display().to_string(),
                })
            }
            Some(s3) => {
                if settings.create_bucket {
                    create_bucket(&s3).await?;
                }
                let store = AmazonS3Builder::new()
                    .with_endpoint(&s3.endpoint)
                    .with_bucket_name(&s3.bucket)
                    .with_access_key_id(&s3.access_key_id)
                    .with_secret_access_key(&s3.secret_access_key)
                    .with_region(&s3.region)
                    // Path-style addressing: what MinIO, s3s and most self-hosted stores need;
                    // R2 and S3 accept it too.
                    .with_virtual_hosted_style_request(false)
                    // Fail within seconds when the store is down, rather than retrying for minutes.
                    .with_retry(RetryConfig {
                        max_retries: 3,
                        retry_timeout: Duration::from_secs(10),
                        ..RetryConfig::default()
                    })
                    .with_client_options(
                        ClientOptions::new()
                            .with_connect_timeout(Duration::from_secs(5))
                            .with_allow_http(s3.endpoint.starts_with("http://")),
                    )
                    .build()
                    .map_err(|e| StorageError::Config(e.to_string()))?;
                let store = Arc::new(store);
                Ok(Storage {
                    store: store.clone(),
                    signer: Some(store),
                    backend: Backend::S3,
                    iceberg_root: format!("s3://{}", s3.bucket),
                    location: format!("s3://{} at {}", s3.bucket, s3.endpoint),
                })
            }
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn iceberg_root(&self) -> String {
        self.iceberg_root.clone()
    }

    /// The raw client, for code that takes an `ObjectStore` (the Iceberg export).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// Streams `body` to `key`, never holding more than one part in memory,
    /// and computes its size and SHA-256. Over `limit` bytes, or on any error,
    /// the upload is aborted and nothing is left under `key`.
    pub async fn put_stream<S, E>(&self, key: &Path, mut body: S, limit: u64) -> Result<Uploaded, UploadError<E>>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
    {
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut first = Vec::new();
        // Small bodies: one PUT.
        loop {
            match body.next().await {
                None => {
                    self.store.put(key, PutPayload::from(first)).await.map_err(StorageError::from)?;
                    return Ok(Uploaded { size, sha256: hex::encode(hasher.finalize()) });
                }
                Some(Err(e)) => return Err(UploadError::Body(e)),
                Some(Ok(chunk)) => {
                    size += chunk.len() as u64;
                    if size > limit {
                        return Err(UploadError::TooLarge { limit });
                    }
                    hasher.update(&chunk);
                    first.extend_from_slice(&chunk);
                    if first.len() > MULTIPART_PART_BYTES {
                        break;
                    }
                }
            }
        }
        // Large bodies: a multipart upload, aborted on any failure.
        let upload = self.store.put_multipart(key).await.map_err(StorageError::from)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART_BYTES);
        writer.put(Bytes::from(first));
        let outcome: Result<(), UploadError<E>> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(UploadError::Body)?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(UploadError::TooLarge { limit });
                }
                hasher.update(&chunk);
                writer.wait_for_capacity(MULTIPART_CONCURRENCY).await.map_err(StorageError::from)?;
                writer.put(chunk);
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => {
                writer.finish().await.map_err(StorageError::from)?;
                Ok(Uploaded { size, sha256: hex::encode(hasher.finalize()) })
            }
            Err(err) => {
                if let Err(abort) = writer.abort().await {
                    // Nothing here lists open uploads later (object_store cannot): the
                    // bucket's AbortIncompleteMultipartUpload lifecycle rule removes the parts.
                    tracing::warn!(
                        key = %key,
                        error = %abort,
                        "could not abort a multipart upload; its parts stay until the bucket's lifecycle rule aborts it"
                    );
                }
                Err(err)
            }
        }
    }

    pub async fn put(&self, key: &Path, bytes: Bytes) -> Result<(), StorageError> {
        self.store.put(key, PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// The object, or the part of it `range` names.
    pub async fn get(&self, key: &Path, range: Option<GetRange>) -> Result<GetResult, StorageError> {
        let options = GetOptions { range, ..Default::default() };
        Ok(self.store.get_opts(key, options).await?)
    }

    pub async fn head(&self, key: &Path) -> Result<ObjectMeta, StorageError> {
        Ok(self.store.head(key).await?)
    }

    /// Deleting what is not there succeeds (S3 semantics, on every backend).
    pub async fn delete(&self, key: &Path) -> Result<(), StorageError> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every object under `prefix`, in no particular order.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<ObjectMeta>, StorageError> {
        let mut out = Vec::new();
        let mut stream = self.store.list(Some(prefix));
        while let Some(meta) = stream.next().await {
            match meta {
                Ok(meta) => out.push(meta),
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// A URL that lets its holder GET or PUT `key` without credentials.
    pub async fn presign(
        &self,
        method: reqwest::Method,
        key: &Path,
        expires_in: Duration,
    ) -> Result<String, StorageError> {
        let signer = self.signer.as_ref().ok_or_else(|| {
            StorageError::NotSupported(
                "presigned URLs need an S3-compatible store (set R2_ENDPOINT, R2_BUCKET, R2_ACCESS_KEY_ID, R2_SECRET_ACCESS_KEY); \
                 this server keeps objects in a local folder"
                    .into(),
            )
        })?;
        Ok(signer.signed_url(method, key, expires_in).await?.to_string())
    }

    /// Whether the store answers at all (for /readyz).
    pub async fn check(&self) -> Result<(), StorageError> {
        let mut stream = self.store.list(Some(&Path::from("_readyz")));
        match stream.next().await {
            None | Some(Ok(_)) | Some(Err(object_store::Error::NotFound { .. })) => Ok(()),
            Some(Err(e)) => Err(e.into()),
        }
    }
}

/// The S3 settings, all four given.
pub struct S3Settings {
    pub endpoint: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub region: String,
}

impl ObjectStoreSettings {
    /// None for the local folder; an error naming what is missing when only some are set.
    pub fn s3(&self) -> Result<Option<S3Settings>, StorageError> {
        let parts = [
            ("R2_ENDPOINT", self.r2_endpoint.is_some()),
            ("R2_BUCKET", self.r2_bucket.is_some()),
            ("R2_ACCESS_KEY_ID", self.r2_access_key_id.is_some()),
            ("R2_SECRET_ACCESS_KEY", self.r2_secret_access_key.is_some()),
        ];
        let missing: Vec<&str> = parts.iter().filter(|(_, given)| !given).map(|(n, _)| *n).collect();
        if missing.len() == parts.len() {
            return Ok(None);
        }
        if !missing.is_empty() {
            return Err(StorageError::Config(format!(
                "an S3-compatible store needs R2_ENDPOINT, R2_BUCKET, R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY; missing {}",
                missing.join(", ")
            )));
        }
        Ok(Some(S3Settings {
            endpoint: self.r2_endpoint.clone().unwrap_or_default().trim_end_matches('/').to_string(),
            bucket: self.r2_bucket.clone().unwrap_or_default(),
            access_key_id: self.r2_access_key_id.as_ref().map(|id| id.expose().to_string()).unwrap_or_default(),
            secret_access_key: self
                .r2_secret_access_key
                .as_ref()
                .map(|key| key.expose().to_string())
                .unwrap_or_default(),
            region: self.r2_region.clone(),
        }))
    }
}

/// Creates the bucket if it does not exist (development stacks:
/// STATEHOUSE_CREATE_BUCKET=true). object_store has no bucket API.
async fn create_bucket(s3: &S3Settings) -> Result<(), StorageError> {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(&s3.endpoint)
        .region(Region::new(s3.region.clone()))
        .credentials_provider(Credentials::new(&s3.access_key_id, &s3.secret_access_key, None, None, "statehouse"))
        .force_path_style(true)
        .build();
    let client = aws_sdk_s3::Client::from_conf(config);
    if client.head_bucket().bucket(&s3.bucket).send().await.is_ok() {
        return Ok(());
    }
    match client.create_bucket().bucket(&s3.bucket).send().await {
        Ok(_) => {
            tracing::info!(bucket = %s3.bucket, "created the bucket");
            Ok(())
        }
        Err(err) => {
            let text = format!("{}", aws_sdk_s3::error::DisplayErrorContext(&err));
            if text.contains("BucketAlreadyOwnedByYou") || text.contains("BucketAlreadyExists") {
                Ok(())
            } else {
                Err(StorageError::Unavailable(format!(
                    "cannot create bucket {} (STATEHOUSE_CREATE_BUCKET=true): {text}",
                    s3.bucket
                )))
            }
        }
    }
}
