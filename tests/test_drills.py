"""The kill -9 drills of bench/fault_drills.py, in their fast form: one drill of one kill (bench/fault_drills.py --drills 10 for the figure)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_train import REPO


@pytest.mark.slow
def test_kill_9_drills_resume_bit_identical_to_an_uninterrupted_run(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "fault_drills.py"), "--drills", "1", "--kills", "1",
                             "--train_steps", "8", "--steps_per_checkpoint", "2", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["drills"] == 1 and report["kills"] >= 1, report
    assert report["exact_resumes"] == 1 and report["failed_resumes"] == 0, report
    assert report["corrupt_checkpoints"] == 0, report
