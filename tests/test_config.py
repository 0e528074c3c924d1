"""Configuration: defaults < TOML file < environment < flags, and clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from voicepipe.server.cli import main

from voicepipe import config as cfg


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "vp.toml"
    toml.write_text('[server]\nport = 9001\nhost = "0.0.0.0"\nlog-level = "debug"\n')
    c = cfg.load(toml, {"port": "9003"}, environ={"VOICEPIPE_PORT": "9002",
                                                   "VOICEPIPE_API_KEYS": "a, b"})
    assert (c.port, c.host, c.log_level, c.api_keys) == (9003, "0.0.0.0", "debug", ("a", "b"))
    c = cfg.load(toml, {}, environ={"VOICEPIPE_PORT": "9002"})
    assert c.port == 9002


@pytest.mark.parametrize("kw, needle", [
    ({"port": "99999"}, "port"),
    ({"port": "eighty"}, "--port"),
    ({"device": "tpu"}, "device"),
    ({"max_sessions": "0"}, "max_sessions"),
    ({"log_level": "loud"}, "log_level"),
])
def test_bad_values_name_the_option(kw: dict, needle: str) -> None:
    with pytest.raises(cfg.ConfigError, match=needle):
        cfg.load(None, kw, environ={})


def test_unknown_key_in_file(tmp_path: Path) -> None:
    toml = tmp_path / "vp.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(cfg.ConfigError, match="unknown option 'prot'"):
        cfg.load(toml, environ={})


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "nope"]) == 2
    assert "--port" in capsys.readouterr().err


def test_every_option_is_in_help_and_readme(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for f in dataclasses.fields(cfg.ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text, flag
        assert f"`{flag}`" in readme and f"VOICEPIPE_{f.name.upper()}" in readme, flag


def test_readme_options_table_is_current() -> None:
    import runpy

    root = Path(__file__).parents[1]
    table = runpy.run_path(str(root / "scripts" / "options_table.py"))["table"]()
    assert table in (root / "README.md").read_text(), "run scripts/options_table.py --write"
