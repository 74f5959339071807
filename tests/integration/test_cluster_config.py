"""cluster.yaml and serve_app/serve_config.yaml, checked offline against the schemas that ship with Ray.

Nothing is launched: the cluster config is validated with the autoscaler's JSON schema (ray/autoscaler/ray-schema.json)
and Ray's own `prepare_config` + `validate_config`; then every node type, local file and resource it names is
checked, and the `phi2` preset's ScalingConfig must fit the A100 worker type. The Serve config is validated with
`ray.serve.schema.ServeDeploySchema` and must fit on the cluster's nodes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
SERVE_CONFIG = ROOT / "serve_app" / "serve_config.yaml"
TOKEN_MOUNT = "~/.ray/auth_token"  # Ray's default token path; `ray get-auth-token --generate` creates it
CUDA_TORCH_INDEX = "https://download.pytorch.org/whl/cu"


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
    if not SERVE_CONFIG.exists():
        pytest.skip(f"{SERVE_CONFIG.relative_to(ROOT)} does not exist yet (owned by the Serving work)")
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
