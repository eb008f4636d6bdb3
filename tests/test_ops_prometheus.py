"""A real Prometheus server (Debian's `prometheus`, installed by scripts/ops_tools.sh) on a
localhost port, scraping processes of ours and loading our alert rules.

``prometheus`` is a fixture factory: ``prometheus({"policy": ["127.0.0.1:9101"], ...})``
starts a server whose scrape config gives each target the label ``rlhf_component`` (as the
chart's ServiceMonitor does), waits until it is ready, and returns a ``Prometheus`` with
``query``, ``wait_for``, ``metric_names``, ``metadata`` and ``rules``. Here it scrapes small processes the
test starts; tests of the running services reuse it to check that every metric in
dashboards/metrics.txt is exposed. ``promtool_check_metrics`` lints an exposition the way
`promtool check metrics` does (names, suffixes, help texts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf.kafka_local import free_port

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
READY_LINE = "Server is ready to receive web requests."

Result = list[dict[str, Any]]


def poll(
    fetch: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float, *, what: str
) -> Any:
    """Calls ``fetch`` until ``done`` accepts its result.

    Prometheus offers no notification of a completed scrape or rule evaluation, so this asks
    again every 200 ms until the deadline.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = fetch()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} still gives {result} after {timeout_s}s")
        time.sleep(0.2)


class Prometheus:
    """One Prometheus server process; see the module docstring."""

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        targets: Mapping[str, Sequence[str]],
        rule_files: Sequence[Path] = (),
        scrape_interval_s: int = 1,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {
                "scrape_interval": f"{scrape_interval_s}s",
                "scrape_timeout": f"{scrape_interval_s}s",
                "evaluation_interval": f"{scrape_interval_s}s",
            },
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {
                    "job_name": "rlhf",
                    "static_configs": [
                        {"targets": list(addresses), "labels": {"rlhf_component": component}}
                        for component, addresses in targets.items()
                    ],
                }
            ],
        }
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self._log: list[str] = []
        self._ready = threading.Event()
        self._process = subprocess.Popen(
            [
                str(binary),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Prometheus logs to stderr; reading it continuously also keeps the pipe from filling.
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self._log.append(line.rstrip())
            if READY_LINE in line:
                self._ready.set()
        self._ready.set()  # exited: wake the waiter, which then sees the process is gone

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        if not self._ready.wait(timeout_s) or self._process.poll() is not None:
            log = "\n".join(self._log[-30:])
            raise RuntimeError(f"prometheus did not become ready within {timeout_s}s:\n{log}")

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> Result:
        """The instant vector ``expr`` evaluates to now (``/api/v1/query``)."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def wait_for(
        self,
        expr: str,
        done: Callable[[Result], bool] = bool,
        timeout_s: float = 30.0,
    ) -> Result:
        """Re-evaluates ``expr`` until ``done(result)`` (default: non-empty)."""
        return poll(lambda: self.query(expr), done, timeout_s, what=repr(expr))

    def metric_names(self) -> set[str]:
        """Every metric name Prometheus has stored samples for (scraped and recorded)."""
        return set(self.api("label/__name__/values"))

    def metadata(self) -> dict[str, str]:
        """{family name: type} from the targets' ``# TYPE`` lines (``/api/v1/metadata``).

        Unlike ``metric_names`` this includes labelled metrics that have no sample yet (a
        counter of errors before the first error), so it shows what a process *declares*
        without having to drive traffic through every code path. Names are as exposed:
        counters with ``_total``, histograms by base name, as in dashboards/metrics.txt.
        """
        declared = {}
        for name, entries in self.api("metadata").items():
            kind = entries[0]["type"]
            # Prometheus scrapes OpenMetrics, whose counter families drop the _total suffix
            # that every sample of theirs carries.
            if kind == "counter" and not name.endswith("_total"):
                name += "_total"
            declared[name] = kind
        return declared

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=10)


def promtool_check_metrics(promtool: Path, url: str) -> str:
    """Fetches ``url`` and returns promtool's complaints about it ("" when clean)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    done = subprocess.run(
        [str(promtool), "check", "metrics"], input=text, capture_output=True, text=True
    )
    return (done.stdout + done.stderr).strip() if done.returncode else ""


@pytest.fixture(scope="session")
def prometheus_binary() -> Path:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "ops_tools.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "OPS_PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    settings = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return Path(settings["OPS_BIN"]) / "prometheus"


@pytest.fixture
def prometheus(
    prometheus_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: Mapping[str, Sequence[str]], rule_files: Sequence[Path] = ()) -> Prometheus:
        server = Prometheus(
            prometheus_binary, tmp_path_factory.mktemp("prometheus"), targets, rule_files
        )
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


# A process exposing a few metrics the way the services do: a fresh registry served by
# prometheus_client's HTTP server on a free port, which it prints; it serves until stdin closes.
EXPORTER = """
import sys
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

registry = CollectorRegistry()
component = sys.argv[1]
requests = Counter(f"rlhf_{component}_requests_total", "calls", ["method", "code"], registry=registry)
requests.labels("rlhf.v1.Demo/Call", "OK").inc(int(sys.argv[2]))
Gauge(f"rlhf_{component}_queue_size", "queued", registry=registry).set(7)
# Declared, never incremented: exposed as # HELP/# TYPE lines only.
Counter(f"rlhf_{component}_errors_total", "errors", ["reason"], registry=registry)
server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
print(server.server_port, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def exporters() -> Iterator[Callable[[str, int], str]]:
    """Starts exporter processes; returns each one's host:port."""
    processes: list[subprocess.Popen[str]] = []

    def start(component: str, calls: int) -> str:
        process = subprocess.Popen(
            [sys.executable, "-c", EXPORTER, component, str(calls)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        assert process.stdout is not None
        port = process.stdout.readline().strip()
        assert port.isdigit(), f"exporter for {component} did not start"
        return f"127.0.0.1:{port}"

    yield start
    for process in processes:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=30)


def test_prometheus_scrapes_our_processes_and_evaluates_our_rules(
    prometheus: Callable[..., Prometheus],
    exporters: Callable[[str, int], str],
    prometheus_binary: Path,
) -> None:
    policy = exporters("policy", 3)
    trainer = exporters("trainer", 5)
    server = prometheus({"policy": [policy], "trainer": [trainer]}, rule_files=[RULES])

    # A metric from each target, through the HTTP API, with the component label the rules use.
    up = server.wait_for("up == 1", lambda r: len(r) == 2)
    assert {(s["metric"]["rlhf_component"], s["metric"]["instance"]) for s in up} == {
        ("policy", policy),
        ("trainer", trainer),
    }
    [calls] = server.wait_for('rlhf_policy_requests_total{code="OK"}')
    assert calls["metric"]["rlhf_component"] == "policy"
    assert calls["value"][1] == "3"
    [calls] = server.wait_for("rlhf_trainer_requests_total")
    assert calls["value"][1] == "5"
    assert {"rlhf_policy_queue_size", "rlhf_trainer_queue_size"} <= server.metric_names()
    # What the processes declare, samples or not: the check for dashboards/metrics.txt.
    declared = poll(
        server.metadata,
        lambda m: {"rlhf_policy_errors_total", "rlhf_trainer_errors_total"} <= set(m),
        30,
        what="metadata",
    )
    assert declared["rlhf_policy_errors_total"] == "counter"
    assert "rlhf_policy_errors_total" not in server.metric_names()
    promtool = prometheus_binary.parent / "promtool"
    assert promtool_check_metrics(promtool, f"http://{policy}/metrics") == ""

    # The alert rules load and evaluate: with no reward or feedback target, those two (and
    # only those) are absent, pending for their 10 minutes.
    rules = server.rules()
    expected = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(expected)
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    absent = server.wait_for(
        'ALERTS{alertname="RLHFComponentAbsent"}',
        lambda r: {s["metric"]["rlhf_component"] for s in r} == {"reward", "feedback"},
    )
    assert {s["metric"]["alertstate"] for s in absent} == {"pending"}
