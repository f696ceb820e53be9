"""The pooler settings in a storage URL (issue 17): removed before asyncpg sees them."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from asyncstore.storage import InvalidInput, StorageSettings
from asyncstore.storage._topology import resolve, split_dsn

DIRECT = "postgresql://app@pg:5432/db"
BOUNCER = "postgresql://app@bouncer:6432/db"


def test_library_parameters_are_removed_and_the_rest_kept() -> None:
    encoded = "postgresql%3A%2F%2Fapp%40pg%3A5432%2Fdb"
    url = f"{BOUNCER}?sslmode=disable&pooled=true&listen_url={encoded}"
    assert split_dsn(url) == (f"{BOUNCER}?sslmode=disable", True, DIRECT)
    assert split_dsn(BOUNCER) == (BOUNCER, None, None)
    assert split_dsn(f"{BOUNCER}?pooled=off") == (BOUNCER, False, None)


def test_a_multi_host_dsn_is_left_whole() -> None:
    url = "postgresql://app@h1:5432,h2:5433/db?target_session_attrs=read-write"
    assert split_dsn(url) == (url, None, None)
    assert resolve(StorageSettings(url=SecretStr(url))).session_dsn == url


def test_bad_values_are_refused() -> None:
    with pytest.raises(InvalidInput):
        split_dsn(f"{BOUNCER}?pooled=maybe")
    with pytest.raises(InvalidInput):
        pooled_listen = SecretStr(f"{BOUNCER}?pooled=1")
        resolve(StorageSettings(url=SecretStr(BOUNCER), listen_url=pooled_listen))


def test_settings_win_over_the_url_and_pooled_needs_a_listen_url() -> None:
    settings = StorageSettings(
        url=SecretStr(f"{BOUNCER}?pooled=false"), pooled=True, listen_url=SecretStr(DIRECT)
    )
    plan = resolve(settings)
    assert (plan.dsn, plan.pooled, plan.session_dsn) == (BOUNCER, True, DIRECT)
    plan = resolve(StorageSettings(url=SecretStr(f"{BOUNCER}?pooled=true")))
    assert plan.session_dsn is None
    assert resolve(StorageSettings(url=SecretStr(DIRECT))).session_dsn == DIRECT


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:secret@bouncer:6432/db?pooled=true"
        "&listen_url=postgresql%3A%2F%2Fapp%3Asecret%40pg%3A5432%2Fdb",
        "postgresql://bouncer/db?password=secret&sslmode=require",
        "postgresql://app:secret@h:notaport/db",
    ],
)
def test_a_password_anywhere_in_the_url_is_masked_in_messages(url: str) -> None:
    # The schema guard and doctor name the database by its URL; with listen_url in the
    # query string the direct DSN's password must not leak either.
    from asyncstore.storage._schema import mask_url

    masked = mask_url(url)
    assert "secret" not in masked and "***" in masked
