"""Fixtures for every test: an isolated data-set cache for the whole session.

Helpers that tests import (tiny-run settings, the image-tree writer) are in
:mod:`tests.helpers`.
"""

from __future__ import annotations

import pytest

from kinfonce.data.cache import CACHE_ENV


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Point the decoded-image cache at a session temporary directory, so that no test reads
    or writes the user's ``~/.cache/kinfonce``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("kinfonce-cache")))
        yield
