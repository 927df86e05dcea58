"""The environment is read in one place (``_env``), the same way for the client and the CLI."""

from __future__ import annotations

from pathlib import Path

from wujie_async._env import Environment


def test_unset_and_empty_variables_are_none_and_the_key_is_never_shown() -> None:
    env = Environment.read(
        {"WUJIE_APP_ID": "app-1", "WUJIE_PRIVATE_KEY": "SECRET-KEY", "WUJIE_BASE_URL": ""}
    )
    assert env.app_id == "app-1" and env.private_key == "SECRET-KEY"
    assert env.base_url is None and env.private_key_file is None
    assert "SECRET-KEY" not in repr(env) and "***" in repr(env)


def test_only_the_wujie_variables_are_read(tmp_path: Path) -> None:
    key_file = tmp_path / "key.pem"
    env = Environment.read({"WUJIE_PRIVATE_KEY_FILE": str(key_file), "APP_ID": "nope"})
    assert env == Environment(
        app_id=None, private_key=None, private_key_file=str(key_file), base_url=None
    )
