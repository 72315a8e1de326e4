"""serving/patches.py replaces private BentoML functions: only on the BentoML they were written for."""

from __future__ import annotations

import subprocess
import sys

from serving.patches import BENTOML_VERSION

from .conftest import ROOT


def apply(before: str = "") -> subprocess.CompletedProcess:
    """patches.apply() in a fresh process (this one may have imported service.py, which applied them)."""
    code = f"import bentoml\nfrom serving import patches\n{before}\npatches.apply()\nprint('applied')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_patches_apply_to_the_pinned_bentoml() -> None:
    assert f"bentoml=={BENTOML_VERSION}\n" in (ROOT / "requirements" / "serve.txt").read_text()
    result = apply()
    assert result.returncode == 0 and "applied" in result.stdout, result.stderr


def test_another_bentoml_version_stops_the_service_with_one_line() -> None:
    result = apply("bentoml.__version__ = '1.4.41'")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "BentoML 1.4.41 is installed: install bentoml==1.4.40" in result.stderr


def test_a_changed_function_stops_the_service_with_one_line() -> None:
    result = apply("patches.PATCHED_SOURCES['TimeoutMiddleware.__call__'] = '0' * 16")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "TimeoutMiddleware.__call__ is not the one serving/patches.py replaces" in result.stderr


def test_a_request_that_ends_without_an_answer_ends_at_once() -> None:
    """BentoML's TimeoutMiddleware, as patched: a request whose app sends nothing (its client left:
    serving/disconnect.py) ends with it, not at the timeout, and an app's exception passes at once."""
    code = """
import asyncio, time
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from serving import patches
patches.apply()

async def silent(scope, receive, send):
    await asyncio.sleep(0.01)

async def failing(scope, receive, send):
    raise ValueError("boom")

async def call(app):
    start = time.perf_counter()
    try:
        await TimeoutMiddleware(app, timeout=5)({"type": "http"}, None, None)
    except ValueError:
        pass
    return time.perf_counter() - start

print(max(asyncio.run(call(silent)), asyncio.run(call(failing))))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 2, result.stdout
