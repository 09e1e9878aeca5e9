"""The dashboard's files as the service serves them (in-process app, no browser): the page at ``/`` with a
same-origin-only content security policy, every module it imports with a JavaScript type, nothing outside
``api/static``, and no reference to any other origin. The flows themselves run in Chromium in
``tests/test_browser_dashboard.py``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import make_app, make_settings

from api.routes.ui import STATIC


@pytest.fixture
def client(tmp_path: Path):
    with TestClient(make_app(make_settings(tmp_path))) as c:
        yield c


def test_the_page_and_its_modules(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-eval" not in csp and r.headers["x-content-type-options"] == "nosniff"
    # Every module, found by following the imports from the page's entry point, is served as JavaScript.
    seen: set[str] = set()
    todo = re.findall(r'src="(/ui/[^"]+\.js)"', r.text)
    assert todo == ["/ui/js/app.js"]
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        module = client.get(url)
        assert module.status_code == 200, url
        assert module.headers["content-type"].startswith("text/javascript"), url
        todo += [f"/ui/js/{name}" for name in re.findall(r'from "\./([\w.]+\.js)"', module.text)]
    assert seen == {f"/ui/js/{p.name}" for p in (STATIC / "js").glob("*.js")}
    # The page preloads every module (one round trip instead of one per import level).
    assert set(re.findall(r'rel="modulepreload" href="([^"]+)"', r.text)) == seen - {"/ui/js/app.js"}
    assert client.get("/ui/app.css").headers["content-type"].startswith("text/css")


def test_nothing_from_another_origin() -> None:
    for path in STATIC.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), path  # the SVG namespace only


@pytest.mark.parametrize("path", ["/ui/../routes/ui.py", "/ui/%2e%2e/routes/ui.py", "/ui/js/nope.js", "/ui/js",
                                  "/ui/../../pyproject.toml", "/ui/index.htm"])
def test_nothing_else_is_served(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_the_files_ship_with_the_package() -> None:
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'api = ["static/*", "static/**/*"]' in pyproject
