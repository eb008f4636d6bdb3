"""``rlhf feedback import FILE``: stream a JSONL file through the gateway's validation and data
policy into Kafka, exactly as gRPC submissions go (formats: ``formats.py``).

A bad line is counted with its reason and skipped; it never stops the import. Every line's
idempotency key is given or derived from its content, so re-running an import (say after
Kafka was unavailable) stores only what is missing. Exit status: 0 when every line was
stored or rejected for a reason of its own, 1 when some lines could not be stored because
Kafka was unavailable (run the import again), 2 on a usage error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO

from prometheus_client import CollectorRegistry
from tqdm import tqdm

from rlhf.config import option, parse_config
from services.feedback.config import GatewayConfig
from services.feedback.formats import FORMATS, FormatError, parse_line
from services.feedback.gateway import FeedbackGateway, open_gateway
from services.feedback.validate import Rejection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportConfig(GatewayConfig):
    file: str = option("", "JSONL file to import (also the first positional argument; - is stdin)")
    format: str = option("auto", f"line format, one of {list(FORMATS)} (auto: detected per line)")
    labeler_id: str = option("import", "labeler id for records that carry none (public datasets)")
    concurrency: int = option(256, "lines being validated and stored at once")
    errors_file: str = option("", "if set, every rejected line is written here with its reason")
    startup_timeout_s: float = option(120.0, "how long to wait for Kafka at start")

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {self.format!r}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")


@dataclass
class ImportSummary:
    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    # The first rejected line of each reason: (line number, message).
    examples: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def unavailable(self) -> int:
        return self.rejected["unavailable"]

    def reject(self, line_no: int, reason: str, message: str) -> None:
        self.rejected[reason] += 1
        self.examples.setdefault(reason, (line_no, message))

    def report(self) -> str:
        out = [
            f"{self.lines} lines: {self.accepted} stored, {self.duplicates} already stored "
            f"(duplicates), {sum(self.rejected.values())} rejected"
        ]
        for reason, n in self.rejected.most_common():
            line_no, message = self.examples[reason]
            out.append(f"  {reason}: {n} (first: line {line_no}: {message})")
        if self.unavailable:
            out.append(
                "Kafka was unavailable for some lines: run the same import again to store them."
            )
        return "\n".join(out)


async def import_lines(
    gateway: FeedbackGateway,
    lines: Iterable[str],
    *,
    fmt: str = "auto",
    labeler_id: str = "import",
    concurrency: int = 256,
    errors: IO[str] | None = None,
    progress: tqdm | None = None,
) -> ImportSummary:
    """Submits every non-blank line; returns the counts. Never raises for a bad line."""
    summary = ImportSummary()
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    def rejected(line_no: int, line: str, reason: str, message: str) -> None:
        summary.reject(line_no, reason, message)
        if errors is not None:
            record = {"line": line_no, "reason": reason, "message": message, "text": line}
            errors.write(json.dumps(record, ensure_ascii=False) + "\n")

    async def submit(line_no: int, line: str) -> None:
        try:
            try:
                item = parse_line(line, fmt, labeler_id)
            except FormatError as exc:
                rejected(line_no, line, "format", str(exc))
                return
            try:
                result = await gateway.submit(item)
            except Rejection as rejection:
                rejected(line_no, line, rejection.reason, rejection.message)
                return
            if result.duplicate:
                summary.duplicates += 1
            else:
                summary.accepted += 1
        finally:
            slots.release()
            if progress is not None:
                progress.update(len(line.encode("utf-8")) + 1)

    for line_no, raw in enumerate(lines, start=1):
        line = raw.rstrip("\n")
        if not line.strip():
            if progress is not None:
                progress.update(len(raw.encode("utf-8")))
            continue
        summary.lines += 1
        await slots.acquire()
        task = asyncio.create_task(submit(line_no, line))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*tasks)
    return summary


def run_import(config: ImportConfig, registry: CollectorRegistry) -> ImportSummary:
    """Opens the gateway, imports ``config.file`` and closes the gateway again."""
    app = open_gateway(config, registry)
    if not app.wait_ready(config.startup_timeout_s):
        app.close()
        raise TimeoutError(
            f"could not read the stored events from Kafka at {config.kafka.bootstrap_servers} "
            f"within {config.startup_timeout_s:g} s"
        )
    with contextlib.ExitStack() as stack:
        stack.callback(app.close)
        if config.file == "-":
            stream, total = sys.stdin, None
        else:
            stream = stack.enter_context(open(config.file, encoding="utf-8"))
            total = os.path.getsize(config.file)
        errors = None
        if config.errors_file:
            errors = stack.enter_context(open(config.errors_file, "w", encoding="utf-8"))
        progress = stack.enter_context(
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc="import",
                disable=not sys.stderr.isatty(),
            )
        )
        return asyncio.run(
            import_lines(
                app.gateway,
                stream,
                fmt=config.format,
                labeler_id=config.labeler_id,
                concurrency=config.concurrency,
                errors=errors,
                progress=progress,
            )
        )


def main(argv: list[str]) -> int:
    # `rlhf feedback import FILE [options]`: the subcommand word and the file are positional.
    args = list(argv)
    if args and args[0] == "import":
        args = args[1:]
    else:
        print("usage: rlhf feedback import FILE [options]  (see --help)", file=sys.stderr)
        if not args or args[0] in {"-h", "--help"}:
            return 0 if args else 2
        return 2
    if args and (not args[0].startswith("-") or args[0] == "-"):
        args = ["--file", args[0], *args[1:]]
    config = parse_config(
        ImportConfig,
        args,
        prog="rlhf feedback import",
        description="Import feedback from JSONL (own format, HH-RLHF and chat preference "
        "pairs, UltraFeedback ranked completions, SFT chat transcripts) through the gateway's "
        "validation into Kafka.",
        env_prefix="RLHF_FEEDBACK_",
    )
    if not config.file:
        print("rlhf feedback import: give the JSONL file to import", file=sys.stderr)
        return 2
    if config.file != "-" and not os.path.isfile(config.file):
        print(f"rlhf feedback import: no such file: {config.file}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    summary = run_import(config, CollectorRegistry())
    print(summary.report())
    return 1 if summary.unavailable else 0
