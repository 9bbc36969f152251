"""Reads Statehouse's Iceberg tables through its Iceberg REST catalog, as an
analyst would: DuckDB `ATTACH ... (TYPE iceberg)` and PyIceberg `RestCatalog`,
and prints what each saw as JSON. Driven by tests/analytics.rs.

Input (stdin, JSON):
  endpoint      the catalog's URI, e.g. http://127.0.0.1:8080/iceberg
  token         the bearer token to present, or null (development mode)
  table         "events" | "changes"
  snapshot_ids  snapshots to read besides the current one (time travel)
  filter_ns     a namespace: count its rows with a filtered query
  s3            null, or client-side S3 settings {endpoint, access_key_id, secret_access_key, region}
                (null with an S3 warehouse: the catalog must vend what the readers need)
  refused_tokens  tokens (null = none) with which ATTACH and RestCatalog must fail
  try_commit    true: attempt a commit through RestCatalog, which must be refused
"""

import json
import sys

from pyiceberg.catalog.rest import RestCatalog

from read import COLUMNS, duckdb_connection as local_duckdb, rows_of

WAREHOUSE = "statehouse"


def duckdb_connection():
    con = local_duckdb(None)
    con.execute("LOAD httpfs")
    return con


def attach(con, req, token, alias="lake"):
    """ATTACH the catalog: the one line the README shows (plus the secret holding the token)."""
    options = [f"TYPE iceberg", f"ENDPOINT '{req['endpoint']}'"]
    if token is not None:
        con.execute(f"CREATE OR REPLACE SECRET {alias}_token (TYPE iceberg, TOKEN '{token}')")
        options.append(f"SECRET {alias}_token")
    else:
        options.append("AUTHORIZATION_TYPE 'none'")
    s3 = req.get("s3")
    if s3:
        # Readers bring their own keys: the catalog's config says where the bucket is.
        options.append("ACCESS_DELEGATION_MODE 'none'")
        endpoint = s3["endpoint"].removeprefix("http://")
        con.execute(
            f"""CREATE OR REPLACE SECRET {alias}_s3 (TYPE s3, KEY_ID '{s3["access_key_id"]}',
                SECRET '{s3["secret_access_key"]}', ENDPOINT '{endpoint}', URL_STYLE 'path', USE_SSL false,
                REGION '{s3["region"]}')"""
        )
    con.execute(f"ATTACH '{WAREHOUSE}' AS {alias} ({', '.join(options)})")


def read_duckdb(req):
    con = duckdb_connection()
    attach(con, req, req.get("token"))
    table = f"lake.statehouse.{req['table']}"
    cols = ", ".join(f'"{c}"' for c in COLUMNS[req["table"]])

    def scan(snapshot=None):
        at = f" AT (VERSION => {snapshot})" if snapshot is not None else ""
        cur = con.execute(f"SELECT {cols} FROM {table}{at} ORDER BY seq")
        names = [d[0] for d in cur.description]
        return rows_of([dict(zip(names, r)) for r in cur.fetchall()], req["table"])

    tables = sorted(r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = 'lake'").fetchall())
    count = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    filtered = con.execute(f"SELECT count(*) FROM {table} WHERE ns = ?", [req["filter_ns"]]).fetchone()[0]
    return {
        "tables": tables,
        "rows": scan(),
        "count": count,
        "filtered_count": filtered,
        "at": {str(s): scan(s) for s in req.get("snapshot_ids", [])},
    }


def rest_catalog(req, token):
    props = {"uri": req["endpoint"], "warehouse": WAREHOUSE}
    if token is not None:
        props["token"] = token
    s3 = req.get("s3")
    if s3:
        props.update(
            {
                "s3.endpoint": s3["endpoint"],
                "s3.access-key-id": s3["access_key_id"],
                "s3.secret-access-key": s3["secret_access_key"],
                "s3.region": s3["region"],
            }
        )
    return RestCatalog("statehouse", **props)


def read_pyiceberg(req):
    catalog = rest_catalog(req, req.get("token"))
    table = catalog.load_table(f"statehouse.{req['table']}")
    arrow = table.scan().to_arrow()

    def scan(snapshot=None):
        return rows_of(table.scan(snapshot_id=snapshot).to_arrow().sort_by("seq").to_pylist(), req["table"])

    return {
        "namespaces": [list(ns) for ns in catalog.list_namespaces()],
        "tables": sorted(".".join(t) for t in catalog.list_tables("statehouse")),
        "metadata_location": table.metadata_location,
        "rows": scan(),
        "count": arrow.num_rows,
        "filtered_count": sum(1 for ns in arrow.column("ns").to_pylist() if ns == req["filter_ns"]),
        "snapshots": [s.snapshot_id for s in table.metadata.snapshots],
        "at": {str(s): scan(s) for s in req.get("snapshot_ids", [])},
    }


def refusals(req):
    """What each client says when the catalog refuses it: the message must name the cause."""
    out = {"duckdb_attach": [], "pyiceberg_load": []}
    for token in req.get("refused_tokens", []):
        con = duckdb_connection()
        try:
            attach(con, req, token, alias="refused")
            con.execute(f"SELECT count(*) FROM refused.statehouse.{req['table']}").fetchone()
            out["duckdb_attach"].append(None)
        except Exception as err:  # noqa: BLE001 - the message is what the test checks
            out["duckdb_attach"].append(f"{type(err).__name__}: {err}")
        try:
            rest_catalog(req, token).load_table(f"statehouse.{req['table']}")
            out["pyiceberg_load"].append(None)
        except Exception as err:  # noqa: BLE001
            out["pyiceberg_load"].append(f"{type(err).__name__}: {err}")
    if req.get("try_commit"):
        table = rest_catalog(req, req.get("token")).load_table(f"statehouse.{req['table']}")
        try:
            with table.transaction() as tx:
                tx.set_properties(written_by="an analyst")
            out["pyiceberg_commit"] = None
        except Exception as err:  # noqa: BLE001
            out["pyiceberg_commit"] = f"{type(err).__name__}: {err}"
    return out


def main():
    req = json.load(sys.stdin)
    print(json.dumps({"duckdb": read_duckdb(req), "pyiceberg": read_pyiceberg(req), "refused": refusals(req)}))


if __name__ == "__main__":
    main()
