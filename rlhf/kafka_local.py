"""A real Apache Kafka broker for development, tests and the demo.

Resolves the broker's jars from Maven Central once (into the cache directory), formats KRaft
storage and runs a single node that is both broker and controller. Production points the
services at any external cluster instead; nothing here is used there.

    rlhf kafka start   # background broker on 127.0.0.1:9092 with the system's topics,
                       # data under .rlhf/kafka
    rlhf kafka status
    rlhf kafka stop
    rlhf kafka run     # the same in the foreground, Ctrl-C stops it
    rlhf kafka topics --bootstrap-servers HOST:PORT [--replication-factor 3]
                       # creates the system's topics (and their .dlq topics) on any cluster
                       # where they are missing; the brokers never create them on their own
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path

KAFKA_VERSION = "4.3.1"
LOG4J_VERSION = "2.24.3"

_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>rlhf.local</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{LOG4J_VERSION}</version>
    </dependency>
  </dependencies>
</project>
"""

# Properties, not YAML: log4j2's YAML support needs jackson-dataformat-yaml on the classpath.
_LOG4J2 = """status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""

_READY_LINE = "Kafka Server started"


class KafkaSetupError(RuntimeError):
    """The broker could not be installed or started; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf"))


def _require(tool: str, install_hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise KafkaSetupError(f"{tool} not found: install {install_hint}")
    return path


def ensure_jars(cache: Path | None = None) -> Path:
    """Returns the directory of broker jars, downloading them with Maven on first use."""
    libs = (cache or cache_dir()) / f"kafka-{KAFKA_VERSION}" / "libs"
    if (libs / ".complete").exists():
        return libs
    java = _require("java", "a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)")
    del java
    mvn = _require("mvn", "Apache Maven (e.g. apt-get install maven)")
    libs.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=libs.parent) as tmp:
        pom = Path(tmp) / "pom.xml"
        pom.write_text(_POM)
        out = Path(tmp) / "libs"
        proc = subprocess.run(
            [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={out}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
            raise KafkaSetupError(f"maven could not resolve Kafka {KAFKA_VERSION} jars:\n{tail}")
        (out / ".complete").touch()
        # Another process may have finished first; either copy is complete.
        if not (libs / ".complete").exists():
            shutil.rmtree(libs, ignore_errors=True)
            out.rename(libs)
    return libs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalKafka:
    """One single-node KRaft broker+controller process with its data in ``data_dir``."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int = 9092,
        controller_port: int = 9093,
        heap: str = "512m",
        cache: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.controller_port = controller_port
        self.heap = heap
        self.cache = cache
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    def _write_config(self) -> Path:
        logs = self.data_dir / "logs"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(logs),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2)
        return path

    def _java(self, libs: Path, *args: str, heap: str | None = None) -> list[str]:
        java = _require("java", "a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)")
        cmd = [java]
        if heap:
            cmd += [f"-Xmx{heap}", f"-Xms{heap}"]
        cmd += [
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp", f"{libs}/*", *args,
        ]  # fmt: skip
        return cmd

    def _format(self, libs: Path, config: Path) -> None:
        if (self.data_dir / "logs" / "meta.properties").exists():
            return
        cluster_id = _kafka_uuid()
        proc = subprocess.run(
            self._java(libs, "kafka.tools.StorageTool", "format", "--standalone",
                       # "=": a random id may start with "-".
                       f"--cluster-id={cluster_id}", "-c", str(config)),
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise KafkaSetupError(f"formatting KRaft storage failed:\n{proc.stdout}{proc.stderr}")

    def start(self, timeout_s: float = 90.0) -> None:
        """Starts the broker and returns once it serves; raises with its last log lines if not."""
        if self.is_running():
            return
        for port in (self.port, self.controller_port):
            if _port_open(port):
                raise KafkaSetupError(f"port {port} is already in use; choose another port")
        libs = ensure_jars(self.cache)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        self._format(libs, config)
        log = self.log_file.open("ab")
        offset = self.log_file.stat().st_size
        self._proc = subprocess.Popen(
            self._java(libs, "kafka.Kafka", str(config), heap=self.heap),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.pid_file.write_text(str(self._proc.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise KafkaSetupError(
                    f"broker exited with code {self._proc.returncode}:\n{self.log_tail()}"
                )
            if _READY_LINE in self._log_since(offset) and _port_open(self.port):
                return
            time.sleep(0.2)
        self.stop()
        raise KafkaSetupError(f"broker not serving after {timeout_s:.0f}s:\n{self.log_tail()}")

    def _log_since(self, offset: int) -> str:
        with self.log_file.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_file.exists():
            return "(no broker log)"
        with self.log_file.open(errors="replace") as f:
            return "".join(deque(f, maxlen=lines))

    def _pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return pid

    def is_running(self) -> bool:
        return self._pid() is not None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the broker (SIGTERM: controlled shutdown, then SIGKILL after the timeout)."""
        pid = self._pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        os.kill(pid, signal.SIGTERM)
        if not self._wait_gone(pid, timeout_s):
            os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid, 10.0)
        self._proc = None
        self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """Kills the broker without a controlled shutdown, as a crash would."""
        pid = self._pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            self._wait_gone(pid, 10.0)
        self._proc = None
        self.pid_file.unlink(missing_ok=True)

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                try:
                    self._proc.wait(timeout=0.2)
                    return True
                except subprocess.TimeoutExpired:
                    continue
            try:
                os.kill(pid, 0)
            except OSError:
                return True
            time.sleep(0.2)
        return False


def _kafka_uuid() -> str:
    """A Kafka cluster id: a random UUID in URL-safe base64 without padding, as random-uuid prints."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def create_topics(bootstrap_servers: str, replication_factor: int = 1, prefix: str = "") -> int:
    """``rlhf kafka topics``: creates the missing topics of ``rlhf.topics`` (named with the
    deployment's ``streams.topic_prefix``) and says which."""
    from rlhf import bus
    from rlhf.topics import Topics

    try:
        created = bus.ensure_topics(
            bootstrap_servers,
            Topics.with_prefix(prefix).all(),
            replication_factor=replication_factor,
        )
    except (bus.KafkaUnavailable, bus.KafkaError) as exc:
        print(f"error: {exc}", flush=True)
        return 1
    if created:
        print(f"created on {bootstrap_servers}: {', '.join(created)}")
    else:
        print(f"every topic exists on {bootstrap_servers}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhf kafka", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("action", choices=["start", "stop", "status", "run", "topics"])
    parser.add_argument("--data-dir", default=os.environ.get("RLHF_KAFKA_DATA_DIR", ".rlhf/kafka"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("RLHF_KAFKA_PORT", "9092")))
    parser.add_argument("--controller-port", type=int,
                        default=int(os.environ.get("RLHF_KAFKA_CONTROLLER_PORT", "9093")))  # fmt: skip
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for start")
    parser.add_argument("--bootstrap-servers", default="",
                        help="topics: the cluster (default: the local broker, 127.0.0.1:PORT)")  # fmt: skip
    parser.add_argument("--replication-factor", type=int, default=1,
                        help="topics: replicas per partition (production: 3)")  # fmt: skip
    parser.add_argument("--streams.topic-prefix", dest="topic_prefix",
                        default=os.environ.get("RLHF_STREAMS__TOPIC_PREFIX", ""),
                        help="topics: the deployment's topic prefix (env RLHF_STREAMS__TOPIC_PREFIX)")  # fmt: skip
    args = parser.parse_args(argv)
    broker = LocalKafka(args.data_dir, port=args.port, controller_port=args.controller_port)
    if args.action == "topics":
        return create_topics(
            args.bootstrap_servers or broker.bootstrap_servers,
            args.replication_factor,
            args.topic_prefix,
        )
    try:
        if args.action == "status":
            running = broker.is_running()
            print(f"kafka {'running' if running else 'stopped'} ({broker.bootstrap_servers}, "
                  f"data {broker.data_dir})")  # fmt: skip
            return 0 if running else 3
        if args.action == "stop":
            broker.stop()
            print("kafka stopped")
            return 0
        broker.start(timeout_s=args.timeout)
        print(
            f"kafka {KAFKA_VERSION} serving on {broker.bootstrap_servers} (data {broker.data_dir})"
        )
        # A local broker is for running the system: give it the system's topics.
        if create_topics(broker.bootstrap_servers) != 0:
            return 1
        if args.action == "start":
            return 0
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            signal.sigwait(stop_signals)
        finally:
            broker.stop()
        return 0
    except KafkaSetupError as exc:
        print(f"error: {exc}", flush=True)
        return 1
