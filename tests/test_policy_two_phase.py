# Red team, round 17 (helper 82): two-phase commit was allowed to agents. PREPARE
# TRANSACTION takes a transaction out of the session (its changes and locks outlive it,
# and any session may commit it later); COMMIT / ROLLBACK PREPARED decide a prepared
# transaction that may be another session's. Refused to agents now, through every client;
# judged by the refusal's rule and the rows upstream (the test server may have
# max_prepared_transactions = 0, where Postgres refuses them too, so the refusal must be
# pgguard's).
import pytest
from each_client import MODES, said
from test_policy_guard_cache import guarded, schema  # noqa: F401  (fixtures)

STATEMENTS = [
    "PREPARE TRANSACTION 'rt17a'",
    "prepare   transaction 'rt17b'",
    "COMMIT PREPARED 'rt17a'",
    "ROLLBACK PREPARED 'rt17a'",
    "BEGIN; INSERT INTO gc_items VALUES (50, 'two-phase'); PREPARE TRANSACTION 'rt17c'",
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("i", range(len(STATEMENTS)))
def test_two_phase_commit_is_refused_to_agents(guarded, pg, psql_bin, mode, i):  # noqa: F811
    out = said(mode, guarded, [STATEMENTS[i]], db="appdb", psql_bin=psql_bin)
    assert 'pgguard: statement refused by rule' in out, (mode, out)
    assert pg.execute("SELECT count(*) FROM gc_items WHERE id = 50", dbname="appdb")[0][0] == 0
    assert pg.execute("SELECT count(*) FROM pg_prepared_xacts")[0][0] == 0
