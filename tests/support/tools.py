"""Finding the system tools the tests drive. In CI a missing tool fails; locally it skips."""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_tool(name: str) -> str:
    """The path of ``name``; fail in CI (a missing install step), skip elsewhere."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (scripts/install-system-deps installs it)"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
