//! One conformance suite for the storage layer, run unchanged against the
//! local folder and against a real S3 wire protocol (s3s-fs in-process).

mod common;

use std::convert::Infallible;

use bytes::Bytes;
use common::s3::{local_settings, S3Server};
use object_store::path::Path;
use object_store::GetRange;
use sha2::{Digest, Sha256};
use statehouse::blobs::{Backend, Storage, StorageError, UploadError, MULTIPART_PART_BYTES};

fn chunks(data: &[u8], size: usize) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Unpin {
    let parts: Vec<Result<Bytes, Infallible>> = data.chunks(size).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    futures::stream::iter(parts)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

async fn conformance(storage: &Storage) {
    let label = format!("{:?}", storage.backend());

    // put / get / head
    let key = Path::from("suite/a/small.bin");
    let up = storage.put_stream(&key, chunks(b"hello blob", 3), 1 << 20).await.unwrap();
    assert_eq!(up.size, 10);
    assert_eq!(up.sha256, hex::encode(Sha256::digest(b"hello blob")));
    let got = storage.get(&key, None).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.as_ref(), b"hello blob", "{label}");
    assert_eq!(storage.head(&key).await.unwrap().size, 10);

    // ranged get: bounded, offset, suffix
    let range = |r| storage.get(&key, Some(r));
    assert_eq!(range(GetRange::Bounded(1..4)).await.unwrap().bytes().await.unwrap().as_ref(), b"ell");
    assert_eq!(range(GetRange::Offset(6)).await.unwrap().bytes().await.unwrap().as_ref(), b"blob");
    assert_eq!(range(GetRange::Suffix(3)).await.unwrap().bytes().await.unwrap().as_ref(), b"lob");
    assert!(range(GetRange::Offset(100)).await.is_err(), "{label}: a range past the end is an error");

    // an empty object
    let empty = Path::from("suite/a/empty");
    let up = storage.put_stream(&empty, chunks(b"", 1), 10).await.unwrap();
    assert_eq!((up.size, up.sha256.as_str()), (0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    assert_eq!(storage.get(&empty, None).await.unwrap().bytes().await.unwrap().len(), 0);

    // a large object crosses the multipart threshold and comes back intact
    let large = pattern(MULTIPART_PART_BYTES * 2 + 12_345);
    let big = Path::from("suite/b/large.bin");
    let up = storage.put_stream(&big, chunks(&large, 64 * 1024), 1 << 30).await.unwrap();
    assert_eq!(up.size, large.len() as u64);
    assert_eq!(up.sha256, hex::encode(Sha256::digest(&large)));
    let back = storage.get(&big, None).await.unwrap().bytes().await.unwrap();
    assert!(back.as_ref() == large.as_slice(), "{label}: large object differs");
    let tail = storage
        .get(&big, Some(GetRange::Bounded(MULTIPART_PART_BYTES as u64 - 5..MULTIPART_PART_BYTES as u64 + 5)))
        .await
        .unwrap();
    assert_eq!(tail.bytes().await.unwrap().as_ref(), &large[MULTIPART_PART_BYTES - 5..MULTIPART_PART_BYTES + 5]);

    // over the limit: refused, and nothing left behind (small and multipart paths)
    for (name, len) in [("over-small", 100usize), ("over-large", MULTIPART_PART_BYTES + 100)] {
        let k = Path::from(format!("suite/c/{name}"));
        let body = pattern(len);
        match storage.put_stream(&k, chunks(&body, 32 * 1024), len as u64 - 1).await {
            Err(UploadError::TooLarge { .. }) => {}
            other => panic!("{label}: {name}: expected TooLarge, got {other:?}"),
        }
        assert!(matches!(storage.head(&k).await, Err(StorageError::NotFound(_))), "{label}: {name} left an object");
    }
    // a failing body mid-way leaves nothing either
    let failing =
        futures::stream::iter(vec![Ok(Bytes::from(pattern(MULTIPART_PART_BYTES + 10))), Err("client went away")]);
    let k = Path::from("suite/c/failed");
    assert!(matches!(storage.put_stream(&k, failing, 1 << 30).await, Err(UploadError::Body("client went away"))));
    assert!(matches!(storage.head(&k).await, Err(StorageError::NotFound(_))));

    // list
    let mut listed: Vec<String> =
        storage.list(&Path::from("suite/a")).await.unwrap().into_iter().map(|m| m.location.to_string()).collect();
    listed.sort();
    assert_eq!(listed, ["suite/a/empty", "suite/a/small.bin"], "{label}");
    assert!(storage.list(&Path::from("suite/none")).await.unwrap().is_empty());

    // delete (idempotent), then errors for what is gone
    storage.delete(&key).await.unwrap();
    storage.delete(&key).await.unwrap();
    assert!(matches!(storage.get(&key, None).await, Err(StorageError::NotFound(_))), "{label}");
    assert!(matches!(storage.head(&key).await, Err(StorageError::NotFound(_))), "{label}");

    // overwrite replaces
    storage.put(&empty, Bytes::from_static(b"now full")).await.unwrap();
    assert_eq!(storage.get(&empty, None).await.unwrap().bytes().await.unwrap().as_ref(), b"now full");
    storage.check().await.unwrap();
    println!("storage conformance: {label} passed");
}

#[tokio::test]
async fn local_folder_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&local_settings(dir.path())).await.unwrap();
    assert_eq!(storage.backend(), Backend::LocalFolder);
    conformance(&storage).await;
    let err =
        storage.presign(reqwest::Method::GET, &Path::from("x"), std::time::Duration::from_secs(60)).await.unwrap_err();
    assert!(matches!(err, StorageError::NotSupported(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_wire_protocol_conforms() {
    let server = S3Server::start(Some("conformance")).await;
    let storage = Storage::open(&server.settings("conformance")).await.unwrap();
    assert_eq!(storage.backend(), Backend::S3);
    conformance(&storage).await;

    // Presigned URLs work with a plain HTTP client and no credentials.
    let key = Path::from("presigned/x.txt");
    let client = reqwest::Client::new();
    let put_url = storage.presign(reqwest::Method::PUT, &key, std::time::Duration::from_secs(60)).await.unwrap();
    assert_eq!(client.put(&put_url).body("via presigned PUT").send().await.unwrap().status(), 200);
    let get_url = storage.presign(reqwest::Method::GET, &key, std::time::Duration::from_secs(60)).await.unwrap();
    assert_eq!(client.get(&get_url).send().await.unwrap().text().await.unwrap(), "via presigned PUT");
    let tampered = get_url.replace("x.txt", "y.txt");
    assert_eq!(client.get(&tampered).send().await.unwrap().status(), 403);

    // A stopped store is an error, not a hang or a panic.
    server.stop();
    assert!(matches!(storage.check().await, Err(StorageError::Unavailable(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_is_created_when_asked_and_settings_must_be_complete() {
    let server = S3Server::start(None).await;
    let mut settings = server.settings("made-at-start");
    assert!(Storage::open(&settings).await.unwrap().check().await.is_err(), "no bucket yet");
    settings.create_bucket = true;
    let storage = Storage::open(&settings).await.unwrap();
    storage.put(&Path::from("k"), Bytes::from_static(b"v")).await.unwrap();
    assert!(server.root.join("made-at-start").is_dir());
    // Twice is fine.
    Storage::open(&settings).await.unwrap();

    settings.r2_secret_access_key = None;
    let err = Storage::open(&settings).await.unwrap_err().to_string();
    assert!(err.contains("missing R2_SECRET_ACCESS_KEY"), "{err}");
}
