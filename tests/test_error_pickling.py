"""Every error of the package survives pickling, message and attributes, and carries no secret.

A process pool sends an error raised in a worker back pickled: an error that cannot be
unpickled (``SubmitUncertainError`` took ``request`` as a keyword) came back as a
``BrokenProcessPool``, or not at all. The classes are found, not listed: a new error class is
checked as soon as it exists (and fails here until its constructor's arguments have samples).
"""

from __future__ import annotations

import inspect
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import wujie_async
import wujie_async.fleet
from wujie_async import (
    GeneratedImage,
    ImageResult,
    RetryPolicy,
    SubmitUncertainError,
    WujieClient,
    WujieError,
)

from .hostile import recording_gateway, throwaway_credentials

_SAMPLES: dict[str, Any] = {
    "message": "the gateway said no (see https://example.com/help)",
    "violations": [("size", "must be one of 256x256|512x512"), ("n", "must be 1 to 10")],
    "max_points": 100.0,
    "spent": 60.5,
    "reserved": 30.0,
    "needed": 12.0,
    "model": "dall-e-3",
    "unpriced": True,
    "reported_unreadably": True,
    "http_status": 418,
    "code": "20010001",
    "body": '{"code":"20010001"}',
    "url": "https://gateway.example/wj-open/v1/ai/wj/images/generations",
    "location": "https://elsewhere.example/",
    "limit": 1024,
    "why": "nests deeper than 64",
    "retry_after": 2.5,
    "reached_server": True,
    "lasting": True,
    "request": {"prompt": "a cat", "model": "dall-e-2", "n": 2},
    "job_key": "0123456789abcdef0123456789abcdef",
    "fail_code": 20110001,
    "fail_message": "the prompt was refused",
    "was_listed": True,
    "result": ImageResult(
        key="0123456789abcdef0123456789abcdef",
        status=4,
        images=(GeneratedImage(index=0, url="https://cdn.example/0.png"),),
    ),
    "expected": 2,
    "base_url": "https://gateway.example/wj-open/v1",
    "fleet_base_url": "https://other.example/wj-open/v1",
    "shard": 3,
    "path": Path("/tmp/journal.sqlite"),
    "pid": 4242,
    "host": "build-7",
}


def _error_classes() -> Iterator[type[WujieError]]:
    """Every public error class, and every other subclass of WujieError the package defines."""
    found: dict[str, type[WujieError]] = {}
    for module in (wujie_async, wujie_async.fleet):
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, BaseException):
                assert issubclass(value, WujieError), f"{name} is not a WujieError"
                found[f"{value.__module__}.{value.__qualname__}"] = value
    stack: list[type[WujieError]] = [WujieError]
    while stack:
        cls = stack.pop()
        if cls.__module__.startswith("wujie_async"):
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
        stack += cls.__subclasses__()
    return iter(sorted(found.values(), key=lambda cls: cls.__qualname__))


def _arguments(cls: type[WujieError]) -> tuple[list[Any], dict[str, Any]]:
    """Sample arguments for ``cls(...)``: those of its __init__, and of each __init__ that
    its ``**kwargs`` are passed on to."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for owner in cls.__mro__:
        init = owner.__dict__.get("__init__")
        if init is None or owner in (BaseException, Exception):
            continue
        passes_on = False
        for parameter in list(inspect.signature(init).parameters.values())[1:]:
            if parameter.kind is parameter.VAR_KEYWORD:
                passes_on = True
            elif parameter.kind is parameter.VAR_POSITIONAL:
                continue
            elif parameter.name not in kwargs and parameter not in args:
                assert parameter.name in _SAMPLES, f"{cls.__name__}: no sample {parameter.name}"
                if parameter.kind is parameter.POSITIONAL_ONLY:
                    args.append(_SAMPLES[parameter.name])
                else:
                    kwargs[parameter.name] = _SAMPLES[parameter.name]
        if not passes_on:
            break
    return args, kwargs


def _state(error: BaseException) -> dict[str, Any]:
    return {
        "type": type(error),
        "str": str(error),
        "args": error.args,
        "attributes": dict(vars(error)),
        "systemic": getattr(error, "systemic", None),
    }


_CLASSES = list(_error_classes())


def test_the_public_errors_are_all_found() -> None:
    names = {cls.__name__ for cls in _CLASSES}
    assert {"SubmitUncertainError", "JobFailedError", "FleetUnavailableError"} <= names
    assert {"LeaseLostError", "JournalLockedError", "ReplyTooComplexError"} <= names


@pytest.mark.parametrize("cls", _CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_round_trips_through_pickle(cls: type[WujieError]) -> None:
    args, kwargs = _arguments(cls)
    error = cls(*args, **kwargs)
    error.add_note("while saving the images of a job")
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        again = pickle.loads(pickle.dumps(error, protocol=protocol))
        assert _state(again) == _state(error)
        assert again.__notes__ == error.__notes__
        assert isinstance(again, cls)


def test_the_chain_and_traceback_are_not_pickled() -> None:
    try:
        try:
            raise ValueError("cut: Authorization: secretKeyVersion ...")
        except ValueError as cause:
            raise SubmitUncertainError("no reply", request={"prompt": "x"}) from cause
    except SubmitUncertainError as raised:
        error = raised
    again = pickle.loads(pickle.dumps(error))
    assert again.request == {"prompt": "x"} and again.reached_server
    assert again.__cause__ is None and again.__context__ is None
    assert again.__traceback__ is None
    assert b"secretKeyVersion" not in pickle.dumps(error)


@pytest.mark.anyio
async def test_an_uncertain_submit_that_quoted_the_signature_pickles_without_it() -> None:
    # The gateway's "success" quotes the request's Authorization header and no key: the
    # submit is uncertain. Its error, pickled (as a process pool sends it), keeps the request
    # and the message, and no piece of the signature.
    creds = throwaway_credentials()
    async with recording_gateway() as gateway:
        client = WujieClient(
            creds,
            base_url=f"{gateway.origin}/echo-200-data",
            retry=RetryPolicy(max_attempts=1, initial_wait=0),
        )
        async with client:
            with pytest.raises(SubmitUncertainError) as info:
                await client.images.submit(prompt="x", model="dall-e-2")
    signs = [json.loads(header)["sign"] for header in gateway.authorizations]
    assert signs
    data = pickle.dumps(info.value)
    again = pickle.loads(data)
    assert str(again) == str(info.value)
    assert again.request == info.value.request and again.request["prompt"] == "x"
    for sign in signs:
        for start in range(0, len(sign) - 24, 8):
            assert sign[start : start + 24].encode() not in data
