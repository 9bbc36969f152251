//! The data files: zstd Parquet, one file (or more, rolling) per partition,
//! in directories named as the Iceberg Java writer names them.

use arrow_array::RecordBatch;
use futures::{Stream, StreamExt};
use iceberg::arrow::RecordBatchPartitionSplitter;
use iceberg::spec::{DataFile, DataFileFormat, PartitionKey, TableProperties};
use iceberg::table::Table;
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::{DefaultFileNameGenerator, LocationGenerator};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::partitioning::fanout_writer::FanoutWriter;
use iceberg::writer::partitioning::PartitioningWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};

/// Parquet row groups: large enough for good compression and statistics.
const ROW_GROUP_ROWS: usize = 128 * 1024;

/// Writes `batch` as zstd Parquet, one file (or more, rolling) per partition.
pub(super) async fn write_data_files(table: &Table, batch: RecordBatch) -> Result<Vec<DataFile>, iceberg::Error> {
    let target = TableProperties::PROPERTY_WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT;
    write_batches(table, futures::stream::iter([Ok(batch)]), target).await
}

/// Writes `batches` as zstd Parquet, one file per partition, rolling to a
/// new file once one reaches `target_file_size` bytes (compaction streams a
/// partition's small files through here, a batch at a time).
pub(super) async fn write_batches(
    table: &Table,
    batches: impl Stream<Item = Result<RecordBatch, iceberg::Error>>,
    target_file_size: usize,
) -> Result<Vec<DataFile>, iceberg::Error> {
    let metadata = table.metadata();
    let schema = metadata.current_schema().clone();
    let spec = metadata.default_partition_spec().clone();
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("zstd level 3 is valid")))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_created_by(format!("statehouse {}", env!("CARGO_PKG_VERSION")))
        .build();
    let rolling = RollingFileWriterBuilder::new(
        ParquetWriterBuilder::new(properties, schema.clone()),
        target_file_size,
        table.file_io().clone(),
        PartitionDirectories { data_location: format!("{}/data", metadata.location()) },
        // A fresh prefix per attempt: a retried cycle never overwrites a file a reader may hold.
        DefaultFileNameGenerator::new(uuid::Uuid::now_v7().to_string(), None, DataFileFormat::Parquet),
    );
    let mut writer = FanoutWriter::new(DataFileWriterBuilder::new(rolling));
    let splitter = RecordBatchPartitionSplitter::try_new_with_computed_values(schema, spec)?;
    let mut batches = std::pin::pin!(batches);
    while let Some(batch) = batches.next().await {
        for (key, part) in splitter.split(&batch?)? {
            writer.write(key, part).await?;
        }
    }
    writer.close().await
}

/// `data/ns=<ns>/type=<type>/ts_day=<date>/`, each value escaped as the
/// Iceberg Java writer does (`URLEncoder`: `[A-Za-z0-9.*_-]` kept, a space as
/// `+`, every other byte as `%XX`), so distinct values never share a
/// directory. Every segment starts with `<field>=`, so no value can name a
/// path outside the table (`type=..` is a plain name). Readers use the
/// manifests' partition values and file paths, not these names.
#[derive(Debug, Clone)]
struct PartitionDirectories {
    data_location: String,
}

impl LocationGenerator for PartitionDirectories {
    fn generate_location(&self, partition_key: Option<&PartitionKey>, file_name: &str) -> String {
        let Some(key) = partition_key.filter(|k| !PartitionKey::is_effectively_none(Some(k))) else {
            return format!("{}/{file_name}", self.data_location);
        };
        let spec = key.spec();
        let types = spec.partition_type(key.schema()).map(|t| t.fields().to_vec()).unwrap_or_default();
        let mut path = self.data_location.clone();
        for (i, field) in spec.fields().iter().enumerate() {
            let value = match types.get(i) {
                Some(t) => field.transform.to_human_string(&t.field_type, key.data()[i].as_ref()),
                None => "null".to_string(),
            };
            path.push('/');
            path.push_str(&field.name);
            path.push('=');
            path.push_str(&directory_safe(&value));
        }
        format!("{path}/{file_name}")
    }
}

fn directory_safe(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'*' | b'_' | b'-' => escaped.push(byte as char),
            b' ' => escaped.push('+'),
            _ => escaped.push_str(&format!("%{byte:02X}")),
        }
    }
    if escaped.len() <= MAX_PARTITION_NAME {
        return escaped;
    }
    // File systems refuse names over 255 bytes: a long value keeps a prefix
    // (never cut inside a %XX) and a digest of the whole, so it stays distinct.
    let mut cut = MAX_PARTITION_NAME - 17;
    while escaped.as_bytes()[cut - 1] == b'%' || escaped.as_bytes()[cut - 2] == b'%' {
        cut -= 1;
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(value.as_bytes());
    format!("{}-{}", &escaped[..cut], &hex::encode(digest)[..16])
}

/// The longest escaped partition value kept whole (bytes).
const MAX_PARTITION_NAME: usize = 200;

#[cfg(test)]
mod tests {
    use super::{directory_safe, MAX_PARTITION_NAME};

    #[test]
    fn partition_directories_escape_as_iceberg_java_does() {
        assert_eq!(directory_safe("OrderPlaced"), "OrderPlaced");
        assert_eq!(directory_safe("payments.do"), "payments.do");
        assert_ne!(directory_safe("payments.do"), directory_safe("payments_do"));
        assert_eq!(directory_safe("../../etc"), "..%2F..%2Fetc");
        assert_eq!(directory_safe(".."), "..");
        assert_eq!(directory_safe("v1.2-beta_x*"), "v1.2-beta_x*");
        assert_eq!(directory_safe(""), "");
        assert_eq!(directory_safe("a/b c%2F"), "a%2Fb+c%252F");
        assert_eq!(directory_safe("ünï"), "%C3%BCn%C3%AF");
        let long = directory_safe(&"ü".repeat(300));
        assert!(long.len() <= MAX_PARTITION_NAME, "{}", long.len());
        assert_ne!(long, directory_safe(&format!("{}x", "ü".repeat(300))));
        assert!(!long.contains("%-") && !long.contains("%C-"), "no %XX is cut: {long}");
    }
}
