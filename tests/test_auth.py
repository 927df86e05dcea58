from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from wujie_async import Credentials, InvalidRequestError
from wujie_async._auth import MAX_KEY_FILE_BYTES, HeaderSigner, original_text

from .conftest import AUTH_VECTOR, SHARED_AUTH_VECTOR

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("form", ["private_key_pkcs8_der_base64", "private_key_pem"])
def test_signer_reproduces_the_shared_vector_byte_for_byte(
    auth_vector: dict[str, Any], form: str
) -> None:
    """tests/data/auth.json (the contract's vector): our signer reproduces it exactly."""
    creds = Credentials(app_id=auth_vector["app_id"], private_key=auth_vector[form])
    assert original_text(auth_vector["app_id"], auth_vector["timestamp"]) == auth_vector["original"]
    header = creds.header_at(auth_vector["timestamp"])
    assert header == auth_vector["header"]
    assert auth_vector["sign"] in header


def test_the_vector_copy_matches_the_shared_one() -> None:
    """tests/data/auth.json is a copy of ../shared/vectors/auth.json; they must not drift."""
    if not SHARED_AUTH_VECTOR.exists():
        pytest.skip(f"no shared vector beside this clone ({SHARED_AUTH_VECTOR})")
    assert json.loads(AUTH_VECTOR.read_text()) == json.loads(SHARED_AUTH_VECTOR.read_text())


def test_credentials_repr_hides_the_key(auth_vector: dict[str, Any]) -> None:
    key = auth_vector["private_key_pkcs8_der_base64"]
    creds = Credentials(app_id="app", private_key=key)
    for text in (repr(creds), str(creds)):
        assert key[:40] not in text and key[-40:] not in text
        assert "<redacted>" in text


def test_bad_key_error_names_the_field_and_never_echoes_it(caplog: Any) -> None:
    secret = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="  # base64, but not a key
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InvalidRequestError) as info:
        Credentials(app_id="app", private_key=secret)
    assert info.value.field == "private_key"
    assert secret not in str(info.value) and secret not in repr(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert secret not in caplog.text


@pytest.mark.parametrize("encoding", ["pem", "der"])
def test_a_password_protected_key_is_named_as_such(encoding: str) -> None:
    """An encrypted key read "must be an RSA key": the operator looked for the wrong thing."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    protected = key.private_bytes(
        serialization.Encoding.PEM if encoding == "pem" else serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"hunter2"),
    )
    text = protected.decode() if encoding == "pem" else base64.b64encode(protected).decode()
    with pytest.raises(InvalidRequestError, match="encrypted") as info:
        Credentials(app_id="app", private_key=text)
    assert info.value.field == "private_key"
    assert text[40:80] not in str(info.value) and "hunter2" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None


@pytest.mark.parametrize("form", ["private_key_pem", "private_key_pkcs8_der_base64"])
def test_a_key_pasted_where_its_file_belongs_is_never_echoed(
    auth_vector: dict[str, Any], monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """``WUJIE_PRIVATE_KEY_FILE="$(cat key.pem)"``: the error names the variable, not the key."""
    key = auth_vector[form]
    monkeypatch.setenv("WUJIE_APP_ID", "app")
    monkeypatch.delenv("WUJIE_PRIVATE_KEY", raising=False)
    monkeypatch.setenv("WUJIE_PRIVATE_KEY_FILE", key)
    with pytest.raises(InvalidRequestError) as info:
        Credentials.from_env()
    assert info.value.field == "WUJIE_PRIVATE_KEY_FILE"
    assert "not a file name" in str(info.value)
    error: BaseException | None = info.value
    while error is not None:  # the whole chain, __context__ included
        for line in key.splitlines():
            if len(line) > 20:
                assert line[:20] not in str(error) and line[:20] not in repr(error)
        error = error.__cause__ or error.__context__


def _key_file_env(monkeypatch: pytest.MonkeyPatch, path: str | Path) -> None:
    monkeypatch.setenv("WUJIE_APP_ID", "app")
    monkeypatch.delenv("WUJIE_PRIVATE_KEY", raising=False)
    monkeypatch.setenv("WUJIE_PRIVATE_KEY_FILE", str(path))


async def test_a_key_file_that_is_no_regular_file_is_refused_before_it_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO as WUJIE_PRIVATE_KEY_FILE blocked the open for ever (no writer ever came), and a
    device was read as if it held the key. Each is refused at once, naming the variable."""
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    for path, says in (
        (fifo, "a FIFO, not a regular file"),
        ("/dev/null", "a character device, not a regular file"),
        (tmp_path, "Is a directory"),  # as before
        (tmp_path / "missing.pem", "No such file or directory"),  # as before
    ):
        _key_file_env(monkeypatch, path)
        try:
            with anyio.fail_after(10), pytest.raises(InvalidRequestError) as info:
                await anyio.to_thread.run_sync(Credentials.from_env, abandon_on_cancel=True)
        finally:  # a reader stuck in the FIFO's open (the bug) is let go: it reads EOF
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        assert info.value.field == "WUJIE_PRIVATE_KEY_FILE" and says in info.value.rule, path
        assert str(path) in info.value.rule


def test_a_key_file_larger_than_any_key_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_KEY_FILE_BYTES are read (a 16384-bit key is 13 KB as PEM): a file one byte
    over, or a sparse one claiming a terabyte, is refused by its size."""
    over = tmp_path / "over.pem"
    over.write_bytes(b"A" * (MAX_KEY_FILE_BYTES + 1))
    sparse = tmp_path / "sparse.pem"
    with sparse.open("wb") as file:
        file.truncate(1 << 40)
    for path in (over, sparse):
        _key_file_env(monkeypatch, path)
        with pytest.raises(InvalidRequestError) as info:
            Credentials.from_env()
        assert info.value.field == "WUJIE_PRIVATE_KEY_FILE" and "larger than 64 KiB" in str(
            info.value
        )


@pytest.mark.long
def test_dev_zero_as_the_key_file_is_refused_unread() -> None:
    """WUJIE_PRIVATE_KEY_FILE=/dev/zero read until memory ran out (2.5 GB in 6 s). Run in a
    process whose memory is capped (the bug fails there with MemoryError) and whose time is
    bounded."""
    code = (
        "from wujie_async import Credentials, InvalidRequestError\n"
        "try:\n"
        "    Credentials.from_env()\n"
        "except InvalidRequestError as exc:\n"
        "    print(exc.field, exc.rule, sep=': ')\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("WUJIE_")}
    env |= {"WUJIE_APP_ID": "app", "WUJIE_PRIVATE_KEY_FILE": "/dev/zero"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=lambda: resource.setrlimit(
            resource.RLIMIT_AS, (1 << 30, resource.RLIM_INFINITY)
        ),
    )
    assert done.stdout.strip() == (
        "WUJIE_PRIVATE_KEY_FILE: cannot read /dev/zero: a character device, not a regular file"
    ), done.stderr


def test_missing_environment_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WUJIE_APP_ID", raising=False)
    monkeypatch.delenv("WUJIE_PRIVATE_KEY", raising=False)
    with pytest.raises(InvalidRequestError) as info:
        Credentials.from_env()
    assert [field for field, _ in info.value.violations] == ["WUJIE_APP_ID", "WUJIE_PRIVATE_KEY"]
    assert "WUJIE_PRIVATE_KEY_FILE" in str(info.value)  # the other way to give the key


async def test_header_is_cached_then_renewed(auth_vector: dict[str, Any]) -> None:
    now = [1_764_028_800.0]
    creds = Credentials(app_id=auth_vector["app_id"], private_key=auth_vector["private_key_pem"])
    signer = HeaderSigner(creds, max_age=240, clock=lambda: now[0])
    first = await signer.header()
    assert first == auth_vector["header"]
    now[0] += 239
    assert await signer.header() is first
    now[0] += 2
    renewed = await signer.header()
    assert renewed != first and str(int(now[0])) in renewed
    signer.invalidate()
    now[0] += 1
    assert await signer.header() != renewed
    assert "PRIVATE" not in repr(signer)
