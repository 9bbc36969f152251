//! An Iceberg catalog kept in our own libSQL database, in the table shape of
//! the Iceberg SQL catalog (`iceberg_tables`, `iceberg_namespace_properties`),
//! so PyIceberg's `SqlCatalog` reads it as it is.
//!
//! Every change of a table's metadata pointer is a compare-and-set from the
//! location the change was computed on, inside a transaction that first checks
//! the exporter's fence, so only the current lease holder can publish. A
//! snapshot of outbox rows names the last seq it holds
//! (`statehouse.outbox-through-seq`); that property, moved atomically with the
//! pointer, is what makes each row exported once: the exporter reads only rows
//! past it, and deletes the rows at or below it afterwards, in small slices.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use iceberg::io::FileIO;
use iceberg::spec::{TableMetadata, TableMetadataBuilder};
use iceberg::table::Table;
use iceberg::{
    Catalog, Error, ErrorKind, MetadataLocation, Namespace, NamespaceIdent, Result, Runtime, TableCommit,
    TableCreation, TableIdent, TableRequirement, TableUpdate,
};
use libsql::Value;

use super::storage::WarehouseStorage;
use super::tables::ExportTable;
use crate::db::batch::Stmt;
use crate::db::cells::Cells;
use crate::db::{Database, StoreError};
use crate::guard::HeldLease;
use crate::resident::ResidentState;
use crate::writer::{BoxFuture, Planner, Settled, Work, Writer, Writes};

pub const CATALOG_NAME: &str = "statehouse";
/// Snapshot property: the last outbox `seq` the snapshot's rows go up to.
pub const OUTBOX_THROUGH: &str = "statehouse.outbox-through-seq";

#[derive(Clone)]
pub struct LibsqlCatalog {
    db: Arc<Database>,
    writer: Writer,
    file_io: FileIO,
    /// Location of the warehouse root: `<store root>/warehouse`.
    warehouse: String,
    /// None: read-only (any replica's view); Some: the exporter's lease.
    commit_as: Option<HeldLease>,
}

fn refused(message: impl Into<String>) -> Error {
    // Never retryable: a moved pointer or a lost fence means another exporter
    // owns the tables now, and re-applying our files would export them twice.
    Error::new(ErrorKind::CatalogCommitConflicts, message).with_retryable(false)
}

fn database(err: StoreError) -> Error {
    Error::new(ErrorKind::Unexpected, format!("catalog database: {err}"))
}

impl std::fmt::Debug for LibsqlCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibsqlCatalog").field("warehouse", &self.warehouse).field("commit_as", &self.commit_as).finish()
    }
}

impl LibsqlCatalog {
    pub fn new(db: Arc<Database>, writer: Writer, storage: &WarehouseStorage) -> Self {
        LibsqlCatalog {
            db,
            writer,
            file_io: storage.file_io(),
            warehouse: format!("{}/warehouse", storage.root()),
            commit_as: None,
        }
    }

    /// A catalog whose changes commit only while `lease` is current.
    pub fn fenced(&self, lease: HeldLease) -> Self {
        LibsqlCatalog { commit_as: Some(lease), ..self.clone() }
    }

    pub fn warehouse(&self) -> &str {
        &self.warehouse
    }

    pub fn file_io(&self) -> &FileIO {
        &self.file_io
    }

    fn lease(&self) -> Result<&HeldLease> {
        self.commit_as
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::FeatureUnsupported, "this catalog view is read-only"))
    }

    /// The current metadata location of a table, if the table exists: one
    /// read, sent as a single request on a kept stream to a libSQL server
    /// (the Iceberg REST catalog asks this on every load).
    pub async fn pointer(&self, table: &TableIdent) -> Result<Option<String>> {
        let rows = self
            .db
            .query(Stmt::query(
                "SELECT metadata_location FROM iceberg_tables
                 WHERE catalog_name = ?1 AND table_namespace = ?2 AND table_name = ?3",
                vec![CATALOG_NAME.into(), table.namespace().to_url_string().into(), table.name().into()],
            ))
            .await
            .map_err(database)?;
        match rows.first() {
            Some(row) => Cells(row).opt_text(0).map_err(database),
            None => Ok(None),
        }
    }

    /// The table, or None when it does not exist yet (one read of its pointer).
    pub async fn load_existing(&self, ident: &TableIdent) -> Result<Option<Table>> {
        let Some(location) = self.pointer(ident).await? else { return Ok(None) };
        let metadata = TableMetadata::read_from(&self.file_io, &location).await?;
        self.table(ident.clone(), location, metadata).map(Some)
    }

    fn table(&self, ident: TableIdent, location: String, metadata: TableMetadata) -> Result<Table> {
        Table::builder()
            .identifier(ident)
            .metadata_location(location)
            .metadata(metadata)
            .file_io(self.file_io.clone())
            .runtime(Runtime::try_current()?)
            .build()
    }

    async fn publish(&self, change: Publish) -> Result<()> {
        match self.writer.run(change).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(PublishRefused::Fenced)) => {
                Err(refused("the exporter lease moved to another replica; this snapshot is not published"))
            }
            Ok(Err(PublishRefused::Moved)) => {
                Err(refused("the table's metadata pointer moved since this change was computed"))
            }
            // Unknown outcome (the database may have committed): never retried
            // here; the next cycle starts from whatever the pointer says.
            Err(err) => Err(database(err)),
        }
    }
}

#[async_trait::async_trait]
impl Catalog for LibsqlCatalog {
    async fn list_namespaces(&self, parent: Option<&NamespaceIdent>) -> Result<Vec<NamespaceIdent>> {
        if parent.is_some() {
            return Ok(vec![]);
        }
        Ok(vec![NamespaceIdent::new(super::tables::NAMESPACE.to_string())])
    }

    async fn create_namespace(&self, _: &NamespaceIdent, _: HashMap<String, String>) -> Result<Namespace> {
        Err(Error::new(ErrorKind::FeatureUnsupported, "the statehouse catalog has one fixed namespace"))
    }

    async fn get_namespace(&self, namespace: &NamespaceIdent) -> Result<Namespace> {
        if self.namespace_exists(namespace).await? {
            Ok(Namespace::new(namespace.clone()))
        } else {
            Err(Error::new(ErrorKind::NamespaceNotFound, format!("no namespace {}", namespace.to_url_string())))
        }
    }

    async fn namespace_exists(&self, namespace: &NamespaceIdent) -> Result<bool> {
        Ok(namespace.to_url_string() == super::tables::NAMESPACE)
    }

    async fn update_namespace(&self, _: &NamespaceIdent, _: HashMap<String, String>) -> Result<()> {
        Err(Error::new(ErrorKind::FeatureUnsupported, "the statehouse namespace is fixed"))
    }

    async fn drop_namespace(&self, _: &NamespaceIdent) -> Result<()> {
        Err(Error::new(ErrorKind::FeatureUnsupported, "the statehouse namespace is fixed"))
    }

    async fn list_tables(&self, namespace: &NamespaceIdent) -> Result<Vec<TableIdent>> {
        let mut tables = Vec::new();
        for table in ExportTable::ALL {
            let ident = TableIdent::new(namespace.clone(), table.name().to_string());
            if self.pointer(&ident).await?.is_some() {
                tables.push(ident);
            }
        }
        Ok(tables)
    }

    async fn create_table(&self, namespace: &NamespaceIdent, creation: TableCreation) -> Result<Table> {
        let lease = self.lease()?.clone();
        let ident = TableIdent::new(namespace.clone(), creation.name.clone());
        let location = format!("{}/{}/{}", self.warehouse, namespace.to_url_string(), creation.name);
        let creation = TableCreation { location: Some(location.clone()), ..creation };
        let metadata = TableMetadataBuilder::from_table_creation(creation)?.build()?.metadata;
        let metadata_location = MetadataLocation::new_with_metadata(&location, &metadata);
        metadata.write_to(&self.file_io, &metadata_location).await?;
        self.publish(Publish {
            lease,
            namespace: namespace.to_url_string(),
            namespace_location: format!("{}/{}", self.warehouse, namespace.to_url_string()),
            name: ident.name().to_string(),
            previous: None,
            location: metadata_location.to_string(),
        })
        .await?;
        self.table(ident, metadata_location.to_string(), metadata)
    }

    async fn load_table(&self, ident: &TableIdent) -> Result<Table> {
        self.load_existing(ident)
            .await?
            .ok_or_else(|| Error::new(ErrorKind::TableNotFound, format!("no table {ident}")))
    }

    async fn drop_table(&self, _: &TableIdent) -> Result<()> {
        Err(Error::new(ErrorKind::FeatureUnsupported, "export tables cannot be dropped through Statehouse"))
    }

    async fn purge_table(&self, _: &TableIdent) -> Result<()> {
        Err(Error::new(ErrorKind::FeatureUnsupported, "export tables cannot be purged through Statehouse"))
    }

    async fn table_exists(&self, ident: &TableIdent) -> Result<bool> {
        Ok(self.pointer(ident).await?.is_some())
    }

    async fn rename_table(&self, _: &TableIdent, _: &TableIdent) -> Result<()> {
        Err(Error::new(ErrorKind::FeatureUnsupported, "export tables cannot be renamed"))
    }

    async fn register_table(&self, _: &TableIdent, _: String) -> Result<Table> {
        Err(Error::new(ErrorKind::FeatureUnsupported, "the statehouse catalog holds only its export tables"))
    }

    async fn update_table(&self, mut commit: TableCommit) -> Result<Table> {
        let ident = commit.identifier().clone();
        self.commit_updates(&ident, commit.take_requirements(), commit.take_updates()).await
    }
}

impl LibsqlCatalog {
    /// What `update_table` does, for changes iceberg-rust has no transaction
    /// action for (compaction's replace snapshot): the requirements are checked
    /// against the current metadata, the updates applied to it, and the pointer
    /// moved by the same fenced compare-and-set.
    pub async fn commit_updates(
        &self,
        ident: &TableIdent,
        requirements: Vec<TableRequirement>,
        updates: Vec<TableUpdate>,
    ) -> Result<Table> {
        let lease = self.lease()?.clone();
        let current = self.load_table(ident).await?;
        let previous = current.metadata_location_result()?.to_string();
        for requirement in requirements {
            requirement.check(Some(current.metadata()))?;
        }
        let mut builder = current.metadata().clone().into_builder(Some(previous.clone()));
        for update in updates {
            builder = update.apply(builder)?;
        }
        let metadata = builder.build()?.metadata;
        let location =
            MetadataLocation::from_str(&previous)?.with_next_version().with_new_metadata(&metadata).to_string();
        metadata.write_to(&self.file_io, &MetadataLocation::from_str(&location)?).await?;
        let staged = self.table(ident.clone(), location.clone(), metadata)?;
        self.publish(Publish {
            lease,
            namespace: ident.namespace().to_url_string(),
            namespace_location: String::new(),
            name: ident.name().to_string(),
            previous: Some(previous),
            location,
        })
        .await?;
        Ok(staged)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PublishRefused {
    Fenced,
    Moved,
}

/// One fenced change of a metadata pointer (a new table when `previous` is None).
struct Publish {
    lease: HeldLease,
    namespace: String,
    namespace_location: String,
    name: String,
    previous: Option<String>,
    location: String,
}

impl Work for Publish {
    type Output = std::result::Result<(), PublishRefused>;

    fn plan<'a>(
        &'a mut self,
        _: &'a mut Planner,
    ) -> BoxFuture<'a, std::result::Result<std::result::Result<Writes, Self::Output>, StoreError>> {
        let fence = self.lease.assertion(None);
        let table =
            || -> Vec<Value> { vec![CATALOG_NAME.into(), self.namespace.as_str().into(), self.name.as_str().into()] };
        // The compare-and-set, as an assertion: the pointer is still where this change was computed from.
        let (unmoved, statements) = match &self.previous {
            None => (
                Stmt::exec(
                    "INSERT INTO write_assertions (failed) SELECT 'moved' WHERE EXISTS (
                         SELECT 1 FROM iceberg_tables WHERE catalog_name = ?1 AND table_namespace = ?2 AND table_name = ?3)",
                    table(),
                ),
                vec![
                    Stmt::exec(
                        "INSERT OR IGNORE INTO iceberg_namespace_properties
                             (catalog_name, namespace, property_key, property_value)
                         VALUES (?1, ?2, 'exists', 'true'), (?1, ?2, 'location', ?3)",
                        vec![CATALOG_NAME.into(), self.namespace.as_str().into(), self.namespace_location.as_str().into()],
                    ),
                    Stmt::exec(
                        "INSERT INTO iceberg_tables
                             (catalog_name, table_namespace, table_name, metadata_location, previous_metadata_location, iceberg_type)
                         VALUES (?1, ?2, ?3, ?4, NULL, 'TABLE')",
                        [table(), vec![self.location.as_str().into()]].concat(),
                    ),
                ],
            ),
            Some(previous) => (
                Stmt::exec(
                    "INSERT INTO write_assertions (failed) SELECT 'moved' WHERE NOT EXISTS (
                         SELECT 1 FROM iceberg_tables WHERE catalog_name = ?1 AND table_namespace = ?2 AND table_name = ?3
                           AND metadata_location = ?4)",
                    [table(), vec![previous.as_str().into()]].concat(),
                ),
                vec![Stmt::exec(
                    "UPDATE iceberg_tables SET metadata_location = ?4, previous_metadata_location = ?5
                     WHERE catalog_name = ?1 AND table_namespace = ?2 AND table_name = ?3",
                    [table(), vec![self.location.as_str().into(), previous.as_str().into()]].concat(),
                )],
            ),
        };
        Box::pin(async move { Ok(Ok(Writes { assertions: vec![fence, unmoved], statements })) })
    }

    fn settle(&mut self, settled: Settled<'_>, _: &ResidentState) -> Self::Output {
        match settled {
            Settled::Committed(_) => Ok(()),
            Settled::Refused(0) => Err(PublishRefused::Fenced),
            Settled::Refused(_) => Err(PublishRefused::Moved),
        }
    }
}
