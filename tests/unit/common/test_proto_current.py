"""The committed gRPC stubs must match proto/: regenerate with `make proto`."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_generated_stubs_are_current(tmp_path):
    subprocess.run(
        ["bash", str(ROOT / "scripts/gen_proto.sh"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
    )
    committed = ROOT / "services/rlfleet/v1"
    generated = tmp_path / "rlfleet/v1"
    names = sorted(p.name for p in generated.iterdir() if p.suffix in (".py", ".pyi"))
    assert names, "the generator produced nothing"
    stale = [n for n in names if not filecmp.cmp(generated / n, committed / n, shallow=False)]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit the result"
