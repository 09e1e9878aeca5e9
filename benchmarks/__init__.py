"""Benchmarks: each prints or writes its ratios against a baseline measured in the same run."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-root`` and ``--cache-dir``: where the Omniglot zips are, and where they are decoded."""
    parser.add_argument("--data-root", type=Path, default=os.environ.get("MAML_DATA_ROOT") or None,
                        help="folder of the Omniglot zips, or its parent (default: $MAML_DATA_ROOT)")
    parser.add_argument("--cache-dir", type=Path,
                        default=os.environ.get("MAML_CACHE_DIR") or Path("~/.cache/maml-service"),
                        help="decoded Omniglot cache (default: $MAML_CACHE_DIR, else ~/.cache/maml-service)")
