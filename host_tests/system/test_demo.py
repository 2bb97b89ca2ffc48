"""`make demo`'s main job runs start to finish: a charging session, a meter fault, signed readings."""

import subprocess
import sys

from conftest import ROOT


def test_demo_runs_the_scenario_and_reports_a_clean_finish():
    result = subprocess.run([sys.executable, "-m", "evse_tools.cli.demo", "--seconds", "12"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "[agent]" in out and "import" in out  # live readings printed by the agent
    assert "evse/sim-001/telemetry" in out  # what the subscriber received
    assert "meter OFFLINE" in out and out.count("meter online") >= 2  # fault shown and recovered
    assert "gaps: none" in out
    assert "END sim-001-" in out and "OCMF documents verify" in out
    assert out.rstrip().endswith("demo finished")
