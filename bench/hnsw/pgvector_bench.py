#!/usr/bin/env python3
"""PostgreSQL + pgvector HNSW in the HNSW benchmark: the same vectors, parameters and timing
protocol as the other engines (common.py), through SQL on one loopback connection; prints the
JSON lines described in common.py. Run by run.sh with the system python3 (psycopg 3 + pgvector).

  pgvector_bench.py --url postgres://postgres@127.0.0.1:55440/zrag_test \
      --base B --queries Q --truth T --dim 384 --m 16 --ef-construction 100 \
      --build-threads 2 --search-threads 1 --ef 10,16,24,32,48,64,96,128,192,256

Load   DROP/CREATE TABLE hnsw_bench (id int PRIMARY KEY, embedding vector(dim)); binary COPY of
       the N base rows (id = row number, the ids of truth.i32); VACUUM ANALYZE. Not timed as the
       build (its time is reported as load_seconds).
Build  CREATE INDEX ... USING hnsw (embedding vector_ip_ops) WITH (m = M, ef_construction = EFC)
       with maintenance_work_mem = --maintenance-work-mem (the whole graph in memory: no "graph no
       longer fits" phase) and max_parallel_maintenance_workers = build_threads - 1, i.e. the
       leader plus one worker = 2 processes for --build-threads 2. Timed: that one statement.
       index_bytes = pg_relation_size of the index (main fork: vectors + graph, 8 kB pages);
       the heap (table_bytes) and the primary key (pkey_bytes) are reported separately.
Search SET hnsw.ef_search = ef; one query at a time on one connection,
       SELECT id FROM hnsw_bench ORDER BY embedding <#> $1 LIMIT k (a server-side prepared
       statement, the vector sent in pgvector's binary format, results in binary); recall and
       timing by common.run_searches (warm-up pass, best of timed passes). Every query is a
       client/server round trip over loopback, so q/s includes it; the round-trip floor is
       measured the same way with SELECT 1 (and SELECT 1 with the same vector parameter) and
       printed as an "event": "floor" line. EXPLAIN checks that the plan is an Index Scan on the
       HNSW index, and the index's idx_scan counter must grow by exactly the number of queries
       run ("event": "check"); otherwise the run fails.
"""
import argparse
import importlib.metadata
import json
import re
import sys
import threading
import time

import numpy as np
import psycopg
import psycopg.sql
from pgvector import Vector
from pgvector.psycopg import register_vector

import common
from common import emit, load, log, run_searches

TABLE = "hnsw_bench"
INDEX = "hnsw_bench_embedding_hnsw"


def parse_args():
    # common.parse_args plus the PostgreSQL settings; parse ours first, hand the rest on.
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --m is not --maintenance-work-mem
    ap.add_argument("--url", default="postgres://postgres@127.0.0.1:55440/zrag_test")
    ap.add_argument("--maintenance-work-mem", default="8GB")
    ap.add_argument("--keep-table", action="store_true",
                    help="reuse the table + index of an earlier run if it has N rows (no load, no build; the "
                         "build line saved as the index's comment is printed again with \"reused\": true)")
    own, rest = ap.parse_known_args()
    sys.argv = [sys.argv[0]] + rest
    a = common.parse_args("pgvector")
    for k, v in vars(own).items():
        setattr(a, k, v)
    return a


def shorten(plan):
    """EXPLAIN output with the 384 numbers of the query vector left out."""
    return re.sub(r"'\[[^\]]{40,}\]'", "'[...]'", plan)


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


def copy_base(conn, base):
    """Binary COPY: per row int16 field count, then (int32 length, value) per field; a vector
    value is int16 dim, int16 unused (0), dim float4, all big-endian (pgvector's vector_recv)."""
    n, dim = base.shape
    row = np.dtype([("nf", ">i2"), ("l1", ">i4"), ("id", ">i4"), ("l2", ">i4"),
                    ("dim", ">i2"), ("unused", ">i2"), ("v", ">f4", (dim,))])
    t = time.perf_counter()
    with conn.cursor() as cur:
        with cur.copy(f"COPY {TABLE} (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as cp:
            cp.write(b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big"))
            block = 50_000
            for s in range(0, n, block):
                e = min(n, s + block)
                r = np.zeros(e - s, row)
                r["nf"], r["l1"], r["id"], r["l2"] = 2, 4, np.arange(s, e), 4 + 4 * dim
                r["dim"], r["v"] = dim, base[s:e]
                cp.write(r.tobytes())
                if (e // block) % 5 == 0 or e == n:
                    log(f"pgvector: copied {e:,}/{n:,} rows, {time.perf_counter() - t:.0f} s")
            cp.write((-1).to_bytes(2, "big", signed=True))
    conn.commit()
    return time.perf_counter() - t


def progress(url, stop):
    """Logs pg_stat_progress_create_index every 30 s during the build (own connection)."""
    try:
        with psycopg.connect(url, autocommit=True) as c:
            t = time.perf_counter()
            while not stop.wait(30):
                r = c.execute("SELECT phase, tuples_done, tuples_total FROM pg_stat_progress_create_index").fetchall()
                log(f"pgvector: build {time.perf_counter() - t:.0f} s: {r}")
    except Exception as e:  # progress is informational only
        log(f"pgvector: progress monitor stopped: {e}")


def build(a, conn, base):
    n, dim = base.shape
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, embedding vector({dim}))")
    conn.commit()
    load_s = copy_base(conn, base)
    log(f"pgvector: loaded {n:,} rows in {load_s:.1f} s")
    conn.autocommit = True
    t = time.perf_counter()
    conn.execute(f"VACUUM (ANALYZE) {TABLE}")
    conn.execute("CHECKPOINT")
    log(f"pgvector: vacuum analyze + checkpoint {time.perf_counter() - t:.1f} s")
    workers = max(0, a.build_threads - 1)
    conn.execute(f"SET maintenance_work_mem = '{a.maintenance_work_mem}'")
    conn.execute(f"SET max_parallel_maintenance_workers = {workers}")
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    stop = threading.Event()
    mon = threading.Thread(target=progress, args=(a.url, stop), daemon=True)
    mon.start()
    log(f"pgvector: CREATE INDEX (m = {a.m}, ef_construction = {a.ef_construction}), "
        f"maintenance_work_mem {a.maintenance_work_mem}, max_parallel_maintenance_workers {workers}")
    t = time.perf_counter()
    conn.execute(f"CREATE INDEX {INDEX} ON {TABLE} USING hnsw (embedding vector_ip_ops) "
                 f"WITH (m = {a.m}, ef_construction = {a.ef_construction})")
    seconds = time.perf_counter() - t
    stop.set()
    for m in notices:
        log(f"pgvector: NOTICE {m}")
    return seconds, load_s, notices


def sizes(conn):
    return {
        "index_bytes": int(one(conn, f"SELECT pg_relation_size('{INDEX}')")),
        "table_bytes": int(one(conn, f"SELECT pg_table_size('{TABLE}')")),
        "pkey_bytes": int(one(conn, f"SELECT pg_relation_size('{TABLE}_pkey')")),
    }


def idx_scans(conn, url):
    """idx_scan of the HNSW index, read on a second connection. A backend publishes its counters
    when it goes idle at least 1 s after its last flush (PostgreSQL 15 cumulative statistics), so:
    wait, run one statement on the search connection, wait, then read."""
    time.sleep(1.2)
    conn.execute("SELECT 1")
    time.sleep(0.3)
    with psycopg.connect(url, autocommit=True) as c:
        return int(one(c, "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = %s", (INDEX,)))


def timed_floor(conn, sql, params, q, a):
    """The search protocol for a statement without index work: warm-up, then best of passes."""
    best, total, passes = float("inf"), 0.0, 0
    for _ in range(a.rounds):
        for _ in range(q):
            conn.execute(sql, params, prepare=True, binary=True).fetchall()
        start, p = time.perf_counter(), 0
        while p < a.min_passes or time.perf_counter() - start < a.min_seconds:
            t = time.perf_counter()
            for _ in range(q):
                conn.execute(sql, params, prepare=True, binary=True).fetchall()
            d = time.perf_counter() - t
            best, total, passes, p = min(best, d), total + d, passes + 1, p + 1
    return {"qps": round(q / best, 1), "us": round(best / q * 1e6, 1), "qps_mean": round(q * passes / total, 1)}


def main():
    a = parse_args()
    base, queries, truth = load(a)
    n, q, k = len(base), len(queries), a.k
    conn = psycopg.connect(a.url)
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    conn.commit()
    register_vector(conn)
    versions = {
        "postgres": one(conn, "SHOW server_version"),
        "pgvector": one(conn, "SELECT extversion FROM pg_extension WHERE extname = 'vector'"),
        "psycopg": psycopg.__version__,
        "pgvector_python": importlib.metadata.version("pgvector"),
    }
    settings = {s: one(conn, f"SHOW {s}") for s in
                ("shared_buffers", "max_worker_processes", "max_parallel_workers", "fsync", "wal_level")}
    log(f"pgvector: {versions}, {settings}")

    existing = one(conn, "SELECT count(*) FROM pg_class WHERE relname = %s", (INDEX,))
    reuse = a.keep_table and existing and one(conn, f"SELECT count(*) FROM {TABLE}") == n
    conn.commit()
    if reuse:
        log(f"pgvector: --keep-table: reusing {TABLE} and {INDEX} (no build)")
        conn.autocommit = True
        seconds, load_s, notices = None, None, []
        saved = one(conn, "SELECT obj_description(%s::regclass, 'pg_class')", (INDEX,))
    else:
        seconds, load_s, notices = build(a, conn, base)
    del base
    sz = sizes(conn)
    build_line = {"engine": "pgvector", "event": "build", "n": n, "dim": a.dim, "m": a.m,
                  "ef_construction": a.ef_construction, "threads": a.build_threads,
                  "seconds": round(seconds, 3) if seconds is not None else None, **sz,
                  "load_seconds": round(load_s, 3) if load_s is not None else None,
                  "maintenance_work_mem": a.maintenance_work_mem,
                  "max_parallel_maintenance_workers": max(0, a.build_threads - 1),
                  "notices": notices, **settings,
                  "version": f"PostgreSQL {versions['postgres']} + pgvector {versions['pgvector']} "
                             f"(psycopg {versions['psycopg']}, pgvector-python {versions['pgvector_python']})"}
    if seconds is not None:
        emit(build_line)
        # the build line goes with the index, for later runs with --keep-table
        conn.execute(f"COMMENT ON INDEX {INDEX} IS {psycopg.sql.quote(json.dumps(build_line))}")
        log(f"pgvector: built {n} x {a.dim} in {seconds:.1f} s ({a.build_threads} processes); "
            f"index {sz['index_bytes']:,} B ({sz['index_bytes'] / n:,.0f} B/vector), "
            f"table {sz['table_bytes']:,} B, primary key {sz['pkey_bytes']:,} B")
    else:
        old = json.loads(saved) if saved else None
        if old and (old["n"], old["m"], old["ef_construction"]) == (n, a.m, a.ef_construction):
            emit({**old, **sz, "reused": True})
            log(f"pgvector: reused index, its build line: {old['seconds']} s; sizes {sz}")
        else:
            log(f"pgvector: sizes {sz} (no build line: the index was reused and carries none)")

    # search session: warm the caches the way the other engines have their index in memory
    conn.execute("SET jit = off")
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        pages = [one(conn, "SELECT pg_prewarm(%s::regclass)", (r,)) for r in (INDEX, TABLE)]
        log(f"pgvector: pg_prewarm index + table: {pages} pages")
    except psycopg.Error as e:
        log(f"pgvector: no pg_prewarm ({e}), the warm-up passes fill the cache")
    sql = f"SELECT id FROM {TABLE} ORDER BY embedding <#> %b LIMIT {k}"
    qv = [Vector(v) for v in queries]

    # the plan: an index scan on the HNSW index
    conn.execute("SET hnsw.ef_search = 40")
    plan = shorten("\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, (qv[0],)).fetchall()))
    log("pgvector: EXPLAIN\n" + plan)
    if f"Index Scan using {INDEX}" not in plan:
        sys.exit(f"pgvector: the plan does not use {INDEX}")

    def set_ef(ef):
        conn.execute(f"SET hnsw.ef_search = {int(ef)}")

    calls = [0]

    def search_all():
        out = np.full((q, k), -1, np.int64)
        for i in range(q):
            rows = conn.execute(sql, (qv[i],), prepare=True, binary=True).fetchall()
            out[i, :len(rows)] = [r[0] for r in rows]
        calls[0] += q
        return out

    floor_before = timed_floor(conn, "SELECT 1", None, q, a)
    log(f"pgvector: round-trip floor SELECT 1: {floor_before['qps']:,.0f} q/s ({floor_before['us']} us)")
    scans0 = idx_scans(conn, a.url)
    a.mode = "loop"  # one SQL statement per query, whatever run.sh's MODE says
    run_searches("pgvector", a, set_ef, search_all, truth)
    scans = idx_scans(conn, a.url) - scans0
    # the prepared statement's plan after all those executions (generic or custom): EXPLAIN the
    # same statement via a plain SQL PREPARE executed as often as psycopg's
    conn.execute(f"PREPARE hnsw_q(vector) AS SELECT id FROM {TABLE} ORDER BY embedding <#> $1 LIMIT {k}")
    # (EXECUTE takes no bind parameters: the vectors go in as literals)
    for i in range(10):
        conn.execute(f"EXECUTE hnsw_q('{qv[i].to_text()}')")
    plan2 = "\n".join(r[0] for r in conn.execute(f"EXPLAIN EXECUTE hnsw_q('{qv[0].to_text()}')").fetchall())
    plan2 = shorten(plan2)
    log("pgvector: EXPLAIN EXECUTE (prepared, after 10 executions)\n" + plan2)
    floor_after = timed_floor(conn, "SELECT 1", None, q, a)
    floor_param = timed_floor(conn, "SELECT 1 WHERE %b::vector IS NOT NULL", (qv[0],), q, a)
    log(f"pgvector: round-trip floor SELECT 1 after: {floor_after['qps']:,.0f} q/s ({floor_after['us']} us); "
        f"with the vector parameter: {floor_param['qps']:,.0f} q/s ({floor_param['us']} us)")
    emit({"engine": "pgvector", "event": "floor", "what": "SELECT 1, prepared, binary, 1 connection, loopback",
          "before": floor_before, "after": floor_after,
          "with_vector_param": {"sql": "SELECT 1 WHERE $1::vector IS NOT NULL", **floor_param}, "q": q})
    ok = scans == calls[0] and f"Index Scan using {INDEX}" in plan2
    emit({"engine": "pgvector", "event": "check", "explain": plan, "explain_prepared": plan2,
          "queries_run": calls[0], "idx_scan_delta": scans, "index_used_by_every_query": ok})
    log(f"pgvector: {calls[0]} queries run, idx_scan of {INDEX} grew by {scans}")
    conn.close()
    if not ok:
        sys.exit("pgvector: not every query used the HNSW index")


if __name__ == "__main__":
    main()
