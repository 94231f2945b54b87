# Masking plans belong to the object they were made for: every statement shape of the
# corpus (derived values, casts, arrays, encodings, numbers, CTEs, subqueries, views,
# whole rows, composites, set operations, windows, lateral joins) through every client
# mode (psql; psycopg text, binary, prepare=True three times, named cursor; asyncpg
# statement cache three times and cursor; raw Parse+Sync then Bind/Execute later;
# pipelines with interleaved portals and a re-Parse), checked against Postgres itself.
import pytest
from mask_corpus import (
    CLEAN,
    MASKS,
    MODES,
    SHAPES,
    check,
    direct_mode,
    run_mode,
    seed,
)


@pytest.fixture(scope="module")
def cproxy(pg, tmp_path_factory):
    from conftest import Proxy
    seed(pg)
    p = Proxy(pg, tmp_path_factory.mktemp("mask-objects"), extra=MASKS).start()
    yield p
    p.stop()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES + CLEAN, ids=lambda s: s.id)
def test_matrix(cproxy, pg, psql_bin, mode, shape):
    got, blob = run_mode(mode, cproxy, shape.sql, psql_bin)
    direct = direct_mode(pg, mode, shape.sql) if got is not None else None
    check(shape, got, blob, direct)
