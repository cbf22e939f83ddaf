"""The package version. Its one home is pyproject.toml: an installed package reads it from its metadata, a source tree
that was never installed from pyproject.toml itself, and setup.py (which compiles it into the library) from there too.
"""

from __future__ import annotations

import os
import re

UNKNOWN = "0+unknown"  # a PEP 440 version that sorts before every release: neither metadata nor pyproject.toml found


def pyproject_version(path: str) -> str | None:
    """``[project] version`` of the pyproject.toml at ``path``; None if there is no such file or line."""
    try:
        with open(path) as f:
            match = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    except OSError:
        return None
    return match.group(1) if match else None


def package_version() -> str:
    """The installed distribution's version; in a source tree that is not installed, its pyproject.toml's."""
    from importlib import metadata

    try:
        return metadata.version("fasterrcnn_ext")
    except metadata.PackageNotFoundError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return pyproject_version(os.path.join(root, "pyproject.toml")) or UNKNOWN
