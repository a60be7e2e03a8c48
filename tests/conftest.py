"""Test-suite rules: a test that starts TorchServe must be marked ``e2e``."""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from serving import TorchServe

_running: dict[str, Any] = {"item": None}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Remember the test being set up (before its fixtures, module-scoped ones included)."""
    _running["item"] = item


@pytest.fixture(scope="session", autouse=True)
def _torchserve_only_in_e2e_tests() -> Iterator[None]:
    """``TorchServe.start`` fails in a test (or its fixtures) without the ``e2e`` marker."""
    start = TorchServe.start

    def guarded(self: TorchServe, *args: Any, **kwargs: Any) -> None:
        item = _running["item"]
        if item is not None and item.get_closest_marker("e2e") is None:
            raise RuntimeError(f"{item.nodeid} starts TorchServe: mark it @pytest.mark.e2e")
        start(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TorchServe, "start", guarded)
        yield
