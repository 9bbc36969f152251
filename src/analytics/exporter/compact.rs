//! Compaction: a table's small data files rewritten into larger ones and its
//! manifests merged, committed as one `replace` snapshot.
//!
//! Every export cycle appends a manifest and a small file per partition it
//! touched, so without this a table's file and manifest counts grow with the
//! number of cycles, and so does every query's planning and opening cost.
//! iceberg-rust 0.10 has no rewrite action, so the snapshot is built here
//! from its manifest and manifest-list writers, as the Iceberg spec lays out a
//! rewrite: the replaced files are DELETED entries (keeping their sequence
//! numbers), the files kept are EXISTING entries in the same manifest, and the
//! new files are ADDED in another, inheriting the new snapshot's sequence
//! number. Rows are not changed, so the snapshot carries the outbox seq of the
//! snapshot it replaces: the next cycle starts where the last one ended.
//!
//! It is committed like an export snapshot, by the exporter under its lease,
//! through `LibsqlCatalog::commit_updates` (fence, then compare-and-set of the
//! metadata pointer), requiring the branch to still be at the snapshot it was
//! computed on. A compaction that is refused or killed leaves files no
//! snapshot names, which orphan removal deletes after the grace period; the
//! replaced files stay as long as a kept (pre-compaction) snapshot reads them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use iceberg::arrow::ArrowReaderBuilder;
use iceberg::scan::FileScanTask;
use iceberg::spec::{
    DataFile, FormatVersion, ManifestContentType, ManifestEntry, ManifestFile, ManifestListWriter,
    ManifestWriterBuilder, Operation, PartitionSpecRef, SchemaRef, Snapshot, SnapshotReference, SnapshotRetention,
    SnapshotSummaryCollector, Struct, Summary, MAIN_BRANCH,
};
use iceberg::table::Table;
use iceberg::{Runtime, TableRequirement, TableUpdate};
use serde::Serialize;

use crate::analytics::catalog::{LibsqlCatalog, OUTBOX_THROUGH};
use crate::analytics::tables::ExportTable;
use crate::guard::HeldLease;

use super::data_files::write_batches;
use super::{ExportError, Exporter};

/// Snapshot properties of a compaction: how many manifests the table had
/// before and has after (the data file counts are Iceberg's own totals).
pub const MANIFESTS_BEFORE: &str = "statehouse.manifests-before";
pub const MANIFESTS_AFTER: &str = "statehouse.manifests-after";

/// Files at least this share (percent) of the target size are left alone
/// (Iceberg Java's rewrite default): rewriting them gains little.
const LARGE_ENOUGH_PERCENT: u64 = 75;
/// One pass rewrites at most this many target sizes of data per table; the
/// rest waits for the next pass, so that the export cycle, which waits for
/// the pass, is never held for long.
const TARGETS_PER_PASS: u64 = 8;
/// And at most this many files: small files cost more to open than to read.
const FILES_PER_PASS: usize = 10_000;
/// Entries per manifest written here: a reader reads a manifest whole.
const MANIFEST_ENTRIES: usize = 10_000;

#[derive(Debug, Clone)]
pub struct CompactionPolicy {
    pub enabled: bool,
    /// Size the rewritten files roll over at.
    pub target_file_bytes: u64,
    /// A partition is rewritten once it has this many small files.
    pub min_files: usize,
    /// A table with more manifests than this has them merged, files rewritten or not.
    pub max_manifests: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CompactionError {
    /// The exporter writes only data manifests of one partition spec in format
    /// v2; anything else was written by someone else and is left alone.
    #[error("{table}: {what}; compaction handles only the exporter's own data files")]
    Unsupported { table: String, what: String },
    /// A guard against a reader or writer fault: a replace must keep every
    /// row, in its partition. Nothing is committed.
    #[error("{table}: partition {partition}: the rewritten files do not match the replaced ones: {why}")]
    Mismatch { table: String, partition: String, why: String },
}

/// The last compaction of a table, as its snapshot records it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CompactionInfo {
    pub snapshot_id: i64,
    /// When it was committed (ms since the epoch).
    pub at_ms: i64,
    pub data_files_before: u64,
    pub data_files_after: u64,
    pub manifests_before: u64,
    pub manifests_after: u64,
    /// Small files rewritten, and the files they became.
    pub files_rewritten: u64,
    pub files_written: u64,
}

impl CompactionInfo {
    /// The compaction `snapshot` is, if it is one of ours.
    pub fn of(snapshot: &Snapshot) -> Option<CompactionInfo> {
        let summary = snapshot.summary();
        if summary.operation != Operation::Replace {
            return None;
        }
        let get = |key: &str| summary.additional_properties.get(key).and_then(|v| v.parse::<u64>().ok());
        let after = get("total-data-files")?;
        let (rewritten, written) = (get("deleted-data-files").unwrap_or(0), get("added-data-files").unwrap_or(0));
        Some(CompactionInfo {
            snapshot_id: snapshot.snapshot_id(),
            at_ms: snapshot.timestamp_ms(),
            data_files_before: (after + rewritten).saturating_sub(written),
            data_files_after: after,
            manifests_before: get(MANIFESTS_BEFORE)?,
            manifests_after: get(MANIFESTS_AFTER)?,
            files_rewritten: rewritten,
            files_written: written,
        })
    }
}

impl Exporter {
    /// The maintenance pass's compaction of one table: the table as it is
    /// after it. Only a refusal (the lease or the pointer moved) ends the
    /// pass; any other failure committed nothing and is tried again next pass.
    pub(super) async fn compact_table(
        &self,
        catalog: &LibsqlCatalog,
        table: ExportTable,
        current: Table,
        lease: &HeldLease,
    ) -> Result<Table, ExportError> {
        if !self.policy.compaction.enabled {
            return Ok(current);
        }
        let properties = HashMap::from([
            ("statehouse.fence".to_string(), lease.fence.to_string()),
            ("statehouse.instance".to_string(), self.guard.me().instance.clone()),
        ]);
        let started = std::time::Instant::now();
        match compact(catalog, &current, &self.policy.compaction, properties, &|| self.guard.touch(lease)).await {
            Ok(Some((compacted, info))) => {
                tracing::info!(
                    table = table.name(),
                    snapshot_id = info.snapshot_id,
                    data_files_before = info.data_files_before,
                    data_files_after = info.data_files_after,
                    manifests_before = info.manifests_before,
                    manifests_after = info.manifests_after,
                    files_rewritten = info.files_rewritten,
                    ms = started.elapsed().as_millis() as u64,
                    "compacted an Iceberg table"
                );
                let name = table.name();
                self.metrics.compactions.with_label_values(&[name]).inc();
                self.metrics.last_compaction.with_label_values(&[name]).set(info.at_ms as f64 / 1000.0);
                self.metrics
                    .last_compaction_files
                    .with_label_values(&[name, "before"])
                    .set(info.data_files_before as i64);
                self.metrics
                    .last_compaction_files
                    .with_label_values(&[name, "after"])
                    .set(info.data_files_after as i64);
                Ok(compacted)
            }
            Ok(None) => Ok(current),
            Err(err) if err.is_refused() => Err(err),
            Err(err) => {
                self.metrics.compaction_failures.inc();
                tracing::warn!(table = table.name(), error = %err, "compaction failed; the table is left as it was");
                Ok(current)
            }
        }
    }

    /// Sets the table's data file and manifest gauges.
    pub(super) async fn observe_table(&self, table: ExportTable, current: &Table) -> Result<(), ExportError> {
        let name = table.name();
        self.metrics.data_files.with_label_values(&[name]).set(total(current, "total-data-files") as i64);
        self.metrics.manifests.with_label_values(&[name]).set(manifest_count(current).await? as i64);
        Ok(())
    }
}

/// Manifests in the table's current snapshot (one read of its manifest list).
pub(super) async fn manifest_count(table: &Table) -> Result<u64, iceberg::Error> {
    let Some(current) = table.metadata().current_snapshot() else { return Ok(0) };
    Ok(table.manifest_list_reader(current).load().await?.entries().len() as u64)
}

/// A total of the current snapshot's summary (0 before the first snapshot).
pub(super) fn total(table: &Table, key: &str) -> u64 {
    table
        .metadata()
        .current_snapshot()
        .and_then(|s| s.summary().additional_properties.get(key).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The table's latest compaction still in its history.
pub fn last_compaction(table: &Table) -> Option<CompactionInfo> {
    table.metadata().snapshots().filter_map(|s| CompactionInfo::of(s)).max_by_key(|c| (c.at_ms, c.snapshot_id))
}

/// Compacts `table` if `policy`'s thresholds say so, committing through
/// `catalog` (a fenced view). `properties` are added to the snapshot's
/// summary; `touch` is called between partitions (a long pass must keep the
/// exporter lease in use). None when there was nothing to do.
pub async fn compact(
    catalog: &LibsqlCatalog,
    table: &Table,
    policy: &CompactionPolicy,
    properties: HashMap<String, String>,
    touch: &(dyn Fn() + Sync),
) -> Result<Option<(Table, CompactionInfo)>, ExportError> {
    let metadata = table.metadata();
    let Some(current) = metadata.current_snapshot() else { return Ok(None) };
    let name = table.identifier().to_string();
    let unsupported = |what: String| CompactionError::Unsupported { table: name.clone(), what };
    if metadata.format_version() != FormatVersion::V2 {
        return Err(unsupported(format!("format version {}", metadata.format_version())).into());
    }
    let spec = metadata.default_partition_spec().clone();
    let schema = metadata.current_schema().clone();
    let manifests = table.manifest_list_reader(current).load().await?.consume_entries().into_iter().collect::<Vec<_>>();
    let mut live: Vec<Arc<ManifestEntry>> = Vec::new();
    for manifest in &manifests {
        if manifest.content != ManifestContentType::Data || manifest.partition_spec_id != spec.spec_id() {
            return Err(unsupported(format!(
                "manifest {} is not a data manifest of spec {}",
                manifest.manifest_path,
                spec.spec_id()
            ))
            .into());
        }
        let loaded = manifest.load_manifest(table.file_io()).await?;
        live.extend(loaded.entries().iter().filter(|e| e.is_alive()).cloned());
    }

    let chosen = choose(&live, policy);
    if chosen.is_empty() && manifests.len() <= policy.max_manifests {
        return Ok(None);
    }
    let snapshot_id = new_snapshot_id(table);
    tracing::info!(
        table = %name,
        partitions = chosen.len(),
        files = chosen.iter().map(|(_, files)| files.len()).sum::<usize>(),
        manifests = manifests.len(),
        "compacting an Iceberg table"
    );
    let mut rewritten: Vec<Arc<ManifestEntry>> = Vec::new();
    let mut written: Vec<DataFile> = Vec::new();
    for (partition, small) in chosen {
        touch();
        let files = rewrite(table, &small, policy.target_file_bytes).await?;
        let replaced: u64 = small.iter().map(|e| e.record_count()).sum();
        let rows: u64 = files.iter().map(DataFile::record_count).sum();
        let why = if rows != replaced {
            Some(format!("{rows} rows written, {replaced} replaced"))
        } else {
            files
                .iter()
                .find(|f| f.partition() != &partition)
                .map(|f| format!("{} is in another partition", f.file_path()))
        };
        if let Some(why) = why {
            let partition = spec.partition_to_path(&partition, schema.clone());
            return Err(CompactionError::Mismatch { table: name, partition, why }.into());
        }
        rewritten.extend(small);
        written.extend(files);
    }

    // The manifests: every entry of the snapshot (kept ones EXISTING, replaced
    // ones DELETED with their sequence numbers) in few manifests, grouped by
    // partition so that readers can skip a manifest by its partition summary.
    let commit = uuid::Uuid::now_v7();
    let mut counter = 0..;
    let mut new_manifest = || {
        let path = format!("{}/metadata/{commit}-m{}.avro", metadata.location(), counter.next().unwrap_or_default());
        Ok::<_, iceberg::Error>(
            ManifestWriterBuilder::new(
                table.file_io().new_output(path)?,
                Some(snapshot_id),
                schema.clone(),
                spec.as_ref().clone(),
            )
            .build_v2_data(),
        )
    };
    let replaced: HashSet<&str> = rewritten.iter().map(|e| e.file_path()).collect();
    let mut carried: Vec<&Arc<ManifestEntry>> = live.iter().collect();
    carried.sort_by_cached_key(|e| (partition_key(&e.data_file), e.file_path().to_string()));
    let mut new_manifests: Vec<ManifestFile> = Vec::new();
    for chunk in carried.chunks(MANIFEST_ENTRIES) {
        let mut writer = new_manifest()?;
        for entry in chunk {
            let (seq, file_seq) = (sequence(entry)?, entry.file_sequence_number);
            if replaced.contains(entry.file_path()) {
                writer.add_delete_file(entry.data_file.clone(), seq, file_seq)?;
            } else {
                let added_by = entry.snapshot_id.ok_or_else(|| missing(entry, "snapshot id"))?;
                writer.add_existing_file(entry.data_file.clone(), added_by, seq, file_seq)?;
            }
        }
        new_manifests.push(writer.write_manifest_file().await?);
    }
    written.sort_by_cached_key(|f| (partition_key(f), f.file_path().to_string()));
    for chunk in written.chunks(MANIFEST_ENTRIES) {
        let mut writer = new_manifest()?;
        for file in chunk {
            // -1: inherit the new snapshot's sequence number.
            writer.add_file(file.clone(), -1)?;
        }
        new_manifests.push(writer.write_manifest_file().await?);
    }

    let sequence_number = metadata.next_sequence_number();
    let list_path = format!("{}/metadata/snap-{snapshot_id}-0-{commit}.avro", metadata.location());
    let mut list = ManifestListWriter::v2(
        table.file_io().new_output(&list_path)?.writer().await?,
        snapshot_id,
        Some(current.snapshot_id()),
        sequence_number,
    );
    let manifests_after = new_manifests.len();
    list.add_manifests(new_manifests.into_iter())?;
    list.close().await?;

    let kept: Vec<&DataFile> =
        live.iter().filter(|e| !replaced.contains(e.file_path())).map(|e| &e.data_file).collect();
    let removed: Vec<&DataFile> = rewritten.iter().map(|e| &e.data_file).collect();
    let mut extra = properties;
    // The rows are the same: the next cycle must start where this snapshot's parent ended.
    if let Some(through) = current.summary().additional_properties.get(OUTBOX_THROUGH) {
        extra.insert(OUTBOX_THROUGH.to_string(), through.clone());
    }
    extra.insert(MANIFESTS_BEFORE.to_string(), manifests.len().to_string());
    extra.insert(MANIFESTS_AFTER.to_string(), manifests_after.to_string());
    let summary = replace_summary(&schema, &spec, &kept, &removed, &written, extra);
    let snapshot = Snapshot::builder()
        .with_snapshot_id(snapshot_id)
        .with_parent_snapshot_id(Some(current.snapshot_id()))
        .with_sequence_number(sequence_number)
        .with_timestamp_ms(chrono::Utc::now().timestamp_millis())
        .with_manifest_list(list_path)
        .with_summary(summary)
        .with_schema_id(metadata.current_schema_id())
        .build();
    let requirements = vec![
        TableRequirement::UuidMatch { uuid: metadata.uuid() },
        TableRequirement::RefSnapshotIdMatch {
            r#ref: MAIN_BRANCH.to_string(),
            snapshot_id: Some(current.snapshot_id()),
        },
    ];
    let updates = vec![
        TableUpdate::AddSnapshot { snapshot },
        TableUpdate::SetSnapshotRef {
            ref_name: MAIN_BRANCH.to_string(),
            reference: SnapshotReference::new(snapshot_id, SnapshotRetention::branch(None, None, None)),
        },
    ];
    let committed = catalog.commit_updates(table.identifier(), requirements, updates).await?;
    let info = committed.metadata().current_snapshot().and_then(|s| CompactionInfo::of(s)).ok_or_else(|| {
        iceberg::Error::new(iceberg::ErrorKind::Unexpected, "the committed compaction is not the current snapshot")
    })?;
    Ok(Some((committed, info)))
}

/// The partitions to rewrite and their small files, oldest first: those with
/// at least `min_files` small ones, the most first, up to a pass's worth of
/// bytes and files (a partition past it gives its oldest files).
fn choose(live: &[Arc<ManifestEntry>], policy: &CompactionPolicy) -> Vec<(Struct, Vec<Arc<ManifestEntry>>)> {
    let small_below = policy.target_file_bytes.saturating_mul(LARGE_ENOUGH_PERCENT) / 100;
    let mut partitions: HashMap<Struct, Vec<Arc<ManifestEntry>>> = HashMap::new();
    for entry in live.iter().filter(|e| e.file_size_in_bytes() < small_below) {
        partitions.entry(entry.data_file.partition().clone()).or_default().push(entry.clone());
    }
    // (Rewriting one small file would only rename it.)
    let min_files = policy.min_files.max(2);
    let mut candidates: Vec<_> = partitions.into_iter().filter(|(_, files)| files.len() >= min_files).collect();
    candidates.sort_by_cached_key(|(partition, files)| (std::cmp::Reverse(files.len()), format!("{partition:?}")));
    let budget = policy.target_file_bytes.saturating_mul(TARGETS_PER_PASS);
    let (mut bytes, mut count) = (0u64, 0usize);
    let mut chosen = Vec::new();
    for (partition, mut files) in candidates {
        // In commit order, so a partition's rows stay in seq order.
        files.sort_by(|a, b| (a.sequence_number, a.file_path()).cmp(&(b.sequence_number, b.file_path())));
        let mut take = 0;
        for file in &files {
            let over = bytes + file.file_size_in_bytes() > budget || count + 1 > FILES_PER_PASS;
            if over && (take >= min_files || !chosen.is_empty()) {
                break;
            }
            (bytes, count, take) = (bytes + file.file_size_in_bytes(), count + 1, take + 1);
        }
        if take < 2 {
            break;
        }
        files.truncate(take);
        chosen.push((partition, files));
    }
    chosen
}

/// Reads `files` (one partition's, in order) and writes their rows as files of about `target` bytes.
async fn rewrite(table: &Table, files: &[Arc<ManifestEntry>], target: u64) -> Result<Vec<DataFile>, iceberg::Error> {
    let schema = table.metadata().current_schema().clone();
    let field_ids: Vec<i32> = schema.as_struct().fields().iter().map(|f| f.id).collect();
    let tasks: Vec<Result<FileScanTask, iceberg::Error>> = files
        .iter()
        .map(|entry| {
            Ok(FileScanTask::builder()
                .with_file_size_in_bytes(entry.file_size_in_bytes())
                .with_start(0)
                .with_length(entry.file_size_in_bytes())
                .with_record_count(Some(entry.record_count()))
                .with_data_file_path(entry.file_path().to_string())
                .with_data_file_format(entry.file_format())
                .with_schema(schema.clone())
                .with_project_field_ids(field_ids.clone())
                .with_partition(Some(entry.data_file.partition().clone()))
                .with_case_sensitive(true)
                .build())
        })
        .collect();
    // One file at a time, in the order given.
    let reader = ArrowReaderBuilder::new(table.file_io().clone(), Runtime::try_current()?)
        .with_data_file_concurrency_limit(1)
        .build();
    let batches = reader.read(Box::pin(futures::stream::iter(tasks)))?.stream();
    write_batches(table, batches, usize::try_from(target).unwrap_or(usize::MAX)).await
}

/// A replace snapshot's summary: what was added and removed (Iceberg's own
/// collector), the totals of the files it keeps and adds, and `extra`.
fn replace_summary(
    schema: &SchemaRef,
    spec: &PartitionSpecRef,
    kept: &[&DataFile],
    removed: &[&DataFile],
    added: &[DataFile],
    extra: HashMap<String, String>,
) -> Summary {
    let mut collector = SnapshotSummaryCollector::default();
    for file in removed {
        collector.remove_file(file, schema.clone(), spec.clone());
    }
    for file in added {
        collector.add_file(file, schema.clone(), spec.clone());
    }
    let live = || kept.iter().copied().chain(added.iter());
    let mut properties = extra;
    properties.extend(collector.build());
    for (key, value) in [
        ("total-data-files", live().count() as u64),
        ("total-records", live().map(DataFile::record_count).sum()),
        ("total-files-size", live().map(DataFile::file_size_in_bytes).sum()),
        ("total-delete-files", 0),
        ("total-position-deletes", 0),
        ("total-equality-deletes", 0),
    ] {
        properties.insert(key.to_string(), value.to_string());
    }
    Summary { operation: Operation::Replace, additional_properties: properties }
}

/// Orders files by partition (any fixed order serves).
fn partition_key(file: &DataFile) -> String {
    format!("{:?}", file.partition())
}

fn sequence(entry: &ManifestEntry) -> Result<i64, iceberg::Error> {
    entry.sequence_number.ok_or_else(|| missing(entry, "sequence number"))
}

fn missing(entry: &ManifestEntry, what: &str) -> iceberg::Error {
    iceberg::Error::new(iceberg::ErrorKind::DataInvalid, format!("{} has no inherited {what}", entry.file_path()))
}

/// A positive snapshot id no snapshot of the table has (as iceberg-rust picks them).
fn new_snapshot_id(table: &Table) -> i64 {
    loop {
        let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
        let id = ((high ^ low) & (i64::MAX as u64)) as i64;
        if id != 0 && !table.metadata().snapshots().any(|s| s.snapshot_id() == id) {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use iceberg::spec::{
        DataContentType, DataFile, DataFileBuilder, DataFileFormat, Literal, ManifestEntry, ManifestStatus, Operation,
        Struct,
    };

    use super::{choose, replace_summary, CompactionPolicy};
    use crate::analytics::catalog::OUTBOX_THROUGH;
    use crate::analytics::tables::ExportTable;

    fn file(n: usize, ns: &str, records: u64, bytes: u64) -> DataFile {
        DataFileBuilder::default()
            .content(DataContentType::Data)
            .file_path(format!("/warehouse/statehouse/changes/data/{ns}/{n}.parquet"))
            .file_format(DataFileFormat::Parquet)
            .partition(Struct::from_iter([Some(Literal::string(ns)), Some(Literal::date(20_000))]))
            .record_count(records)
            .file_size_in_bytes(bytes)
            .partition_spec_id(0)
            .build()
            .unwrap()
    }

    fn entry(file: DataFile, sequence: i64) -> Arc<ManifestEntry> {
        Arc::new(
            ManifestEntry::builder().status(ManifestStatus::Added).sequence_number(sequence).data_file(file).build(),
        )
    }

    #[test]
    fn a_pass_takes_the_partitions_with_most_small_files_oldest_first_up_to_its_budget() {
        let policy =
            |target| CompactionPolicy { enabled: true, target_file_bytes: target, min_files: 3, max_manifests: 8 };
        // Partition a: 20 small files (newest first); b: 4 small and one large; c: 2 small.
        let mut live: Vec<_> = (0..20).rev().map(|n| entry(file(n, "a", 1, 50), n as i64)).collect();
        live.extend((20..24).map(|n| entry(file(n, "b", 1, 50), n as i64)));
        live.push(entry(file(24, "b", 1, 90), 24));
        live.extend((25..27).map(|n| entry(file(n, "c", 1, 50), n as i64)));
        let names = |chosen: &[(Struct, Vec<Arc<ManifestEntry>>)]| -> Vec<Vec<i64>> {
            chosen.iter().map(|(_, files)| files.iter().map(|e| e.sequence_number.unwrap()).collect()).collect()
        };
        // Ample budget: a, then b (c has too few small files).
        let all = choose(&live, &policy(1 << 20));
        assert_eq!(names(&all), vec![(0..20).collect::<Vec<_>>(), (20..25).collect()]);
        // 8 targets of 100 bytes (b's 90-byte file is not small then): the 16 oldest of a, nothing of b.
        let capped = choose(&live, &policy(100));
        assert_eq!(names(&capped), vec![(0..16).collect::<Vec<_>>()]);
    }

    #[test]
    fn a_replace_summary_adds_up() {
        let schema = Arc::new(ExportTable::Changes.schema());
        let spec = Arc::new(ExportTable::Changes.partition_spec().bind(schema.clone()).unwrap());
        // Before: 3 large files in `a` (kept), 5 small ones in `a` and 4 in `b` (replaced).
        let kept: Vec<DataFile> = (0..3).map(|n| file(n, "a", 1000, 100_000)).collect();
        let removed: Vec<DataFile> =
            (3..8).map(|n| file(n, "a", 10 + n as u64, 700)).chain((8..12).map(|n| file(n, "b", 20, 900))).collect();
        let added =
            vec![file(12, "a", removed[..5].iter().map(|f| f.record_count()).sum(), 2_000), file(13, "b", 80, 1_500)];
        let records = |files: &[DataFile]| files.iter().map(|f| f.record_count()).sum::<u64>();
        let bytes = |files: &[DataFile]| files.iter().map(|f| f.file_size_in_bytes()).sum::<u64>();
        let extra = HashMap::from([(OUTBOX_THROUGH.to_string(), "4242".to_string())]);
        let summary = replace_summary(
            &schema,
            &spec,
            &kept.iter().collect::<Vec<_>>(),
            &removed.iter().collect::<Vec<_>>(),
            &added,
            extra,
        );
        let get = |key: &str| -> u64 {
            summary.additional_properties.get(key).unwrap_or_else(|| panic!("no {key} in {summary:?}")).parse().unwrap()
        };
        assert_eq!(summary.operation, Operation::Replace);
        assert_eq!(get("added-data-files"), 2);
        assert_eq!(get("deleted-data-files"), 9);
        assert_eq!(get("added-records"), records(&removed));
        assert_eq!(get("deleted-records"), records(&removed));
        assert_eq!(get("added-files-size"), bytes(&added));
        assert_eq!(get("removed-files-size"), bytes(&removed));
        assert_eq!(get("changed-partition-count"), 2);
        // The totals are the previous ones less what was removed plus what was added.
        let (before_files, before_records) = (kept.len() + removed.len(), records(&kept) + records(&removed));
        assert_eq!(get("total-data-files"), (before_files - removed.len() + added.len()) as u64);
        assert_eq!(get("total-data-files"), 5);
        assert_eq!(get("total-records"), before_records, "a replace keeps every row");
        assert_eq!(get("total-files-size"), bytes(&kept) + bytes(&removed) - bytes(&removed) + bytes(&added));
        assert_eq!(get("total-delete-files"), 0);
        assert_eq!(summary.additional_properties[OUTBOX_THROUGH], "4242", "the outbox seq is carried");
    }
}
