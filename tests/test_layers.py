"""Which layers import which: serving an index must not load training code."""

import subprocess
import sys

from rshash.models.run import HashRun
from rshash.training import HashRun as TrainingHashRun


def test_index_and_service_import_no_training_code():
    """Guards against index/ or service/ importing rshash.training (the training loop, losses):
    `rshash index compact` or `rshash serve` would load them, and a serving install would need
    them. Run in a fresh interpreter, since this test process imported training already."""
    code = (
        "import sys, rshash.index, rshash.index.sharded, rshash.index.maintenance,"
        " rshash.service.app; print(sorted(m for m in sys.modules"
        " if m.startswith(('rshash.training', 'rshash.losses'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_training_still_exports_the_run():
    """Guards the re-export: code that imports HashRun from rshash.training keeps working."""
    assert TrainingHashRun is HashRun
