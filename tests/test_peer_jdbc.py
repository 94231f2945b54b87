# pgjdbc through pgguard: tests/peers/JdbcTranscript.java prints what the driver sees
# (prepared statements, batches, CopyManager, notifications, large objects over FunctionCall,
# cancel, fetch size, binary transfer); the transcript through pgguard must equal the direct
# one line for line. The program itself normalises the only server-specific values (backend
# pids become "own"/"other"/"matches"), so the comparison is byte for byte.
from __future__ import annotations

import difflib
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import AGENT, AGENT_PASSWORD, UPSTREAM_PASSWORD, UPSTREAM_USER
from guarded import guarded_proxy

JAR = next((p for p in (Path("/usr/share/java/postgresql.jar"),) if p.exists()), None)
JAVAC = shutil.which("javac")
JAVA = shutil.which("java")
SOURCE = Path(__file__).parent / "peers" / "JdbcTranscript.java"

pytestmark = pytest.mark.skipif(
    JAR is None or JAVAC is None or JAVA is None,
    reason="needs a JDK and pgjdbc (apt-get install default-jdk-headless libpostgresql-jdbc-java;"
           " ./dev test installs them)")


@pytest.fixture(scope="module")
def jdbc_classes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jdbc")
    r = subprocess.run([JAVAC, "-encoding", "UTF-8", "-d", str(out), "-cp", str(JAR), str(SOURCE)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    return out


def transcript(classes: Path, port: int, user: str, password: str) -> list[str]:
    r = subprocess.run([JAVA, "-Dfile.encoding=UTF-8", "-cp", f"{JAR}:{classes}", "JdbcTranscript",
                        "127.0.0.1", str(port), user, password, "postgres"],
                       capture_output=True, timeout=180)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    return r.stdout.decode("utf-8").splitlines()


def diff(a: list[str], b: list[str]) -> str:
    return "\n".join(difflib.unified_diff(a, b, "direct", "pgguard", lineterm="", n=1))


def test_jdbc_transcript_direct_is_complete(pg, jdbc_classes):
    """The program covers what it claims against Postgres itself (no section failed)."""
    direct = transcript(jdbc_classes, pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD)
    assert direct[-1] == "== done"
    assert not [line for line in direct if line.startswith("! ")], direct
    text = "\n".join(direct)
    for expected in ("getBackendPID matches pg_backend_pid: true", "copy in rows 500",
                     "notification jt_chan payload=from-self pid=own",
                     "notification jt_chan payload=from-other pid=other",
                     "lo size 70000", "cancelled -> 57014", "query timeout -> 57014",
                     "fetched 1:1", "batch counts [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]",
                     "failing batch -> 23505", "in tx -> 23505", "aborted tx -> 25P02",
                     "overflow -> 22003", "notice 00000 hello notice"):
        assert expected in text, expected


def test_jdbc_transcript_through_pgguard_equals_direct(pg, proxy, jdbc_classes):
    """An allow identity (no policy, no masks) sees exactly what Postgres gives."""
    direct = transcript(jdbc_classes, pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD)
    through = transcript(jdbc_classes, proxy.port, AGENT, AGENT_PASSWORD)
    assert through == direct, diff(direct, through)
    assert proxy.proc.poll() is None
    assert "Traceback" not in proxy.output()


def _sections(lines: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    name = ""
    for line in lines:
        if line.startswith("== "):
            name = line[3:]
            out[name] = []
        else:
            out.setdefault(name, []).append(line)
    return out


def test_jdbc_transcript_guarded_agent(pg, tmp_path, jdbc_classes):
    """A guarded agent reads exactly what Postgres gives, except what the guarded policy
    refuses (42501): large objects (lo_open for writing / lowrite are destructive). A
    statement the classifier cannot parse is refused (fail closed) with the 42601 Postgres
    answers for it. Everything else, pids and notifications included, is as direct."""
    direct = transcript(jdbc_classes, pg.port, UPSTREAM_USER, UPSTREAM_PASSWORD)
    with guarded_proxy(pg, tmp_path) as gp:
        through = transcript(jdbc_classes, gp.port, AGENT, AGENT_PASSWORD)
        alive = gp.proc.poll() is None
        log = gp.output()
    assert alive and "Traceback" not in log
    d, t = _sections(direct), _sections(through)
    assert list(d) == list(t)
    expected = dict(d)
    expected["large objects"] = ["! large objects 42501"]
    differing = sorted(name for name in d if expected[name] != t[name])
    assert not differing, "\n".join(f"-- {name}\n" + diff(expected[name], t[name])
                                     for name in differing)
