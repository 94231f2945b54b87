# A tiny Prometheus registry: counters, gauges, histograms; merged across worker processes.
"""Metrics for ``GET /metrics`` (Prometheus text exposition format 0.0.4).

The session side registers and updates metrics; the admin server renders them.
Metrics are process-local objects; with ``--workers N`` each worker publishes a
snapshot into the state directory about once a second (:class:`SharedMetrics`) and
whichever worker answers a scrape sums every live worker's counters, gauges and
histograms. Callback gauges (``fn=``) are evaluated by the scraped worker only: use
them for values that are already global, such as pending approvals read from the store.

Example::

    metrics = Registry()
    stmts = metrics.counter("pgguard_statements_total", "Statements by decision",
                            labels=("decision",))
    stmts.inc(decision="allowed")                   # or, faster in a hot path:
    allowed = stmts.labels(decision="allowed"); allowed.inc()
    sessions = metrics.gauge("pgguard_sessions", "Open client sessions")
    sessions.inc(); sessions.dec()
    metrics.gauge("pgguard_approvals_pending", "Held statements waiting",
                  fn=lambda: store.counts()["pending"])
    print(metrics.render())
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DEFAULT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0)

LabelKey = tuple[tuple[str, str], ...]


def _key(labelnames: tuple[str, ...], labels: Mapping[str, object]) -> LabelKey:
    if labelnames and set(labels) != set(labelnames):
        raise ValueError(f"labels must be exactly {', '.join(labelnames)}; got "
                         f"{', '.join(sorted(labels)) or 'none'}")
    for k in labels:
        if not _LABEL.match(k):
            raise ValueError(f"invalid label name {k!r}")
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(key: Iterable[tuple[str, str]], extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in key]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    if float(v).is_integer() and abs(v) < 2 ** 53:
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        self.name = name
        self.help = help
        self.labelnames = tuple(labels)
        self._lock = threading.Lock()
        self._values: dict[LabelKey, Any] = {}

    def samples(self) -> dict[LabelKey, Any]:
        with self._lock:
            return dict(self._values)


class _Child:
    """A metric bound to one label set: ``c = counter.labels(decision="allowed"); c.inc()``."""

    __slots__ = ("_metric", "_key")

    def __init__(self, metric: _Metric, key: LabelKey) -> None:
        self._metric = metric
        self._key = key

    def inc(self, amount: float = 1.0) -> None:
        self._metric._add(self._key, amount)         # type: ignore[attr-defined]

    def dec(self, amount: float = 1.0) -> None:
        self._metric._add(self._key, -amount)        # type: ignore[attr-defined]

    def set(self, value: float) -> None:
        self._metric._set(self._key, value)          # type: ignore[attr-defined]

    def observe(self, value: float) -> None:
        self._metric._observe(self._key, value)      # type: ignore[attr-defined]


class Counter(_Metric):
    """A value that only goes up. Example: ``c.inc(decision="blocked")``, ``c.inc(3)``.

    With ``fn`` the value is read at scrape time instead: ``fn=lambda: notifier.sent``
    or, with labels, ``fn=lambda: {("sent",): 3}`` (tuples of label values, in
    ``labels`` order). Such metrics are global: they are not summed across workers.
    """

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (),
                 fn: Callable[[], float | Mapping[tuple[str, ...], float]] | None = None) -> None:
        super().__init__(name, help, labels)
        self.fn = fn

    def samples(self) -> dict[LabelKey, Any]:
        if self.fn is None:
            return super().samples()
        try:
            value = self.fn()
        except Exception:       # noqa: BLE001 - e.g. the control database is away:
            return {}           # the other series still answer

        if isinstance(value, Mapping):
            return {tuple(zip(self.labelnames, map(str, k))): float(v)
                    for k, v in value.items()}
        return {(): float(value)}

    def labels(self, **labels: object) -> _Child:
        return _Child(self, _key(self.labelnames, labels))

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._add(_key(self.labelnames, labels), amount)

    def _add(self, key: LabelKey, amount: float) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        return self._values.get(_key(self.labelnames, labels), 0.0)


class Gauge(Counter):
    """A value that goes up and down, or is computed at scrape time (``fn``).

    Example: ``g.set(3)``, ``g.inc()``, ``g.dec()``; ``fn=lambda: 7`` or, with labels,
    ``fn=lambda: {("pending",): 3}`` (tuples of label values, in ``labels`` order).
    """

    kind = "gauge"

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        self._add(_key(self.labelnames, labels), amount)

    def dec(self, amount: float = 1.0, **labels: object) -> None:
        self._add(_key(self.labelnames, labels), -amount)

    def set(self, value: float, **labels: object) -> None:
        self._set(_key(self.labelnames, labels), value)

    def _set(self, key: LabelKey, value: float) -> None:
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    """Observations in cumulative buckets. Example: ``h.observe(0.42, decision="approved")``."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (),
                 buckets: Iterable[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        if "le" in self.labelnames:
            raise ValueError("'le' is reserved for histogram buckets")

    def labels(self, **labels: object) -> _Child:
        return _Child(self, _key(self.labelnames, labels))

    def observe(self, value: float, **labels: object) -> None:
        self._observe(_key(self.labelnames, labels), value)

    def _observe(self, key: LabelKey, value: float) -> None:
        with self._lock:
            counts, total, n = self._values.get(key) or ([0] * len(self.buckets), 0.0, 0)
            counts = list(counts)
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            self._values[key] = (counts, total + value, n + 1)


class Registry:
    """Named metrics of one process; ``counter``/``gauge``/``histogram`` return the
    existing metric when the name is already registered (same kind)."""

    def __init__(self, instance: str | None = None) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()
        # labels every rendered series carries (``instance``: this pgguard in a fleet)
        self.const_labels: LabelKey = (("instance", instance),) if instance else ()

    def _get(self, cls: type, name: str, *args: Any, **kw: Any) -> Any:
        with self._lock:
            m = self._metrics.get(name)
            if m is None:
                m = self._metrics[name] = cls(name, *args, **kw)
            elif type(m) is not cls:
                raise ValueError(f"metric {name} is already a {m.kind}")
            return m

    def counter(self, name: str, help: str, labels: Iterable[str] = (),
                fn: Callable[[], Any] | None = None) -> Counter:
        return self._get(Counter, name, help, labels, fn=fn)

    def gauge(self, name: str, help: str, labels: Iterable[str] = (),
              fn: Callable[[], Any] | None = None) -> Gauge:
        return self._get(Gauge, name, help, labels, fn=fn)

    def histogram(self, name: str, help: str, labels: Iterable[str] = (),
                  buckets: Iterable[float] = DEFAULT_BUCKETS) -> Histogram:
        return self._get(Histogram, name, help, labels, buckets=buckets)

    def metrics(self) -> list[_Metric]:
        with self._lock:
            return list(self._metrics.values())

    def snapshot(self) -> dict[str, Any]:
        """This process's values, JSON-ready (callback gauges left out: they are global)."""
        out: dict[str, Any] = {}
        for m in self.metrics():
            if getattr(m, "fn", None) is not None:
                continue
            entry: dict[str, Any] = {"kind": m.kind, "help": m.help,
                                     "samples": [[list(map(list, k)), v]
                                                 for k, v in m.samples().items()]}
            if isinstance(m, Histogram):
                entry["buckets"] = list(m.buckets)
            out[m.name] = entry
        return out

    def render(self, others: Iterable[Mapping[str, Any]] = ()) -> str:
        """The exposition text; ``others`` are other workers' snapshots to add in."""
        merged: dict[str, dict[str, Any]] = {}
        for m in self.metrics():
            merged[m.name] = {"kind": m.kind, "help": m.help, "samples": m.samples(),
                              "buckets": getattr(m, "buckets", None),
                              "local_only": getattr(m, "fn", None) is not None}
        for snap in others:
            for name, entry in snap.items():
                target = merged.setdefault(name, {"kind": entry["kind"], "help": entry["help"],
                                                  "samples": {},
                                                  "buckets": entry.get("buckets"),
                                                  "local_only": False})
                if target["local_only"] or target["kind"] != entry["kind"]:
                    continue
                if target["kind"] == "histogram" and target["buckets"] != entry.get("buckets"):
                    continue
                for raw_key, value in entry["samples"]:
                    key = tuple((k, v) for k, v in raw_key)
                    target["samples"][key] = _merge(target["kind"],
                                                    target["samples"].get(key), value)
        lines: list[str] = []
        const = self.const_labels
        for name in sorted(merged):
            e = merged[name]
            help_text = e["help"].replace("\\", "\\\\").replace("\n", "\\n")
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {e['kind']}")
            for key, value in sorted(e["samples"].items()):
                key = const + key
                if e["kind"] == "histogram":
                    counts, total, n = value
                    for bound, c in zip(e["buckets"], counts):
                        le = 'le="' + _num(bound) + '"'
                        lines.append(f"{name}_bucket{_labels_text(key, le)} {c}")
                    inf = 'le="+Inf"'
                    lines.append(f"{name}_bucket{_labels_text(key, inf)} {n}")
                    lines.append(f"{name}_sum{_labels_text(key)} {_num(total)}")
                    lines.append(f"{name}_count{_labels_text(key)} {n}")
                else:
                    lines.append(f"{name}{_labels_text(key)} {_num(value)}")
        return "\n".join(lines) + "\n"


def _merge(kind: str, a: Any, b: Any) -> Any:
    if a is None:
        return b
    if kind == "histogram":
        return ([x + y for x, y in zip(a[0], b[0])], a[1] + b[1], a[2] + b[2])
    return a + b


class SharedMetrics:
    """Publishes this worker's snapshot to ``<state_dir>/metrics/<pid>.json`` and renders
    the sum over every worker heard from within ``stale_s`` seconds.

    Example::

        shared = SharedMetrics(metrics, state_dir)
        shared.publish()            # the admin server does this every second
        text = shared.render()      # what /metrics answers
    """

    def __init__(self, registry: Registry, state_dir: str | os.PathLike[str],
                 stale_s: float = 10.0) -> None:
        self.registry = registry
        self.dir = Path(state_dir) / "metrics"
        self.stale_s = stale_s
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.workers = registry.gauge("pgguard_workers",
                                      "Worker processes that published metrics recently",
                                      fn=lambda: self._live_count)
        self._live_count = 1

    def _own(self) -> Path:
        return self.dir / f"{os.getpid()}.json"

    def publish(self) -> None:
        path = self._own()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.registry.snapshot()))
        os.replace(tmp, path)

    def others(self) -> list[dict[str, Any]]:
        own = self._own().name
        now = time.time()
        out = []
        for p in self.dir.glob("*.json"):
            if p.name == own:
                continue
            try:
                if now - p.stat().st_mtime > self.stale_s:
                    if now - p.stat().st_mtime > 10 * self.stale_s:
                        p.unlink(missing_ok=True)     # a worker long gone
                    continue
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return out

    def render(self) -> str:
        others = self.others()
        self._live_count = 1 + len(others)
        return self.registry.render(others)

    def remove(self) -> None:
        """Forget this worker's snapshot (at shutdown)."""
        self._own().unlink(missing_ok=True)
