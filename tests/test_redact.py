"""A URL's password never reaches a message: errors, store names and warnings show ``user:***@``."""

from __future__ import annotations

from pathlib import Path

import pytest

from dali_arb.cli import main
from dali_arb.data.storage import store_name
from dali_arb.errors import StorageError, redact
from support.loopback import RangeHTTPServer

SECRET = "s3cret-Pw"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"https://alice:{SECRET}@example.org/a.tar", "https://alice:***@example.org/a.tar"),
        (
            f"reading s3://k:{SECRET}@bucket/x and http://u:{SECRET}@h:80/y",
            "reading s3://k:***@bucket/x and http://u:***@h:80/y",
        ),
        ("https://alice@example.org/a.tar", "https://alice@example.org/a.tar"),  # no password: nothing to hide
        ("https://example.org/a@b.tar", "https://example.org/a@b.tar"),  # an @ in the path is not user information
        ("/data/user:pw@x/a.jpg", "/data/user:pw@x/a.jpg"),  # a local path is not a URL
    ],
)
def test_redact_hides_only_url_passwords(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_errors_and_store_names_hide_the_password() -> None:
    url = f"https://alice:{SECRET}@example.org/shard.tar"
    error = StorageError(f"not found: {url}", source=url, cause=f"GET {url} 404")
    assert SECRET not in str(error) and SECRET not in error.source and SECRET not in error.cause
    assert SECRET not in "".join(error.__notes__)
    assert store_name(url) == "https://alice:***@example.org"


def test_cli_error_line_hides_the_password(tmp_path: Path, capsys) -> None:
    with RangeHTTPServer(tmp_path) as http:
        url = http.url.replace("http://", f"http://alice:{SECRET}@") + "/missing.tar"
        code = main(["index", url, "-o", str(tmp_path / "m.parquet")])
    out, err = capsys.readouterr()
    assert code != 0
    assert "alice:***@" in err and SECRET not in err + out
