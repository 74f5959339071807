""".ci/run installs the Debian packages the tests need or stops with one line saying which and why, then runs
`make install-vllm` and `make test` with CI set. It runs for real under bash with a PATH of its own: apt-get, sudo,
id and make are stand-ins (installing system packages or running the whole suite cannot happen in a unit test)
that log their arguments; the stand-in apt-get "installs" a program by writing a stub of it."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

CI_RUN = Path(__file__).resolve().parents[2] / ".ci" / "run"
PROGRAMS = ("espeak-ng", "chromium", "g++")
"""What the tests need from Debian (program names; the packages are named alike)."""
TOOLS = ("dirname", "env", "chmod")
"""Real programs the script and the stand-ins use."""


@dataclass
class Outcome:
    """How one run of .ci/run ended."""

    code: int
    stderr: str
    log: list[str]
    """The stand-ins' calls in order, e.g. ['apt-get update -qq', 'make install-vllm CI=1']."""


def stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def run_ci(tmp: Path, present=(), apt: str | None = None, uid: int = 0, sudo: bool = False) -> Outcome:
    """Run .ci/run with `present` programs on PATH; apt: None (no apt-get), 'installs' or 'installs-nothing'."""
    bin_dir, log = tmp / "bin", tmp / "calls.log"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for program in present:
        stub(bin_dir / program, "exit 0")
    stub(bin_dir / "id", f"echo {uid}")
    stub(bin_dir / "make", f'echo "make $* CI=$CI" >> {log}')
    if sudo:
        stub(bin_dir / "sudo", '[ "$1" = -n ] && shift; "$@"')
    if apt is not None:
        installs = "".join(f'printf "#!/bin/bash\\n" > {bin_dir}/{p}; chmod +x {bin_dir}/{p}; '
                           for p in PROGRAMS) if apt == "installs" else ""
        stub(bin_dir / "apt-get", f'echo "apt-get $* DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> {log}\n'
                                  f'if [ "$1" = install ]; then {installs}:; fi')
    env = {"PATH": str(bin_dir), "HOME": str(tmp)}
    done = subprocess.run(["/bin/bash", str(CI_RUN)], env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return Outcome(done.returncode, done.stderr, calls)


MAKE = ["make install-vllm CI=1", "make test CI=1"]
"""The stand-in make's log of .ci/run's two make commands, CI set by .ci/run itself."""
NONINTERACTIVE = "DEBIAN_FRONTEND=noninteractive"


def test_with_every_program_present_it_installs_nothing_and_runs_the_tests_under_ci(tmp_path):
    out = run_ci(tmp_path, present=PROGRAMS)
    assert out.code == 0 and out.log == MAKE, out


def test_as_root_it_installs_what_is_missing(tmp_path):
    out = run_ci(tmp_path, present=["espeak-ng"], apt="installs")
    assert out.code == 0, out
    assert out.log == [f"apt-get update -qq {NONINTERACTIVE}",
                       f"apt-get install -y -qq --no-install-recommends chromium g++ {NONINTERACTIVE}", *MAKE]


def test_with_passwordless_sudo_it_installs_what_is_missing(tmp_path):
    out = run_ci(tmp_path, apt="installs", uid=1000, sudo=True)
    assert out.code == 0, out
    assert out.log == [f"apt-get update -qq {NONINTERACTIVE}",
                       f"apt-get install -y -qq --no-install-recommends espeak-ng chromium g++ {NONINTERACTIVE}", *MAKE]


@pytest.mark.parametrize("case, why", [
    ({"apt": None}, "has no apt-get"),
    ({"apt": "installs", "uid": 1000}, "as root or with passwordless sudo"),
    ({"apt": "installs-nothing"}, "still not on PATH"),
])
def test_it_stops_with_one_line_naming_the_packages(tmp_path, case, why):
    out = run_ci(tmp_path, **case)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.code == 1 and not [c for c in out.log if c.startswith("make")], out
    assert len(lines) == 1 and lines[0].startswith(".ci/run: error:") and why in lines[0], out.stderr
    assert all(program in lines[0] for program in PROGRAMS), lines[0]
