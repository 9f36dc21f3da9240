"""The decode step's Triton kernels, checked on CPU by Triton's interpreter in a process of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_triton_kernels_match_their_torch_references():
    checks = Path(__file__).with_name("kernel_checks.py")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
                            env=os.environ | {"TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
