"""The settings model: defaults, file < env < flags, text forms of mappings and lists, clear errors,
and the README table generated from the model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lipstream.config import (
    Settings,
    add_settings_arguments,
    env_name,
    load_settings,
    settings_from_args,
    settings_table,
)
from lipstream.errors import SettingsError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults():
    settings = load_settings(environ={})
    assert (settings.host, settings.port, settings.engine, settings.fps) == ("0.0.0.0", 2160, "auto", 25)
    assert settings.api_keys == {} and settings.ice_servers == []
    assert settings.models_root == Path("./models") and settings.avatars_root == Path("./results")


def test_env_names_match_the_container_and_the_model_layout():
    assert env_name("models_root") == "LIPSTREAM_MODELS"
    assert env_name("avatars_root") == "LIPSTREAM_AVATARS"
    assert env_name("max_batch") == "LIPSTREAM_MAX_BATCH"


def test_file_then_env_then_flags(tmp_path):
    toml = tmp_path / "lipstream.toml"
    toml.write_text('port = 9000\nfps = 30\njpeg_quality = 70\n[api_keys]\nabc = "acme"\n')
    env = {"LIPSTREAM_PORT": "9100", "LIPSTREAM_FPS": "20", "LIPSTREAM_CONFIG": str(toml)}
    settings = load_settings({"port": "9200", "host": None}, environ=env)
    assert settings.port == 9200  # flag beats env beats file
    assert settings.fps == 20  # env beats file
    assert settings.jpeg_quality == 70  # file beats default
    assert settings.host == "0.0.0.0"  # a None flag is "not given"
    assert settings.api_keys == {"abc": "acme"}


def test_json_file_given_directly_wins_over_the_env_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"max_batch": 4}))
    (tmp_path / "b.json").write_text(json.dumps({"max_batch": 8}))
    settings = load_settings(config_file=tmp_path / "a.json", environ={"LIPSTREAM_CONFIG": str(tmp_path / "b.json")})
    assert settings.max_batch == 4


def test_mappings_and_lists_from_text():
    env = {"LIPSTREAM_API_KEYS": " k1=acme , k2=, k3 = beta ",
           "LIPSTREAM_ICE_SERVERS": "stun:a.example:3478, turn:b.example"}
    settings = load_settings(environ=env)
    assert settings.api_keys == {"k1": "acme", "k2": "", "k3": "beta"}
    assert settings.ice_servers == ["stun:a.example:3478", "turn:b.example"]
    assert load_settings(environ={"LIPSTREAM_API_KEYS": '{"k": "t"}'}).api_keys == {"k": "t"}
    assert load_settings(environ={}).sharpen is True  # on unless switched off
    assert load_settings(environ={"LIPSTREAM_SHARPEN": "false"}).sharpen is False
    assert load_settings({"sharpen": "0"}, environ={}).sharpen is False


@pytest.mark.parametrize("env, words", [
    ({"LIPSTREAM_PORT": "http"}, ["port", "env LIPSTREAM_PORT", "integer"]),
    ({"LIPSTREAM_PORT": "70000"}, ["port", "65535"]),
    ({"LIPSTREAM_ENGINE": "wav2lip"}, ["engine", "musetalk"]),
    ({"LIPSTREAM_API_KEYS": "nokey"}, ["api_keys", "key=value"]),
    ({"LIPSTREAM_API_KEYS": "k=../evil"}, ["api_keys", "not allowed"]),
])
def test_bad_values_name_the_setting_and_its_source(env, words):
    with pytest.raises(SettingsError) as info:
        load_settings(environ=env)
    for word in words:
        assert word in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(config_file=tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(config_file=bad, environ={})
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"prot": 1}')
    with pytest.raises(SettingsError, match="unknown setting 'prot'"):
        load_settings(config_file=unknown, environ={})
    yaml = tmp_path / "x.yaml"
    yaml.write_text("port: 1")
    with pytest.raises(SettingsError, match=r"\.toml or \.json"):
        load_settings(config_file=yaml, environ={})


def test_every_setting_has_a_flag(monkeypatch):
    monkeypatch.delenv("LIPSTREAM_PORT", raising=False)
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    args = parser.parse_args(["--port", "8080", "--max-queued-audio-s", "5", "--api-keys", "a=b",
                              "--engine", "warp"])
    settings = settings_from_args(args)
    assert (settings.port, settings.max_queued_audio_s, settings.api_keys, settings.engine) == \
        (8080, 5.0, {"a": "b"}, "warp")
    flags = {action.dest for action in parser._actions}
    assert set(Settings.model_fields) <= flags


def test_readme_settings_table_is_generated_from_the_model():
    table = settings_table()
    for name in Settings.model_fields:
        assert f"| `{name}` | `{env_name(name)}` |" in table
    assert "| `port` | `LIPSTREAM_PORT` | `--port` | integer | `2160` |" in table
    assert table in README.read_text(), "README's settings table is stale: paste `python -m lipstream.config`"
