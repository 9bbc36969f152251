//! Iceberg's file access on the server's one `object_store` client, so the
//! warehouse and the blobs share a configuration (local folder or S3/R2) and
//! its retries. Iceberg names files by absolute location (`/abs/dir/...` or
//! `s3://bucket/...`); this maps each to a key under the store's root.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use iceberg::io::{
    FileIO, FileIOBuilder, FileMetadata, FileRead, FileWrite, InputFile, OutputFile, Storage, StorageConfig,
    StorageFactory,
};
use iceberg::{Error, ErrorKind, Result};
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

/// Where the store's keys start, as Iceberg locations: `/abs/objects/dir` or `s3://bucket`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WarehouseStorage {
    root: String,
    // Never serialised: Iceberg only needs the trait to be nameable, and this
    // storage is always built in-process from the server's own store.
    #[serde(skip)]
    store: Option<Arc<dyn ObjectStore>>,
}

impl WarehouseStorage {
    pub fn new(root: String, store: Arc<dyn ObjectStore>) -> Self {
        WarehouseStorage { root: root.trim_end_matches('/').to_string(), store: Some(store) }
    }

    /// A `FileIO` for tables whose every location starts with `root`.
    pub fn file_io(&self) -> FileIO {
        FileIOBuilder::new(Arc::new(WarehouseStorageFactory { storage: self.clone() })).build()
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    fn store(&self) -> Result<&Arc<dyn ObjectStore>> {
        self.store.as_ref().ok_or_else(|| Error::new(ErrorKind::Unexpected, "warehouse storage has no object store"))
    }

    /// The object-store key of an Iceberg location; refuses anything outside the warehouse root.
    pub fn key(&self, location: &str) -> Result<Path> {
        let rest = location.strip_prefix(&self.root).filter(|rest| rest.starts_with('/')).ok_or_else(|| {
            Error::new(ErrorKind::DataInvalid, format!("{location} is outside the warehouse root {}", self.root))
        })?;
        Path::parse(rest.trim_start_matches('/'))
            .map_err(|e| Error::new(ErrorKind::DataInvalid, format!("{location} is not a valid object key: {e}")))
    }

    /// The Iceberg location of an object-store key.
    pub fn location(&self, key: &Path) -> String {
        format!("{}/{}", self.root, key)
    }
}

fn store_error(location: &str, err: object_store::Error) -> Error {
    let kind = match err {
        object_store::Error::NotFound { .. } => ErrorKind::DataInvalid,
        _ => ErrorKind::Unexpected,
    };
    // Transient store failures may succeed on a retry of the whole export cycle, never inside a commit.
    Error::new(kind, format!("object store: {location}")).with_source(err)
}

#[async_trait::async_trait]
#[typetag::serde]
impl Storage for WarehouseStorage {
    async fn exists(&self, path: &str) -> Result<bool> {
        match self.store()?.head(&self.key(path)?).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(err) => Err(store_error(path, err)),
        }
    }

    async fn metadata(&self, path: &str) -> Result<FileMetadata> {
        let meta = self.store()?.head(&self.key(path)?).await.map_err(|e| store_error(path, e))?;
        Ok(FileMetadata { size: meta.size })
    }

    async fn read(&self, path: &str) -> Result<Bytes> {
        let got = self.store()?.get(&self.key(path)?).await.map_err(|e| store_error(path, e))?;
        got.bytes().await.map_err(|e| store_error(path, e))
    }

    async fn reader(&self, path: &str) -> Result<Box<dyn FileRead>> {
        Ok(Box::new(RangeReader { store: self.store()?.clone(), key: self.key(path)?, location: path.to_string() }))
    }

    async fn write(&self, path: &str, bs: Bytes) -> Result<()> {
        self.store()?.put(&self.key(path)?, bs.into()).await.map_err(|e| store_error(path, e))?;
        Ok(())
    }

    async fn writer(&self, path: &str) -> Result<Box<dyn FileWrite>> {
        let key = self.key(path)?;
        Ok(Box::new(StreamingWriter {
            inner: Some(BufWriter::new(self.store()?.clone(), key)),
            location: path.to_string(),
        }))
    }

    async fn delete(&self, path: &str) -> Result<()> {
        match self.store()?.delete(&self.key(path)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(store_error(path, err)),
        }
    }

    async fn delete_prefix(&self, path: &str) -> Result<()> {
        let prefix = self.key(path)?;
        let store = self.store()?.clone();
        let mut listed = store.list(Some(&prefix));
        while let Some(meta) = listed.next().await {
            let meta = meta.map_err(|e| store_error(path, e))?;
            match store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(err) => return Err(store_error(path, err)),
            }
        }
        Ok(())
    }

    async fn delete_stream(&self, mut paths: BoxStream<'static, String>) -> Result<()> {
        while let Some(path) = paths.next().await {
            self.delete(&path).await?;
        }
        Ok(())
    }

    fn new_input(&self, path: &str) -> Result<InputFile> {
        Ok(InputFile::new(Arc::new(self.clone()), path.to_string()))
    }

    fn new_output(&self, path: &str) -> Result<OutputFile> {
        Ok(OutputFile::new(Arc::new(self.clone()), path.to_string()))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct WarehouseStorageFactory {
    storage: WarehouseStorage,
}

#[typetag::serde]
impl StorageFactory for WarehouseStorageFactory {
    fn build(&self, _config: &StorageConfig) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(self.storage.clone()))
    }
}

struct RangeReader {
    store: Arc<dyn ObjectStore>,
    key: Path,
    location: String,
}

#[async_trait::async_trait]
impl FileRead for RangeReader {
    async fn read(&self, range: Range<u64>) -> Result<Bytes> {
        self.store.get_range(&self.key, range).await.map_err(|e| store_error(&self.location, e))
    }
}

/// Uploads in parts as it goes (multipart on S3), so a large data file is never held whole.
struct StreamingWriter {
    inner: Option<BufWriter>,
    location: String,
}

#[async_trait::async_trait]
impl FileWrite for StreamingWriter {
    async fn write(&mut self, bs: Bytes) -> Result<()> {
        let writer = self.inner.as_mut().ok_or_else(|| Error::new(ErrorKind::Unexpected, "write after close"))?;
        writer.put(bs).await.map_err(|e| store_error(&self.location, e))
    }

    async fn close(&mut self) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut writer = self.inner.take().ok_or_else(|| Error::new(ErrorKind::Unexpected, "closed twice"))?;
        // (`abort` may not follow a failed shutdown: object_store panics. A failed
        // small upload left nothing; a failed multipart leaves parts the bucket's
        // lifecycle rules clean up.)
        writer.shutdown().await.map_err(|err| {
            Error::new(ErrorKind::Unexpected, format!("object store: {}", self.location)).with_source(err)
        })
    }
}
