"""API keys: where they come from, what they allow, and when a gateway may run without them."""

from __future__ import annotations

from pathlib import Path

import pytest
from lego_cli.main import main
from lego_gateway.auth import ApiKeys, check_bind, is_loopback, load_api_keys


def test_keys_come_from_a_file_and_the_environment(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nalpha\n\n beta  # the CI key\n")
    keys = load_api_keys(keys_file, {"LEGO_API_KEYS": "gamma, ,delta"})
    for key in ("alpha", "beta", "gamma", "delta"):
        assert keys.allows(f"Bearer {key}")
    assert keys.allows("bearer alpha")  # the scheme is case-insensitive
    for header in (None, "", "alpha", "Basic alpha", "Bearer ", "Bearer alph", "Bearer alpha2"):
        assert not keys.allows(header)


def test_without_keys_everything_is_allowed_and_only_loopback_may_be_bound() -> None:
    open_gateway = ApiKeys(frozenset())
    assert open_gateway.allows(None) and not open_gateway.required
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        assert is_loopback(host)
        check_bind(host, open_gateway, insecure_no_auth=False)
    for host in ("0.0.0.0", "::", "10.0.0.5", "gateway.internal"):
        with pytest.raises(ValueError, match=r"refusing to serve on .* without API keys"):
            check_bind(host, open_gateway, insecure_no_auth=False)
        check_bind(host, open_gateway, insecure_no_auth=True)
        check_bind(host, ApiKeys(frozenset({"k"})), insecure_no_auth=False)


def test_lego_up_refuses_an_open_public_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--host", "0.0.0.0"]) == 2
    assert "--insecure-no-auth" in capsys.readouterr().err
