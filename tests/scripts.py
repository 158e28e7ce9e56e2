"""Import a script of benchmarks/ or scripts/ by file path (they are not packages), for the tests."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = ROOT / "scripts"


def load_benchmark(name: str, folder: Path = BENCHMARKS):
    """The module ``<folder>/<name>.py`` (``benchmarks/`` by default), registered in
    ``sys.modules`` under ``name`` while it runs its top level (dataclasses look their module
    up there)."""
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_script(name: str):
    """The module ``scripts/<name>.py``."""
    return load_benchmark(name, SCRIPTS)
