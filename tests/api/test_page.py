"""The static Q&A page's response headers."""

from __future__ import annotations

from tests.api.conftest import World, make_client


def test_page_headers(world: World) -> None:
    with make_client(world) as client:
        page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"  # one charset, not two
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.content.lower().startswith(b"<!doctype html")
