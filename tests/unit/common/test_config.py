"""Settings precedence: defaults < TOML < environment < flags, with clear errors."""

from __future__ import annotations

import pytest
from pydantic_settings import SettingsConfigDict
from rlfleet.common.config import ServiceConfig, load_config


class DemoConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="RLFLEET_DEMO_")
    service_name = "demo"

    batch: int = 1
    """Sequences per batch."""


def test_precedence(tmp_path, monkeypatch):
    toml = tmp_path / "c.toml"
    toml.write_text("batch = 5\nport = 7\n")
    assert load_config(DemoConfig, []).batch == 1
    assert load_config(DemoConfig, ["--config", str(toml)]).batch == 5
    monkeypatch.setenv("RLFLEET_DEMO_BATCH", "9")
    cfg = load_config(DemoConfig, ["--config", str(toml)])
    assert (cfg.batch, cfg.port) == (9, 7)
    assert load_config(DemoConfig, ["--config", str(toml), "--batch", "11"]).batch == 11


def test_bad_values_exit_with_a_sentence(tmp_path):
    with pytest.raises(SystemExit, match="port: Input should be less than or equal to 65535"):
        load_config(DemoConfig, ["--port", "70000"])
    with pytest.raises(SystemExit, match="does not exist"):
        load_config(DemoConfig, ["--config", str(tmp_path / "missing.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("batch = [")
    with pytest.raises(SystemExit, match="not valid TOML"):
        load_config(DemoConfig, ["--config", str(bad)])


def test_help_shows_field_docs(capsys):
    with pytest.raises(SystemExit):
        load_config(DemoConfig, ["--help"])
    assert "Sequences per batch." in capsys.readouterr().out
