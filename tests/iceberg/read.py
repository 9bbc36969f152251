"""Reads Statehouse's Iceberg tables with two independent readers, DuckDB
(iceberg_scan on a metadata.json) and PyIceberg (SqlCatalog on the libSQL
database file, or the metadata file itself when the database is a server),
and prints what each saw as JSON. Driven by tests/analytics.rs.

Input (stdin, JSON):
  table             "events" | "changes"
  metadata_location the table's current metadata.json
  db_file           the libSQL database file (PyIceberg SqlCatalog), or null
  warehouse         the warehouse location
  snapshot_ids      snapshots to read besides the current one (time travel)
  s3                null, or {endpoint, access_key_id, secret_access_key, region}
  digest            optional: every column of the table instead of COLUMNS, and
                    each scan as {count, seqs, digest} (a SHA-256 of the rows in
                    seq order) instead of the rows (tests/compaction.rs)
"""

import hashlib
import json
import os
import sys

import duckdb
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import StaticTable

COLUMNS = {
    "events": ["seq", "event_id", "ns", "id", "type", "data", "version", "fence", "ts"],
    "changes": ["seq", "ns", "id", "op", "key", "version", "fence", "size", "value", "value_truncated", "ts"],
}


ALL_COLUMNS = {
    "events": COLUMNS["events"] + ["instance", "committed_at"],
    "changes": COLUMNS["changes"] + ["instance", "content_type"],
}


def plain(value):
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def rows_of(dicts, table, digest=False):
    rows = [{c: plain(r[c]) for c in (ALL_COLUMNS if digest else COLUMNS)[table]} for r in dicts]
    if not digest:
        return rows
    rows.sort(key=lambda r: r["seq"])
    summary = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return {"count": len(rows), "seqs": [r["seq"] for r in rows], "digest": summary}


def duckdb_connection(s3):
    site = next(p for p in sys.path if p.endswith("site-packages"))
    extensions = os.path.join(site, "duckdb_ext", "extensions")
    if not os.path.isdir(extensions):
        raise SystemExit(f"DuckDB extensions missing at {extensions}: install tests/iceberg/requirements.txt")
    con = duckdb.connect(config={"extension_directory": extensions, "autoinstall_known_extensions": False})
    con.execute("LOAD iceberg")
    if s3:
        con.execute("LOAD httpfs")
        endpoint = s3["endpoint"].removeprefix("http://")
        con.execute(
            f"""CREATE SECRET statehouse (TYPE s3, KEY_ID '{s3["access_key_id"]}', SECRET '{s3["secret_access_key"]}',
                ENDPOINT '{endpoint}', URL_STYLE 'path', USE_SSL false, REGION '{s3["region"]}')"""
        )
    return con


def read_duckdb(req):
    con = duckdb_connection(req.get("s3"))
    cols = ", ".join(f'"{c}"' for c in (ALL_COLUMNS if req.get("digest") else COLUMNS)[req["table"]])
    meta = req["metadata_location"]

    def scan(snapshot=None):
        extra = f", snapshot_from_id => {snapshot}" if snapshot is not None else ""
        cur = con.execute(f"SELECT {cols} FROM iceberg_scan('{meta}'{extra}) ORDER BY seq")
        names = [d[0] for d in cur.description]
        return rows_of([dict(zip(names, r)) for r in cur.fetchall()], req["table"], req.get("digest"))

    snapshots = [r[0] for r in con.execute(f"SELECT snapshot_id FROM iceberg_snapshots('{meta}')").fetchall()]
    return {
        "rows": scan(),
        "snapshots": snapshots,
        "at": {str(s): scan(s) for s in req.get("snapshot_ids", [])},
    }


def pyiceberg_table(req):
    props = {}
    s3 = req.get("s3")
    if s3:
        props = {
            "s3.endpoint": s3["endpoint"],
            "s3.access-key-id": s3["access_key_id"],
            "s3.secret-access-key": s3["secret_access_key"],
            "s3.region": s3["region"],
        }
    if req.get("db_file"):
        catalog = SqlCatalog(
            "statehouse", uri=f"sqlite:///{req['db_file']}", warehouse=req["warehouse"], **props
        )
        table = catalog.load_table(f"statehouse.{req['table']}")
        if table.metadata_location != req["metadata_location"]:
            raise SystemExit(
                f"SqlCatalog points at {table.metadata_location}, the server at {req['metadata_location']}"
            )
        return table
    return StaticTable.from_metadata(req["metadata_location"], properties=props)


def read_pyiceberg(req):
    table = pyiceberg_table(req)

    def scan(snapshot=None):
        arrow = table.scan(snapshot_id=snapshot).to_arrow().sort_by("seq")
        return rows_of(arrow.to_pylist(), req["table"], req.get("digest"))

    return {
        "rows": scan(),
        "snapshots": [s.snapshot_id for s in table.metadata.snapshots],
        "at": {str(s): scan(s) for s in req.get("snapshot_ids", [])},
    }


def main():
    req = json.load(sys.stdin)
    print(json.dumps({"duckdb": read_duckdb(req), "pyiceberg": read_pyiceberg(req)}))


if __name__ == "__main__":
    main()
