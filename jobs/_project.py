"""Imported first by every job: run the trimodal these jobs were shipped with, or say in one line why not.

`ray job submit --working-dir . -- python jobs/X.py` runs X in an uploaded copy of this repository, with the
`python` the Ray head found on its PATH. The copy's `platform/` goes first on sys.path, so a job runs the library it
was submitted with (not whatever an older install left on the node). When that Python lacks the project's
dependencies (the head was started outside the virtual environment) the job stops with one line saying what to do.
"""

import importlib.util
import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1] / "platform"
REQUIRED = ("torch", "transformers", "ray", "pyarrow")

if (SOURCE_ROOT / "trimodal").is_dir() and str(SOURCE_ROOT) not in sys.path:
    sys.path.insert(0, str(SOURCE_ROOT))

_missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if _missing:
    sys.exit(f"error: this job runs under {sys.executable}, which has no {', '.join(_missing)}: the Ray head was "
             "probably started outside the project's virtual environment. Restart it from the venv "
             "(`ray stop; source .venv/bin/activate; ray start --head ...`, or `make jobs`), or submit with "
             "`-- /path/to/trimodal/.venv/bin/python jobs/...`")
