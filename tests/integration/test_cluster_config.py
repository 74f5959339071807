"""cluster.yaml and serve_app/serve_config.yaml, checked offline against the schemas that ship with Ray.

Nothing is launched: the cluster config is validated with the autoscaler's JSON schema (ray/autoscaler/ray-schema.json)
and Ray's own `prepare_config` + `validate_config`; then every node type, local file and resource it names is
checked, and the `phi2` preset's ScalingConfig must fit the A100 worker type. The Serve config is validated with
`ray.serve.schema.ServeDeploySchema` and must fit on the cluster's nodes. The Python the nodes build their venvs with
must satisfy pyproject's requires-python and the Requires-Python of every pinned distribution (read offline from the
installed venvs' metadata).
"""

from __future__ import annotations

import email
import importlib.metadata
import json
import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
SERVE_CONFIG = ROOT / "serve_app" / "serve_config.yaml"
TOKEN_MOUNT = "~/.ray/auth_token"  # Ray's default token path; `ray get-auth-token --generate` creates it
CUDA_TORCH_INDEX = "https://download.pytorch.org/whl/cu"
VLLM_VENV = ROOT / ".venv-vllm"
SETUP_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
IMAGE_PYTHON = {"ubuntu-2204": "3.10", "ubuntu-2404": "3.12", "debian-11": "3.9", "debian-12": "3.11"}
"""The /usr/bin/python3 of each OS release an image family name carries (Ubuntu's and Debian's default python3)."""
MAKE_INSTALL = re.compile(r"\bmake\s+(install[\w-]*)((?:\s+[A-Z_]+=\S+)*)")
"""A `make install*` call and the VAR=value arguments after its target."""


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def gpu_type(cluster) -> dict:
    """The (single) worker node type that provides a GPU."""
    gpu_types = [t for name, t in cluster["available_node_types"].items()
                 if name != cluster["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert len(gpu_types) == 1, "expected exactly one GPU worker type"
    return gpu_types[0]


def _phi2_worker_resources(stage: int) -> dict[str, float]:
    """Resources one Ray Train worker of the phi2 preset requests (incl. accelerator_type:<type>)."""
    from trimodal.config import load_config
    from trimodal.training.scaffold import scaling_config

    cfg = load_config("phi2")
    return dict(scaling_config(getattr(cfg, f"stage{stage}"))._resources_per_worker_not_none)


def test_validates_against_the_autoscaler_schema(cluster):
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_ray_prepares_and_validates_it(cluster):
    """Ray's own checks beyond the schema (defaults merged, node types consistent, head max_workers...)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(CLUSTER_YAML.read_text())))


def test_node_types(cluster, gpu_type):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    workers = {n: t for n, t in types.items() if n != cluster["head_node_type"]}
    assert workers, "no worker node type"
    for name, node_type in workers.items():
        assert node_type.get("min_workers", 0) == 0, f"{name}: workers must scale from zero"
        assert 1 <= node_type["max_workers"] <= cluster["max_workers"], name
    assert cluster["idle_timeout_minutes"] > 0
    assert gpu_type["node_config"]["machineType"] == "a2-highgpu-1g"
    assert gpu_type["resources"]["GPU"] == 1
    assert gpu_type["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


def test_every_file_mount_exists_locally(cluster):
    for remote, local in cluster["file_mounts"].items():
        if local == TOKEN_MOUNT:  # created on the user's machine before `ray up` (docs/cluster.md)
            assert remote == TOKEN_MOUNT, "the token must land on Ray's default path on every node"
            continue
        assert not Path(local).is_absolute(), f"{local}: use a path relative to the repository root"
        assert (ROOT / local).exists(), f"file_mounts {remote!r}: {local} does not exist in the repository"
    synced = {Path(local).name for local in cluster["file_mounts"].values()}
    assert {"platform", "jobs", "serve_app", "pyproject.toml", "Makefile"} <= synced


@pytest.mark.parametrize("stage", [1, 2])
def test_gpu_worker_provides_what_the_phi2_preset_requests(gpu_type, stage):
    requested = _phi2_worker_resources(stage)
    assert any(k.startswith("accelerator_type:") for k in requested), "phi2 should request its accelerator type"
    provided = gpu_type["resources"]
    for key, amount in requested.items():
        assert provided.get(key, 0) >= amount, f"stage {stage} requests {key}={amount}; worker has {provided}"


def test_setup_installs_a_cuda_torch(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert "make install" in setup and CUDA_TORCH_INDEX in setup and "TORCH_SPEC=torch==" in setup


def test_ray_starts_with_token_auth_and_a_local_dashboard(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head + worker
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head


def _max_replicas(deployment: dict) -> int:
    auto = deployment.get("autoscaling_config")
    if auto:
        return int(auto["max_replicas"])
    replicas = deployment.get("num_replicas", 1)
    return replicas if isinstance(replicas, int) else 1  # "auto" is covered by autoscaling_config


@pytest.fixture(scope="module")
def serve_config() -> dict:
    """The raw Serve config, after it validated with ServeDeploySchema."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(SERVE_CONFIG.read_text())
    ServeDeploySchema.model_validate(raw)
    return raw


def test_serve_config_validates_and_stays_on_loopback(serve_config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config)
    assert schema.applications, "no application"
    assert schema.http_options.host == "127.0.0.1"


def test_serve_config_fits_the_cluster(serve_config, cluster, gpu_type):
    """At full scale-out, the GPU deployments fit on one A100 worker and all CPUs on head + worker."""
    head = cluster["available_node_types"][cluster["head_node_type"]]["resources"]
    gpus = gpu_cpus = all_cpus = 0.0
    for app in serve_config["applications"]:
        for dep in app.get("deployments", []):
            options = dep.get("ray_actor_options") or {}
            n = _max_replicas(dep)
            all_cpus += n * options.get("num_cpus", 1)
            if options.get("num_gpus", 0) > 0:
                gpus += n * options["num_gpus"]
                gpu_cpus += n * options.get("num_cpus", 1)
            for key, amount in (options.get("resources") or {}).items():
                assert gpu_type["resources"].get(key, 0) >= amount, f"{dep['name']} needs {key}"
    assert gpus <= gpu_type["resources"]["GPU"] + 1e-9, f"GPU deployments need {gpus} GPUs on one worker"
    assert gpu_cpus <= gpu_type["resources"]["CPU"], f"GPU deployments need {gpu_cpus} CPUs on one worker"
    assert all_cpus <= head["CPU"] + gpu_type["resources"]["CPU"], all_cpus


def test_cluster_yaml_has_no_secrets():
    text = CLUSTER_YAML.read_text()
    token_file = Path(os.path.expanduser(TOKEN_MOUNT))
    if token_file.is_file():
        assert token_file.read_text().strip() not in text
    assert "BEGIN PRIVATE KEY" not in text and "RAY_AUTH_TOKEN=" not in text


def test_the_gpu_worker_serves_the_language_model_on_the_vllm_engine(serve_config, cluster):
    """The worker builds the vllm environment with CUDA vLLM; the config's LanguageModel runs in it."""
    worker_setup = " ".join(cluster["worker_setup_commands"])
    assert "make install-vllm" in worker_setup and "VLLM_CONSTRAINTS=constraints-vllm-cuda.txt" in worker_setup
    assert CUDA_TORCH_INDEX in worker_setup
    app = serve_config["applications"][0]
    assert app["args"]["serving.engine"] == "vllm"
    lm = next(d for d in app["deployments"] if d["name"] == "LanguageModel")
    assert lm["ray_actor_options"]["runtime_env"]["py_executable"].endswith("/trimodal/.venv-vllm/bin/python")


def _setup_commands(cluster: dict) -> list[str]:
    return [command for key in SETUP_KEYS for command in cluster.get(key) or []]


def _make_installs(cluster: dict) -> list[tuple[str, dict[str, str]]]:
    """Every `make install*` call of the setup commands: (target, its VAR=value arguments)."""
    calls = []
    for command in _setup_commands(cluster):
        for target, args in MAKE_INSTALL.findall(command):
            calls.append((target, dict(arg.split("=", 1) for arg in args.split())))
    return calls


def _apt_installed(cluster: dict) -> set[str]:
    """Package names that `apt-get install` / `apt install` lines of the setup commands name."""
    packages: set[str] = set()
    for command in _setup_commands(cluster):
        for step in re.split(r"&&|\|\||;", command):
            words = step.split()
            if any(w in ("apt-get", "apt") for w in words) and "install" in words:
                after = words[words.index("install") + 1:]
                packages |= {w for w in after if not w.startswith("-")}
    return packages


def _image_python(cluster: dict) -> str:
    """The /usr/bin/python3 version of the image every node type boots (one image on all nodes)."""
    images = {disk["initializeParams"]["sourceImage"] for node_type in cluster["available_node_types"].values()
              for disk in node_type["node_config"]["disks"] if disk.get("boot")}
    assert len(images) == 1, f"node types boot different images: {images}"
    image = images.pop()
    known = [python for release, python in IMAGE_PYTHON.items() if release in image]
    assert len(known) == 1, f"{image}: cannot tell its python3 version (add its release to IMAGE_PYTHON)"
    return known[0]


@pytest.fixture(scope="module")
def node_python(cluster) -> Version:
    """The Python every `make install*` call builds its venv with (PYTHON=, else the Makefile's `python3`), as the
    first release of its series: the nodes may get any patch release of it, so every pin must accept all of them."""
    calls = _make_installs(cluster)
    assert {target for target, _ in calls} >= {"install", "install-vllm"}, calls
    pythons = {args.get("PYTHON", "python3") for _, args in calls}
    assert len(pythons) == 1, f"the make install* calls build venvs with different Pythons: {calls}"
    match = re.fullmatch(r"(?:/usr/bin/)?python(3(?:\.\d+)?)", pythons.pop())
    assert match, f"PYTHON must be /usr/bin/python3[.N], got {calls[0][1].get('PYTHON')}"
    version = match.group(1) if "." in match.group(1) else _image_python(cluster)
    if "." in match.group(1):
        missing = {f"python{version}", f"python{version}-venv"} - _apt_installed(cluster)
        assert not missing, f"PYTHON=/usr/bin/python{version}, but no setup command installs {sorted(missing)}"
    setup = " ".join(_setup_commands(cluster))
    mentioned = set(re.findall(r"python(3\.\d+)", setup)) | {f"3.{m}" for m in re.findall(r"\(3, (\d+)\)", setup)}
    assert mentioned <= {version}, f"the setup commands name other Pythons than {version}: {sorted(mentioned)}"
    return Version(version)


def _pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a constraints file, by canonical name."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def _torch_pin(cluster: dict) -> dict[str, str]:
    """The torch version the make install* calls install (TORCH_SPEC=torch==X)."""
    specs = {args["TORCH_SPEC"] for _, args in _make_installs(cluster) if "TORCH_SPEC" in args}
    assert len(specs) == 1, f"the make install* calls install different torch builds: {specs}"
    return {"torch": specs.pop().split("==", 1)[1]}


def _requires_python_violations(node_python: Version, pins: dict[str, str],
                                installed: dict[str, tuple[str, str | None]]) -> tuple[list[str], int]:
    """Pins whose installed metadata says Requires-Python excludes `node_python`, and how many pins were checked.
    `installed`: canonical name -> (version, Requires-Python); a pin not installed at its version is not checked."""
    bad, checked = [], 0
    for name, pinned in pins.items():
        version, requires = installed.get(name, (None, None))
        if version is None or Version(version).public != Version(pinned).public:  # torch 2.13.0+cpu pins 2.13.0
            continue
        checked += 1
        if requires and not SpecifierSet(requires).contains(node_python):
            bad.append(f"{name}=={pinned} (Requires-Python {requires})")
    return bad, checked


def test_node_python_satisfies_requires_python_of_the_project(node_python):
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(node_python), f"nodes run Python {node_python}; pyproject: {requires}"


def test_node_python_satisfies_every_pin_of_the_project_venv(cluster, node_python):
    """constraints.txt + the torch pin, against the metadata of this venv, where they are installed."""
    pins = _pins(ROOT / "constraints.txt") | _torch_pin(cluster)
    installed = {}
    for name, pinned in pins.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a constraint on something nothing requires here: pip never installs it
        assert Version(dist.version).public == Version(pinned).public, (
            f"{name}: constraints pin {pinned}, this venv has {dist.version} (run `make install`)")
        installed[name] = (dist.version, dist.metadata.get("Requires-Python"))
    bad, checked = _requires_python_violations(node_python, pins, installed)
    assert checked >= len(pins) // 2, f"only {checked} of {len(pins)} pins are installed in this venv"
    assert not bad, f"cluster nodes build their venvs with Python {node_python}, which these pins reject: {bad}"


def _dist_info(venv: Path) -> dict[str, tuple[str, str | None]]:
    """Canonical name -> (version, Requires-Python) from the METADATA files of a venv's site-packages."""
    found = {}
    for metadata in venv.glob("lib/python3*/site-packages/*.dist-info/METADATA"):
        fields = email.message_from_string(metadata.read_text(encoding="utf-8", errors="replace"))
        found[canonicalize_name(fields["Name"])] = (fields["Version"], fields.get("Requires-Python"))
    return found


def test_node_python_satisfies_the_vllm_pins_installed_in_the_vllm_venv(cluster, node_python):
    """constraints-vllm-cuda.txt + the torch pin, against .venv-vllm's metadata where installed at the pinned version
    (that venv is the CPU build here: the CUDA-only `vllm` distribution itself is not in it)."""
    installed = _dist_info(VLLM_VENV)
    if not installed:
        if os.environ.get("CI"):
            pytest.fail(f"{VLLM_VENV} has no installed distributions; CI runs `make install-vllm` first")
        pytest.skip(f"{VLLM_VENV} is not installed (make install-vllm)")
    pins = _pins(ROOT / "constraints-vllm-cuda.txt") | _torch_pin(cluster)
    bad, checked = _requires_python_violations(node_python, pins, installed)
    assert checked >= len(pins) // 2, f"only {checked} of {len(pins)} pins are installed in {VLLM_VENV}"
    assert not bad, f"GPU workers build .venv-vllm with Python {node_python}, which these pins reject: {bad}"
