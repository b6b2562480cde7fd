"""Running ``python -m dopt`` as a user would, and the shape every user error must have."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dopt(*args, cwd=None):
    return subprocess.run([sys.executable, "-W", "ignore", "-m", "dopt", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd or ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def one_paragraph_error(r, *needles):
    """Exit status 2, one line on stderr starting 'dopt: error:', no traceback, the needles."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip()
    assert err.startswith("dopt: error:") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
