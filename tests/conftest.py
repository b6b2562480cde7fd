import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

# Under pytest-xdist (`-n 2`) each worker gets one core's worth of threads, so two workers
# do not oversubscribe a 2-core machine (torch/OpenMP, TensorFlow and the emulated runtime
# read these at start-up; subprocesses inherit them).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(var, "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA
