from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from wujie_async import Credentials, InvalidRequestError
from wujie_async._auth import HeaderSigner, original_text

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
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert secret not in caplog.text


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
