//! Blobs: large binary payloads next to an object's keys, like R2 beside a
//! Durable Object. The bytes live in the object store; their metadata is a
//! fenced row in libSQL, committed only after the bytes are safely written.

pub mod meta;
mod store;
mod sweeper;
pub mod upload;

pub use crate::model::BlobMeta;
pub use meta::{new_storage_key, object_prefix, stored_path, upload_prefix, validate_name};
pub use store::{Backend, S3Settings, Storage, StorageError, UploadError, Uploaded, MULTIPART_PART_BYTES};
pub use sweeper::{kept_for, SweepError, SweepReport, Sweeper};
