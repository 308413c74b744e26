"""Running code a model wrote: each program in a fresh `python -I` subprocess in a temporary directory, killed at its
timeout. Process isolation, not a sandbox: the code can still touch the file system and the network, so every caller
runs it only after an explicit opt-in (HumanEval's `confirm_run_unsafe_code`, the Python tool's)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from typing import NamedTuple


class ProgramResult(NamedTuple):
    """`status`: "passed" (exit code 0), "failed" or "timed out"; `output`: its stdout then stderr."""

    status: str
    output: str


def run_python(program: str, timeout: float = 3.0) -> ProgramResult:
    """Run `program` in a fresh isolated interpreter (no user site, no environment paths) with no stdin."""
    with tempfile.TemporaryDirectory(prefix="trl-onpolicy-code-") as cwd:
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", program], check=False, cwd=cwd,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return ProgramResult("timed out", "")
    return ProgramResult("passed" if proc.returncode == 0 else "failed", proc.stdout + proc.stderr)
