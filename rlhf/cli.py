"""The ``rlhf`` command. Each subcommand hands its remaining arguments to the ``main`` of the
component that owns it; components are imported only when their subcommand runs, so
``rlhf kafka status`` does not pay for importing torch."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def _kafka(argv: list[str]) -> int:
    from rlhf.kafka_local import main

    return main(argv)


def _model(argv: list[str]) -> int:
    from rlhf.models import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    servers: dict[str, Callable[[list[str]], int]] = {
        "policy": _serve_policy,
        "reward": _serve_reward,
        "feedback": _serve_feedback,
    }
    if not argv or argv[0] not in servers:
        print(f"usage: rlhf serve {{{','.join(servers)}}} [options]", file=sys.stderr)
        return 2
    return servers[argv[0]](argv[1:])


def _serve_policy(argv: list[str]) -> int:
    from services.policy.server import main

    return main(argv)


def _serve_reward(argv: list[str]) -> int:
    from services.reward.server import main

    return main(argv)


def _serve_feedback(argv: list[str]) -> int:
    from services.feedback.server import main

    return main(argv)


def _feedback(argv: list[str]) -> int:
    from services.feedback.importer import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from trainer.main import main

    return main(argv)


def _admin(argv: list[str]) -> int:
    from services.admin.cli import main

    return main(argv)


def _demo(argv: list[str]) -> int:
    from services.demo import main

    return main(argv)


COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "kafka": ("local Apache Kafka broker (KRaft): start | stop | status | run; topics", _kafka),
    "model": ("build the tiny default model, inspect checkpoints", _model),
    "serve": ("run a server: policy | reward | feedback", _serve),
    "feedback": ("feedback tools: import FILE (JSONL) into Kafka", _feedback),
    "train": ("run the online trainer (SFT, reward model, PPO-ptx rounds)", _train),
    "admin": ("model versions: list, status, promote, rollback, pin, canary", _admin),
    "demo": ("run the whole loop locally on the tiny model", _demo),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print("usage: rlhf <command> [options]\n\ncommands:")
        for name, (summary, _) in COMMANDS.items():
            print(f"  {name:<10} {summary}")
        print("\n'rlhf <command> --help' describes a command's options.")
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"rlhf: unknown command {args[0]!r}; see 'rlhf --help'", file=sys.stderr)
        return 2
    return COMMANDS[args[0]][1](args[1:])
