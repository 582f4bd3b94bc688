from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmpager.mapped.client import PagerProcess
from vmpager.testing.mapped import pager_fixture


@pytest.fixture
def pager() -> Iterator[PagerProcess]:
    """A pager process with a 64-frame budget (256 KiB)."""
    yield from pager_fixture()
