"""The fleet as an operator sees it: a Redis URL with an unreadable database refused, who
leads and how many keys are open, and a member told that the fleet gave its jobs away."""

from __future__ import annotations

import pytest

from wujie_async import InvalidRequestError
from wujie_async.fleet import RedisFleet

from .helpers import reported_locals

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret@127.0.0.1:6379/x",
        "redis://:s3cret@127.0.0.1:6379/1x",
        "rediss://:s3cret@127.0.0.1:6379/-1",
        "redis://:s3cret@127.0.0.1:6379/0/1",
        "redis://:s3cret@127.0.0.1:6379/%20",
    ],
)
def test_a_path_that_is_not_a_database_number_is_refused(url: str) -> None:
    # redis-py reads the path as the database and drops what it cannot read: redis://h/x used
    # database 0 without a word, though ?db=x was refused.
    with pytest.raises(InvalidRequestError) as caught:
        RedisFleet(url, name="x")
    assert caught.value.field == "url"
    assert "database number" in str(caught.value)
    for shown in (str(caught.value), repr(caught.value), *reported_locals(caught.value)):
        assert "s3cret" not in shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379",
        "redis://127.0.0.1:6379/",
        "redis://127.0.0.1:6379/15",
        "rediss://:pw@127.0.0.1:6379/%32",  # "2", percent-encoded: redis-py reads it so
        "unix:///tmp/redis.sock?db=2",  # there the path is the socket's
    ],
)
def test_a_database_number_or_no_path_is_accepted(url: str) -> None:
    RedisFleet(url, name="x")
