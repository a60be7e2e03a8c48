"""Handler modules load the way TorchServe loads them from a ``.mar`` (no server needed).

Inside an archive the handler and the shared modules sit flat in one folder (no ``handlers``
package), and TorchServe's loader takes a handler file's entry point to be its ONLY class
(``ts.utils.util.list_classes_from_module``): a second class defined in the file (a dataclass,
say) stops every worker from starting.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HANDLERS = Path(__file__).resolve().parents[1] / "handlers"
ENTRY_POINTS = sorted(p.stem for p in HANDLERS.glob("*_handler.py"))

CHECK = """
import importlib, sys
from ts.utils.util import list_classes_from_module
mod = importlib.import_module(sys.argv[1])
if sys.argv[1].endswith("_handler"):
    classes = [c.__name__ for c in list_classes_from_module(mod)]
    assert len(classes) == 1, f"{sys.argv[1]}.py defines {len(classes)} classes {classes}; TorchServe needs exactly one"
"""


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    """The handler modules copied flat into one folder, as in an unpacked ``.mar``."""
    out = tmp_path_factory.mktemp("mar")
    for p in HANDLERS.glob("*.py"):
        if p.name != "__init__.py":
            shutil.copy(p, out / p.name)
    return out


@pytest.mark.parametrize("module", sorted(p.stem for p in HANDLERS.glob("*.py") if p.name != "__init__.py"))
def test_module_imports_flat_and_handlers_have_one_class(flat, module):
    res = subprocess.run([sys.executable, "-c", CHECK, module], cwd=flat, capture_output=True, text=True,
                         env={"PYTHONPATH": str(flat), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_there_is_an_image_handler():
    assert "image_handler" in ENTRY_POINTS
