"""The command-line arguments every benchmark script takes: which recipe, on which data and device, and where
its runs and results go."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def recipe_parser(doc: str, runs_prefix: str, out: str) -> argparse.ArgumentParser:
    """A parser with KEY=VALUE overrides, --preset (default fast), --data-dir, --device, --runs-dir (default a
    new temporary folder named `runs_prefix`...) and --out (default `out`); the script adds its own options.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--preset", default="fast",
                        help="a packaged preset (`cifarcnn presets`; default: fast)")
    parser.add_argument("--data-dir")
    parser.add_argument("--device")
    parser.add_argument("--runs-dir", type=Path, default=Path(tempfile.mkdtemp(prefix=runs_prefix)))
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser
