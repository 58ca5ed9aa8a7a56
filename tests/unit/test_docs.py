"""The docs an operator reads name every option, close cause and endpoint the code has."""

from __future__ import annotations

from pathlib import Path

from stablews.config import OPTIONS
from stablews.protocol import CloseCause, CloseCode

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_option_is_documented():
    text = (DOCS / "configuration.md").read_text()
    missing = [name for name in OPTIONS if f"`{name}`" not in text]
    assert missing == []


def test_every_close_cause_and_code_is_explained_in_operations():
    text = (DOCS / "operations.md").read_text()
    assert [c.value for c in CloseCause if f"`{c.value}`" not in text] == []
    assert [int(c) for c in CloseCode if str(int(c)) not in text] == []


def test_every_http_endpoint_is_documented():
    from stablews.app import StableServer

    text = (DOCS / "operations.md").read_text()
    paths = {route.path for route in StableServer().routes() if hasattr(route, "methods")}
    assert sorted(p for p in paths if p.replace("{conn_id}", "{id}") not in text and p not in text) == []
