"""The application builder as Ray Serve calls it (`serve run serve_app:build_app key=value`, a config file's
`args`), and the vllm environment check on the node that builds the app. Nothing is started: building an app only
binds deployments."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))  # serve_app lives at the repo root

from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # noqa: E402
from ray.serve.deployment import Application  # noqa: E402

import yaml  # noqa: E402

from serve_app.app import INGRESS_MALLOC_ENV, build_app, check_vllm_python  # noqa: E402
from serve_app.settings import SettingsError, resolve_settings  # noqa: E402


def test_serve_calls_the_builder_with_its_args_and_gets_an_application():
    """Serve's own builder call (what `serve run` and `serve deploy` do with the key=value pairs or the config file's
    args) accepts only a one-parameter function."""
    app = call_user_app_builder_with_args_if_necessary(build_app, {"preset": "test", "run": "none",
                                                                   "serving.max_batch_size": "2"})
    assert isinstance(app, Application)


MISSING = {"preset": "test", "run": "none", "serving.engine": "vllm",
           "serving.vllm.python": "/nonexistent/venv-vllm/bin/python"}


def test_a_missing_vllm_environment_is_refused_where_the_replica_runs_on_this_node():
    with pytest.raises(SettingsError, match="make install-vllm"):
        check_vllm_python(resolve_settings({**MISSING, "device": "cpu"}, env={}))


def test_a_cuda_app_builds_on_a_head_without_the_vllm_environment(capsys):
    """On a cluster the LanguageModel replica runs on the GPU worker, which built .venv-vllm; the CPU head that builds
    the app (serve deploy) has none, and must not refuse."""
    check_vllm_python(resolve_settings({**MISSING, "device": "cuda"}, env={}))
    assert "is not on this node" in capsys.readouterr().out


def test_the_ingress_starts_with_its_allocator_settings_from_the_builder_and_from_the_config_file():
    """A Serve config's ray_actor_options replace the builder's whole, so serve_config.yaml names them again."""
    app = call_user_app_builder_with_args_if_necessary(build_app, {"preset": "test", "run": "none"})
    options = app._bound_deployment.ray_actor_options
    assert app._bound_deployment.name == "Ingress"
    assert options["runtime_env"]["env_vars"] == INGRESS_MALLOC_ENV
    config = yaml.safe_load((ROOT / "serve_app" / "serve_config.yaml").read_text())
    ingress = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress")
    assert ingress["ray_actor_options"]["runtime_env"]["env_vars"] == INGRESS_MALLOC_ENV
