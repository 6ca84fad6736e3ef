"""Every command line's --help shows the defaults and gives each flag a help text."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["ckpt", "eval", "qdp", "quant", "sample", "studies", "toyworld.toy", "train", "unet", "vae",
           "toyworld.world"]


def options_without_help(text):
    """The option lines of a --help text ("  --flag ARG  text", or "  --flag ARG" over an indented text line) that
    have no description."""
    lines = text.splitlines()
    bare = []
    for i, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        if re.search(r"\S\s{2,}\S", line.strip()):        # the description follows on the same line
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if not (following.startswith(" " * 4) and not following.lstrip().startswith("-") and following.strip()):
            bare.append(line.strip())
    return bare


@pytest.mark.parametrize("module", MODULES)
def test_help(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(default:" in result.stdout
    assert options_without_help(result.stdout) == [], result.stdout


def test_options_without_help():
    text = ("options:\n  -h, --help  show this help message and exit\n  --seed SEED\n  --out OUT\n"
            "  --very_long_option_name VERY_LONG_OPTION_NAME\n                        the description\n")
    assert options_without_help(text) == ["--seed SEED", "--out OUT"]
