"""Typed config: defaults < file < environment < flags, with errors that name the setting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf.config import load_config, option, parse_config, section


@dataclass(frozen=True)
class Inner:
    beta: float = option(0.02, "KL coefficient")
    enabled: bool = option(False, "switch")


@dataclass(frozen=True)
class Example:
    port: int = option(50051, "gRPC port")
    name: str = option("policy", "name")
    stops: tuple[str, ...] = option((), "stop strings")
    model_dir: Path | None = option(None, "model directory")
    ppo: Inner = section(Inner, "PPO settings")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")


def test_precedence_defaults_file_env_flags(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(
        "port: 1000\nname: from-file\nppo:\n  beta: 0.5\n  enabled: true\nstops: [a, b]\n"
    )
    env = {"X_PORT": "2000", "X_PPO__BETA": "0.25"}
    cfg = load_config(Example, file=file, env=env, env_prefix="X_", flags={"port": "3000"})
    assert cfg == Example(port=3000, name="from-file", stops=("a", "b"),
                          ppo=Inner(beta=0.25, enabled=True))  # fmt: skip
    assert load_config(Example) == Example()


def test_flags_parse_lists_paths_and_optionals(monkeypatch):
    monkeypatch.delenv("X_PORT", raising=False)
    cfg = parse_config(
        Example, ["--stops", "x,y", "--model-dir", "/m", "--ppo.enabled", "yes"],
        prog="t", description="t", env_prefix="X_",
    )  # fmt: skip
    assert cfg.stops == ("x", "y") and cfg.model_dir == Path("/m") and cfg.ppo.enabled is True


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"port": "abc"}, "--port: expected a number, got 'abc'"),
        ({"port": "0"}, "port must be in 1..65535, got 0"),
        ({"ppo.enabled": "maybe"}, "expected true or false"),
        ({"nope": "1"}, "unknown setting 'nope'"),
    ],
)
def test_bad_values_are_rejected_with_the_setting_named(flags, message):
    with pytest.raises(ValueError, match=message):
        load_config(Example, flags=flags)


def test_unknown_key_in_file_is_an_error(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("ppo:\n  betta: 1\n")
    with pytest.raises(ValueError, match="unknown setting 'ppo.betta'"):
        load_config(Example, file=file)


def test_parse_config_turns_errors_into_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(Example, ["--port", "99999"], prog="t", description="t", env_prefix="X_")
    assert info.value.code == 2
    assert "port must be in 1..65535, got 99999" in capsys.readouterr().err


def test_a_section_keeps_its_own_default_factory():
    import dataclasses as dc

    @dataclass(frozen=True)
    class Outer:
        inner: Inner = dc.field(default_factory=lambda: Inner(beta=0.5), metadata={"help": "x"})

    assert load_config(Outer).inner == Inner(beta=0.5)
    assert load_config(Outer, flags={"inner.enabled": "true"}).inner == Inner(
        beta=0.5, enabled=True
    )
    assert load_config(Outer, flags={"inner.beta": "0.1"}).inner.beta == 0.1
