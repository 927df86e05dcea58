"""A refused private key is kept by no frame of its error's traceback, in any way it came in.

An error reporter that records locals (Sentry's default) walks every frame of an error's
traceback, and of its ``__cause__`` and ``__context__``, and sends the repr of each local: a
key cut short or with one bad character is most of a good key. Every frame counts, the ones
Python writes for a dataclass (file ``<string>``) too; only this test's own frames (which hold
the key to look for it) are left out.
"""

from __future__ import annotations

import argparse
import base64
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from wujie_async import Credentials, InvalidRequestError, WujieClient
from wujie_async.cli._common import UsageError
from wujie_async.cli._common import credentials as cli_credentials

from .helpers import error_chain

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_DER = base64.b64encode(
    _RSA.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
).decode()
_PEM = _RSA.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()
_EC_PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    .decode()
)
_ENCRYPTED_PEM = _RSA.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.BestAvailableEncryption(b"hunter2"),
).decode()


def _damaged() -> dict[str, str]:
    """Keys refused, each still holding most of a good key's text."""
    one_bad = _DER[:700] + "!" + _DER[701:]
    return {
        "der cut short": _DER[:-8],
        "der with a bad character": one_bad,
        "pem cut short": _PEM[: len(_PEM) - 80],
        "der with junk before": "junk " + _DER,
        "ec key": _EC_PEM,
        "encrypted": _ENCRYPTED_PEM,
    }


def _pieces(text: str) -> list[str]:
    body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
    return [body[i : i + 24] for i in range(0, len(body) - 40, 24)]


def _kept(error: BaseException, pieces: list[str]) -> list[str]:
    """``file:function:local`` of every frame local (as its repr) holding a piece of a key,
    in ``error``'s traceback and those of its chained errors; also its args and attributes."""
    found = []
    for item in error_chain(error):
        shown = [repr(item), str(item), *map(repr, vars(item).values())]
        found += [f"{type(item).__name__} itself" for text in shown if _holds(text, pieces)]
        tb = item.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_filename != __file__:
                for name, value in tb.tb_frame.f_locals.items():
                    if _holds(repr(value), pieces):
                        found.append(f"{Path(code.co_filename).name}:{code.co_name}:{name}")
            tb = tb.tb_next
    return found


def _holds(text: str, pieces: list[str]) -> bool:
    return any(piece in text for piece in pieces)


def _refused(make: Callable[[], object]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        make()
    return info.value


@pytest.mark.parametrize("damage", sorted(_damaged()))
def test_a_refused_key_given_is_kept_by_no_frame(damage: str) -> None:
    key = _damaged()[damage]
    error = _refused(lambda: Credentials(app_id="app", private_key=key))
    assert error.field == "private_key"
    assert _kept(error, _pieces(key)) == []


def test_a_key_given_as_bytes_is_kept_by_no_frame() -> None:
    key = _PEM.encode()
    error = _refused(lambda: Credentials("app", key))  # type: ignore[arg-type]  # the point
    assert error.field == "private_key"
    assert _kept(error, _pieces(_PEM)) == []


def test_a_good_key_with_a_bad_app_id_is_kept_by_no_frame() -> None:
    error = _refused(lambda: Credentials(app_id="", private_key=_PEM))
    assert error.field == "app_id"
    assert _kept(error, _pieces(_PEM)) == []


def _read_from_env(
    how: str, monkeypatch: pytest.MonkeyPatch, key: str, tmp_path: Path, app_id: str = "app"
) -> None:
    for name in ("WUJIE_APP_ID", "WUJIE_PRIVATE_KEY", "WUJIE_PRIVATE_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    if app_id:
        monkeypatch.setenv("WUJIE_APP_ID", app_id)
    if how == "variable":
        monkeypatch.setenv("WUJIE_PRIVATE_KEY", key)
    else:
        key_file = tmp_path / "key.pem"
        key_file.write_text(key)
        monkeypatch.setenv("WUJIE_PRIVATE_KEY_FILE", str(key_file))


_READERS: dict[str, Callable[[], object]] = {
    "Credentials.from_env": Credentials.from_env,
    "WujieClient()": WujieClient,
}


@pytest.mark.parametrize("reader", sorted(_READERS))
@pytest.mark.parametrize("how", ["variable", "file"])
@pytest.mark.parametrize("damage", ["der cut short", "der with a bad character", "ec key"])
def test_a_refused_key_read_from_the_environment_is_kept_by_no_frame(
    reader: str, how: str, damage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key = _damaged()[damage]
    _read_from_env(how, monkeypatch, key, tmp_path)
    error = _refused(_READERS[reader])
    assert error.field == "private_key"
    assert _kept(error, _pieces(key)) == []


@pytest.mark.parametrize("reader", sorted(_READERS))
@pytest.mark.parametrize("how", ["variable", "file"])
def test_a_good_key_read_from_the_environment_without_an_app_id_is_kept_by_no_frame(
    reader: str, how: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _read_from_env(how, monkeypatch, _PEM, tmp_path, app_id="")
    error = _refused(_READERS[reader])
    assert error.field == "WUJIE_APP_ID"
    assert _kept(error, _pieces(_PEM)) == []


@pytest.mark.parametrize("how", ["variable", "file"])
@pytest.mark.parametrize("damage", ["der cut short", "der with a bad character", "ec key"])
def test_a_refused_key_the_cli_reads_is_kept_by_no_frame(
    how: str, damage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The CLI's credentials (from the environment, as ``bulk`` reads them): its usage error
    for a refused key leaves the key in none of its frames."""
    key = _damaged()[damage]
    _read_from_env(how, monkeypatch, key, tmp_path)
    args = argparse.Namespace(app_id=None, private_key_file=None)
    with pytest.raises(UsageError) as info:
        cli_credentials(args)
    assert "WUJIE_PRIVATE_KEY" in str(info.value)
    assert _kept(info.value, _pieces(key)) == []
