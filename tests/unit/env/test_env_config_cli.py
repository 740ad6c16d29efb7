"""`rlfleet env` and `python -m rlfleet.env` settings: defaults < TOML < env < flags."""

from __future__ import annotations

import pytest
from rlfleet.cli.main import main as cli
from rlfleet.common.config import load_config
from rlfleet.env.config import EnvConfig


def test_rlfleet_env_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit) as info:
        cli(["env", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rlfleet env" in out
    for flag in ("--max-episodes", "--episode-ttl-s", "--sandbox-uid-base", "--port"):
        assert flag in out


def test_settings_from_env_and_flags(monkeypatch, tmp_path):
    toml = tmp_path / "env.toml"
    toml.write_text("max_episodes = 7\nmax_turns = 9\n")
    monkeypatch.setenv("RLFLEET_ENV_EPISODE_TTL_S", "12.5")
    monkeypatch.setenv("RLFLEET_ENV_MAX_TURNS", "11")
    cfg = load_config(EnvConfig, ["--config", str(toml), "--max-turns", "13"])
    assert (cfg.max_episodes, cfg.episode_ttl_s, cfg.max_turns) == (7, 12.5, 13)
    assert cfg.service_name == "env"


def test_a_bad_setting_is_one_sentence():
    with pytest.raises(SystemExit, match="max_episodes"):
        load_config(EnvConfig, ["--max-episodes", "0"])
