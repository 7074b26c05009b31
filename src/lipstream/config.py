"""The server's settings: one model, filled from defaults < a config file < env vars < command-line flags.

    settings = load_settings(flags={"port": "8080"})           # reads LIPSTREAM_* and LIPSTREAM_CONFIG
    settings = load_settings(config_file="lipstream.toml")     # TOML or JSON, keys = field names

Every field has an env var (`LIPSTREAM_<NAME>`, or the name in its `env` extra) and a flag
(`--<name-with-dashes>`). Env vars and flags are text: mappings are written `key=value,key=value`
(or JSON), lists `a,b` (or JSON). `python -m lipstream.config` prints the README's settings table."""

from __future__ import annotations

import argparse
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lipstream.avatar.layout import clean_tenant
from lipstream.engines import ENGINE_NAMES
from lipstream.errors import AvatarNameError, SettingsError

ENV_PREFIX = "LIPSTREAM_"
CONFIG_ENV = "LIPSTREAM_CONFIG"


INSTANCE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
MIN_OUTPUT_HEIGHT = 16  # smallest streamed frame height (video encoders need a few macroblocks)


class Settings(BaseModel):
    """Everything an operator can set. Field descriptions are the README's table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("0.0.0.0", description="address the server listens on")
    instance: str = Field("", description="this server's name among several behind one address (a `lipstream "
                                          "cluster` replica, or an upstream of a proxy): session and job ids "
                                          "start with `<instance>.`, so the proxy can route by the id; "
                                          "lower-case letters, digits and dashes; empty: plain ids")
    public_url: str = Field("", description="where clients reach this server directly (e.g. http://10.0.0.5:2160) "
                                            "when a proxy is in front: session replies give their WebSocket and "
                                            "WebRTC offer URLs on it, so the frames skip the proxy; empty: paths "
                                            "on the address the client used")
    port: int = Field(2160, ge=1, le=65535, description="TCP port of the server")
    device: str = Field("auto", description='compute device: "auto" (CUDA if present, else CPU), "cpu", "cuda", '
                                            '"cuda:1"')
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description='engine precision; "auto": float16 on CUDA, float32 on the CPU')
    engine: Literal[ENGINE_NAMES] = Field(
        "auto", description='lip-sync engine; "auto": MuseTalk when its weights are present, else warp')
    models_root: Path = Field(Path("./models"), json_schema_extra={"env": "LIPSTREAM_MODELS"},
                              description="folder of the MuseTalk weights (MuseTalk's own layout)")
    avatars_root: Path = Field(Path("./results"), json_schema_extra={"env": "LIPSTREAM_AVATARS"},
                               description="folder of the prepared avatars (MuseTalk's `results` layout; "
                                           "tenants in sub-folders)")
    fps: int = Field(25, ge=1, le=50, description="default frame rate of a session's video")
    output_height: int = Field(0, ge=0, description="scale streamed frames to this height (width keeps the "
                                                    "aspect ratio), at least 16; 0: the avatar's own size")
    sharpen: bool = Field(True, description="unsharp mask on the generated face before it is blended in: this "
                                            "system's addition, not MuseTalk's (false: MuseTalk's own "
                                            "composition, resize and blend only)")
    compile_mode: Literal["none", "default", "reduce-overhead", "max-autotune"] = Field(
        "none", description='torch.compile for MuseTalk: "reduce-overhead" adds CUDA graphs; batches are padded '
                            "to powers of two, each compiled at start (minutes)")
    max_batch: int = Field(16, ge=1, description="most frames in one engine call (all sessions of a device together)")
    max_wait_ms: float = Field(4.0, ge=0, description="longest a frame waits for others to fill a batch")
    jpeg_quality: int = Field(80, ge=1, le=100, description="JPEG quality of WebSocket frames (1-100)")
    video_codec: Literal["auto", "h264", "vp8"] = Field(
        "auto", description='WebRTC video codec to prefer; "auto": what the browser offers first')
    ice_servers: list[str] = Field(default_factory=list, description="STUN/TURN URLs for WebRTC, e.g. "
                                   "stun:stun.example.org:3478 (empty: direct connections only)")
    webrtc_connect_timeout_s: float = Field(20.0, gt=0, description="a WebRTC peer not connected this long "
                                            "after its offer was answered (no route between the peers, e.g. "
                                            "behind NAT without TURN) is dropped and its session closed")
    api_keys: dict[str, str] = Field(default_factory=dict, description="API key -> tenant (`key=tenant,...`); "
                                     "empty: one key for the default tenant is made at start and printed")
    max_upload_bytes: int = Field(256 << 20, ge=1, description="largest request body (avatar videos, audio "
                                                                "files); larger is refused with 413")
    max_sessions_per_key: int = Field(8, ge=1, description="open sessions per API key; more is refused with 429")
    max_sessions: int = Field(0, ge=0, description="most sessions the server holds at once, whatever its measured "
                                                   "capacity (more is refused with 503 and Retry-After, also "
                                                   "without admission_control); 0: no such cap")
    max_audio_seconds: float = Field(600.0, gt=0, description="longest audio accepted in one request (file or "
                                                              "PCM body)")
    max_queued_audio_s: float = Field(30.0, gt=0, description="most speech a session holds unplayed; pushing "
                                                              "more is refused with 429")
    auto_end_ms: float = Field(600.0, ge=0, description="an utterance left open (no end message) ends by itself "
                                                       "once its speech has played and no audio has come for "
                                                       "this long; 0: only the client ends utterances")
    detached_session_timeout_s: float = Field(120.0, gt=0, description="a session with no viewer connected for "
                                                                      "this long is closed")
    allow_upscaling: bool = Field(False, description="let a session ask for an output_height above its avatar's "
                                                     "own frame height (off: refused with 400)")
    admission_control: bool = Field(True, description="refuse a new session (503 with Retry-After) when the "
                                                      "measured capacity cannot hold it without making the open "
                                                      "ones late")
    capacity_target: float = Field(0.75, gt=0, le=1, description="share of the CPU cores (counting what other "
                                                                 "processes use) and of each engine's time that "
                                                                 "admitted sessions may use, all counted as speaking")
    avatar_cache_mb: int = Field(4096, ge=0, description="memory for loaded avatars (MB); above it the least "
                                                         "recently used avatar that no session shows is "
                                                         "unloaded (avatars load on first use)")
    max_jobs_per_tenant: int = Field(4, ge=1, description="avatar preparations a tenant may have queued or running; "
                                                          "more is refused with 429 (a tenant runs one at a time)")
    shutdown_grace_s: float = Field(8.0, ge=0, description="at shutdown, how long a running avatar preparation may "
                                                           "take to finish before it is stopped and what it built "
                                                           "is removed")
    max_message_bytes: int = Field(131072, ge=1024, description="largest WebSocket / data-channel message (a "
                                                                "larger WebSocket message closes it with 1009)")
    max_messages_per_s: float = Field(200.0, gt=0, description="messages a connection may send per second "
                                                               "(bursts up to one second's worth); a faster "
                                                               "WebSocket client is read more slowly")
    max_input_bytes_per_s: int = Field(1 << 20, ge=1024, description="bytes a connection may send per second "
                                                                     "(32x real-time audio by default)")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection that has not sent a whole request "
                                                            "head (request line and headers) this long is closed")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body that stops arriving for this long "
                                                          "is refused with 408")
    api_docs: bool = Field(True, description="serve /docs, /redoc and /openapi.json (behind the API key)")
    metrics_key: str = Field("", description="the key GET /metrics needs (Prometheus: `Authorization: Bearer "
                                             "<key>`); empty: /metrics is off")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_from_text(cls, value: Any) -> Any:
        return _mapping_from_text(value) if isinstance(value, str) else value

    @field_validator("ice_servers", mode="before")
    @classmethod
    def _list_from_text(cls, value: Any) -> Any:
        return _list_from_text(value) if isinstance(value, str) else value

    @field_validator("output_height")
    @classmethod
    def _usable_height(cls, value: int) -> int:
        return check_output_height(value)

    @field_validator("public_url")
    @classmethod
    def _absolute_url(cls, value: str) -> str:
        if value and not re.fullmatch(r"https?://[^/\s]+/?", value):
            raise ValueError("public_url must be http(s)://host:port, without a path (or empty)")
        return value.rstrip("/")

    @field_validator("instance")
    @classmethod
    def _routable_instance(cls, value: str) -> str:
        if value and not INSTANCE_NAME.fullmatch(value):
            raise ValueError("instance must be 1-32 lower-case letters, digits and dashes (it starts every "
                             "session id, and so every session URL)")
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_and_tenants_valid(cls, value: dict[str, str]) -> dict[str, str]:
        if any(not key.strip() for key in value):
            raise ValueError("an API key must not be empty")
        try:
            return {key.strip(): clean_tenant(tenant) for key, tenant in value.items()}
        except AvatarNameError as exc:
            raise ValueError(str(exc)) from exc


def scoped_id(instance: str, token: str) -> str:
    """The id of a session or job `token` made by the server named `instance` (setting instance):
    `<instance>.<token>`, or `token` alone for a server without a name."""
    return f"{instance}.{token}" if instance else token


def instance_of(identifier: str) -> str | None:
    """The instance a `scoped_id` names, or None (a plain id, or not one of these ids)."""
    instance, dot, _ = identifier.partition(".")
    return instance if dot and INSTANCE_NAME.fullmatch(instance) else None


def check_output_height(value: int) -> int:
    """0 (the avatar's own size) or a height a video encoder can use (at least MIN_OUTPUT_HEIGHT)."""
    if 0 < value < MIN_OUTPUT_HEIGHT:
        raise ValueError(f"output_height must be 0 (the avatar's own) or at least {MIN_OUTPUT_HEIGHT}")
    return value


def _mapping_from_text(text: str) -> dict[str, str]:
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    pairs = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in pairs if "=" not in item]
    if bad:
        raise ValueError(f"expected key=value pairs separated by commas, got {bad[0]!r}")
    return dict(tuple(part.strip() for part in item.split("=", 1)) for item in pairs)


def _list_from_text(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)
    return [item.strip() for item in text.split(",") if item.strip()]


def env_name(name: str) -> str:
    """The env var of field `name`."""
    extra = Settings.model_fields[name].json_schema_extra or {}
    return extra.get("env") or ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    """The command-line flag of field `name`."""
    return "--" + name.replace("_", "-")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML (.toml) or JSON (.json) file of settings -> {field: value}. Raises SettingsError."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"config file {path} does not exist; give an existing .toml or .json file")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise SettingsError(f"config file {path} must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"config file {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a table/object of settings")
    return data


def load_settings(flags: Mapping[str, Any] | None = None, *, config_file: str | os.PathLike | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from defaults, then the config file (`config_file`, else env LIPSTREAM_CONFIG), then the
    LIPSTREAM_* env vars, then `flags` ({field: value}; None values are ignored).

    Raises SettingsError naming the setting, where it came from and what is wrong."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    file = config_file or environ.get(CONFIG_ENV)
    if file:
        for key, value in read_config_file(file).items():
            if key not in Settings.model_fields:
                raise SettingsError(f"config file {file}: unknown setting {key!r}; known: "
                                    f"{', '.join(Settings.model_fields)}")
            values[key], origin[key] = value, f"{key} in {file}"
    for name in Settings.model_fields:
        if env_name(name) in environ:
            values[name], origin[name] = environ[env_name(name)], f"env {env_name(name)}"
    for name, value in (flags or {}).items():
        if value is not None:
            values[name], origin[name] = value, f"flag {flag_name(name)}"
    try:
        return Settings(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        source = origin.get(name, name)
        raise SettingsError(f"setting {name} ({source}): {error['msg']}; see the settings table in the README") \
            from exc


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per setting (values stay text, parsed like env vars) plus --config."""
    parser.add_argument("--config", metavar="FILE", help=f"TOML or JSON settings file (env {CONFIG_ENV})")
    for name, field in Settings.model_fields.items():
        parser.add_argument(flag_name(name), dest=name, metavar=_metavar(name),
                            help=f"{field.description} (env {env_name(name)})")


def _metavar(name: str) -> str:
    annotation = Settings.model_fields[name].annotation
    if get_origin(annotation) is Literal:
        return "{" + ",".join(get_args(annotation)) + "}"
    if get_origin(annotation) is dict:
        return "K=V,..."
    if get_origin(annotation) is list:
        return "A,B,..."
    return {str: "TEXT", int: "N", float: "NUM", Path: "DIR", bool: "{true,false}"}[annotation]


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings for a parser built with `add_settings_arguments`."""
    return load_settings({name: getattr(args, name, None) for name in Settings.model_fields},
                         config_file=args.config)


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if isinstance(default, Path):
        return f"`{default.as_posix() if default.is_absolute() else './' + default.as_posix()}`"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if default in ({}, [], ""):
        return "(empty)"
    return f"`{default}`"


def _type_text(name: str) -> str:
    annotation = Settings.model_fields[name].annotation
    if get_origin(annotation) is Literal:
        return " \\| ".join(f"`{choice}`" for choice in get_args(annotation))
    if get_origin(annotation) is dict:
        return "mapping"
    if get_origin(annotation) is list:
        return "list"
    return {str: "text", int: "integer", float: "number", Path: "path", bool: "`true` \\| `false`"}[annotation]


def settings_table() -> str:
    """The README's settings table (Markdown), one row per field, straight from the model."""
    rows = ["| setting | env var | flag | type | default | meaning |", "|---|---|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| `{name}` | `{env_name(name)}` | `{flag_name(name)}` | {_type_text(name)} | "
                    f"{_default_text(name)} | {field.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
