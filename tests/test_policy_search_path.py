# search_path decides which table an unqualified name means, and rules name schemas: for
# identities under a policy it cannot change (startup or in-session) unless the config
# opens it in [policy] settings, for both at once.
from __future__ import annotations

import psycopg
import pytest

import rawpg
from conftest import AGENT, AGENT_PASSWORD


def _guarded(make_proxy):
    p = make_proxy()
    p.stop()
    p.config.write_text(p.config.read_text().replace('agents = "allow"', 'agents = "guarded"'))
    return p.start()


@pytest.mark.parametrize("how", ["param", "options", "options-long", "set", "set_config"])
def test_search_path_refused_by_default(make_proxy, how):
    p = _guarded(make_proxy)
    if how in ("param", "options", "options-long"):
        params = {"param": {"search_path": "pg_temp, public"},
                  "options": {"options": "-c search_path=other"},
                  "options-long": {"options": "--search-path=other"}}[how]
        with pytest.raises(rawpg.LoginError) as ei:
            rawpg.RawClient.connect(p.port, AGENT, AGENT_PASSWORD, **params)
        assert ei.value.fields["C"] == "42501" and "search_path" in ei.value.fields["M"]
        return
    with psycopg.connect(p.dsn(), autocommit=True) as c:
        before = c.execute("SHOW search_path").fetchone()[0]
        sql = {"set": "SET search_path = other, public",
               "set_config": "SELECT set_config('search_path', 'other', false)"}[how]
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as ei:
            c.execute(sql)
        assert "settings" in str(ei.value)
        assert c.execute("SHOW search_path").fetchone()[0] == before


def test_search_path_opened_by_config(make_proxy):
    p = _guarded(make_proxy)
    # the fixture's config already has [policy]: add the key under it
    text = p.config.read_text().replace('agents = "guarded"',
                                        'agents = "guarded"\nsettings = ["search_path"]')
    p.stop()
    p.config.write_text(text)
    p.start()
    c = rawpg.RawClient.connect(p.port, AGENT, AGENT_PASSWORD, search_path="pg_catalog, public")
    try:
        assert rawpg.rows(c.run("SHOW search_path")) == [[b"pg_catalog, public"]]
        assert not rawpg.errors(c.run("SET search_path = public"))
    finally:
        c.close()
