"""The version both commands print: pyproject.toml's `version`, the one place it is set.

Installed (a virtualenv, the Debian packages) it comes from the package metadata pip wrote
from pyproject.toml; run from a bare checkout, from pyproject.toml itself."""

from __future__ import annotations

import functools
import tomllib
from importlib import metadata
from pathlib import Path


@functools.cache
def version() -> str:
    try:
        return metadata.version("waystation")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"
