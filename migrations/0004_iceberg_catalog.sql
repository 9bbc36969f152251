-- The Iceberg catalog, in the table shape of the Iceberg SQL/JDBC catalog, so
-- PyIceberg's SqlCatalog (and Java's JdbcCatalog) can open this database as
-- it is. The exporter moves `metadata_location` by compare-and-set, in a
-- transaction that checks its fence; the rows it published are deleted later.
CREATE TABLE IF NOT EXISTS iceberg_tables (
    catalog_name               VARCHAR(255)  NOT NULL,
    table_namespace            VARCHAR(255)  NOT NULL,
    table_name                 VARCHAR(255)  NOT NULL,
    metadata_location          VARCHAR(1000),
    previous_metadata_location VARCHAR(1000),
    iceberg_type               VARCHAR(5),
    PRIMARY KEY (catalog_name, table_namespace, table_name)
);

CREATE TABLE IF NOT EXISTS iceberg_namespace_properties (
    catalog_name   VARCHAR(255)  NOT NULL,
    namespace      VARCHAR(255)  NOT NULL,
    property_key   VARCHAR(255)  NOT NULL,
    property_value VARCHAR(1000),
    PRIMARY KEY (catalog_name, namespace, property_key)
);

-- When a row was committed (Unix ms), for the export lag; events carry the
-- client's own time in `ts`. Rows written before this migration have none.
ALTER TABLE outbox ADD COLUMN committed_ms INTEGER;

-- The exporter reads each table's rows in commit order.
CREATE INDEX outbox_by_kind ON outbox (kind, seq);
