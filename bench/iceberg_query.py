"""Times DuckDB queries over an Iceberg table (and, if asked, over the same
rows written as one Parquet file), for the compaction bench in bench/main.rs.

Input (stdin, JSON): metadata_location, one_file (a path to write the rows
to, or null), runs. Prints {count, count_ms, filtered_ms[, one_file_count_ms,
one_file_filtered_ms]}, each time the median of `runs`.
"""

import json
import os
import statistics
import sys
import time

import duckdb


def connect():
    site = next(p for p in sys.path if p.endswith("site-packages"))
    extensions = os.path.join(site, "duckdb_ext", "extensions")
    if not os.path.isdir(extensions):
        raise SystemExit(f"DuckDB extensions missing at {extensions}: install tests/iceberg/requirements.txt")
    con = duckdb.connect(config={"extension_directory": extensions, "autoinstall_known_extensions": False})
    con.execute("LOAD iceberg")
    return con


def timed(con, sql, runs):
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = con.execute(sql).fetchall()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def main():
    req = json.load(sys.stdin)
    con = connect()
    runs = req.get("runs", 5)
    source = f"iceberg_scan('{req['metadata_location']}')"
    count = "SELECT count(*) FROM {}"
    # One namespace, one operation, a range of keys: what a dashboard asks.
    filtered = "SELECT count(*), sum(size), max(version) FROM {} WHERE ns = 'ns1' AND op = 'put' AND key LIKE 'k1%'"
    out = {}
    out["count_ms"], rows = timed(con, count.format(source), runs)
    out["count"] = rows[0][0]
    out["filtered_ms"], out["filtered"] = timed(con, filtered.format(source), runs)
    if req.get("one_file"):
        path = req["one_file"]
        con.execute(f"COPY (SELECT * FROM {source} ORDER BY seq) TO '{path}' (FORMAT parquet, COMPRESSION zstd)")
        one = f"read_parquet('{path}')"
        out["one_file_count_ms"], same = timed(con, count.format(one), runs)
        out["one_file_filtered_ms"], same_filtered = timed(con, filtered.format(one), runs)
        if same[0][0] != out["count"] or same_filtered != out["filtered"]:
            raise SystemExit(f"the one file holds other rows: {same} {same_filtered} vs {out}")
    out["filtered"] = [list(r) for r in out["filtered"]]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
