"""`lldif kernels` runs every available backend and reports it."""

from __future__ import annotations

import os
import subprocess
import sys

from lldif_kernels import dispatch


def test_kernels_check_reports_every_backend():
    # As a user runs it: without the interpreter, which would make the Triton row take minutes.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "lldif.cli", "kernels", "--device", "cpu"], env=env,
                         capture_output=True, text=True, check=True)
    rows = {line.split()[0]: line for line in run.stdout.splitlines()[1:] if line.split()}
    assert set(dispatch.BACKENDS) <= set(rows)
    assert "declined" not in rows["reference"] and "declined" not in rows["cpp"]
    assert "declined" in rows["cuda"] and "declined" in rows["triton"]
