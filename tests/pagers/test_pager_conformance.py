"""Every pager (swap, vnode, device) passes the pager conformance suite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vmpager.testing.pagers import (
    CONFORMANCE_CHECKS,
    PagerSubject,
    SubjectFactory,
    check_put_then_get,
    device_subject,
    swap_subject,
    vnode_subject,
)


def _factories(directory: Path) -> dict[str, SubjectFactory]:
    return {
        "swap": swap_subject,
        "vnode": lambda: vnode_subject(directory),
        "device": device_subject,
    }


@pytest.mark.parametrize("pager", ["swap", "vnode", "device"])
@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=lambda c: c.__name__)
def test_conformance(check: Callable[[SubjectFactory], None], pager: str, tmp_path: Path) -> None:
    check(_factories(tmp_path)[pager])


def test_the_suite_catches_a_pager_that_loses_writes(tmp_path: Path) -> None:
    """A vnode pager whose writes never reach the file fails the round trip."""

    def broken() -> PagerSubject:
        subject = vnode_subject(tmp_path)
        pager = subject.pager
        real = pager.put_pages

        def lossy(obj, pages, *, sync):  # type: ignore[no-untyped-def]
            results = real(obj, pages, sync=sync)
            with open(subject.obj.path, "r+b") as f:  # type: ignore[attr-defined]
                for page in pages:
                    f.seek(page.pindex * 4096)
                    f.write(subject.contents[page.pindex][:1])  # undo one byte
            return results

        pager.put_pages = lossy  # type: ignore[method-assign]
        return subject

    with pytest.raises(AssertionError, match="read back"):
        check_put_then_get(broken)
