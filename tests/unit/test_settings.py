from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import SettingsError
from appliance.settings import load_settings


def test_embedded_defaults_serve_on_loopback_8080() -> None:
    s = load_settings(env={})
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8080)
    assert s.models.load == "startup"
    assert s.data_dir.is_absolute()
    assert s.models_dir == s.data_dir / "models"


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('data_dir = "/srv/a"\n[server]\nport = 9000\nhost = "0.0.0.0"\n[models]\nn_ctx = 2048\n')
    s = load_settings(config=cfg, env={})
    assert (s.server.port, s.server.host, s.models.n_ctx, s.data_dir) == (9000, "0.0.0.0", 2048, Path("/srv/a"))
    s = load_settings(config=cfg, env={"APPLIANCE_PORT": "9100", "APPLIANCE_DATA_DIR": "/srv/b"})
    assert (s.server.port, s.data_dir) == (9100, Path("/srv/b"))
    s = load_settings(config=cfg, env={"APPLIANCE_PORT": "9100"}, overrides={("server", "port"): 9200})
    assert s.server.port == 9200


def test_config_from_environment_variable(tmp_path: Path) -> None:
    cfg = tmp_path / "b.toml"
    cfg.write_text("[server]\nport = 9300\n")
    assert load_settings(env={"APPLIANCE_CONFIG": str(cfg)}).server.port == 9300


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"APPLIANCE_PORT": "eighty"}, "port"),
        ({"APPLIANCE_PORT": "70000"}, "port"),
        ({"APPLIANCE_MODEL_LOAD": "sometimes"}, "load"),
        ({"APPLIANCE_N_CTX": "12"}, "n_ctx"),
        ({"APPLIANCE_CONFIG": "/does/not/exist.toml"}, "does not exist"),
    ],
)
def test_bad_values_are_clear_errors(env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env=env)
    assert needle in info.value.message


def test_unknown_keys_and_bad_toml_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nprot = 1\n")
    with pytest.raises(SettingsError, match="prot"):
        load_settings(config=cfg, env={})
    cfg.write_text("[server\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(config=cfg, env={})
