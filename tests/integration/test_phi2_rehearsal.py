"""The headline `phi2` preset rehearsed end to end on CPU, as docs/cluster.md tells a user, with only its weights
swapped: a tiny random Phi with Phi-2's tokenizer and a random TinyCLIP-61M/32-shaped tower
(`python -m trimodal rehearsal-weights`), the packaged Whisper base, and everything else from phi2.yaml (bf16 LM,
NF4 double-quant QLoRA r=64 on q/k/v/dense/fc1/fc2, the instruct template, marker 23893, the vllm engine).

On a token-authenticated local head (scripts/local_head.py, fresh HOME, private ports): make_shapes, preprocess,
pretrain, finetune and evaluate are each `ray job submit`ted; then `serve run serve_app:build_app key=value ...`
serves the run on the builtin engine and `serve deploy` serves it from a copy of serve_app/serve_config.yaml
(paths pointed at this run) on the vllm engine. The official openai client asks both a text question, an image
question, a spoken question, a three-turn conversation and a streamed one; greedy float32 answers must be
token-equal across the engines.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def _load_sibling(name: str):
    """A helper module next to this file (the suite imports tests with --import-mode=importlib, which puts no test
    directory on sys.path)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


pj = _load_sibling("phi2_jobs")

ROOT = pj.ROOT
BIN = pj.BIN
CUDA = torch.cuda.is_available()
NODE = (["stage1.accelerator_type=null", "stage2.accelerator_type=null"] if CUDA else
        ["stage1.use_gpu=false", "stage2.use_gpu=false"]) + ["stage1.cpus_per_worker=1", "stage2.cpus_per_worker=1"]
"""The CUDA-only settings, named: the A100-40G worker (use_gpu, accelerator_type) and its 8 CPUs per worker
become this machine's device and one CPU."""
FLOAT32 = ["model.language_model.dtype=float32", "serving.dtype=float32", "serving.vllm.dtype=float32"]
"""Serving only, so the two engines can be compared token for token: both decode greedily in float32."""
JOB_TIMEOUT_S = 300
READY_TIMEOUT_S = 300


@dataclass
class Rehearsal:
    """The local head, the rehearsal's weights and what its jobs wrote."""

    env: dict[str, str]
    ray_port: int
    dashboard: str
    serve_port: int
    runs: Path
    weights: list[str]
    """The `key=value` overrides naming the rehearsal's weight directories."""

    @property
    def final(self) -> Path:
        return self.runs / "finetune" / "final"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run(cmd: list[str], env: dict[str, str], timeout: float = JOB_TIMEOUT_S) -> str:
    """Run a command from the repository root; its output, or a failure showing the end of it."""
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd[:6])} ... exited {done.returncode}:\n{out[-6000:]}"
    return out


def runtime_env() -> str:
    """What docs/cluster.md submits with, less the working dir (`ray job submit --working-dir .` names it)."""
    env = pj.runtime_env()
    del env["working_dir"]
    return json.dumps(env)


def submit(r: Rehearsal, name: str, *cmd: str) -> str:
    """`ray job submit` (following its logs), then `ray job status` must say it succeeded."""
    sid = f"phi2-{name}-{int(time.time())}"
    out = run([str(BIN / "ray"), "job", "submit", "--address", r.dashboard, "--submission-id", sid,
               "--working-dir", ".", "--runtime-env-json", runtime_env(), "--", "python", *cmd], r.env)
    status = run([str(BIN / "ray"), "job", "status", "--address", r.dashboard, sid], r.env)
    assert "succeeded" in status.lower(), f"job {name}: {status[-500:]}\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> Rehearsal:
    """Weights, a token-authenticated head, and the five jobs run through it."""
    home, runs = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("runs")
    temp = Path(tempfile.mkdtemp(prefix="rphi", dir="/tmp"))  # short: Ray's socket paths stay < 108 chars
    ray, dash, serve, client, agent, agent_grpc, runtime, metrics = free_ports(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TRIMODAL_"))}
    env |= {"HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),  # serve_app importable where Serve builds a config file's app, as on a cluster
            "TRIMODAL_CACHE": os.environ.get("TRIMODAL_CACHE", str(Path.home() / ".cache" / "trimodal"))}
    overrides = pj.build_weights(runs / "weights", env)
    start = ["--temp-dir", str(temp), f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime}",
             f"--metrics-export-port={metrics}"]
    run([str(BIN / "python"), "scripts/local_head.py", "start", "--port", str(ray), "--dashboard-port", str(dash),
         "--", *start], env)
    r = Rehearsal(env, ray, f"http://127.0.0.1:{dash}", serve, runs, overrides)
    try:
        run_jobs(r)
        yield r
    finally:
        subprocess.run([str(BIN / "python"), "scripts/local_head.py", "stop", "--port", str(ray)], cwd=ROOT, env=env,
                       capture_output=True, timeout=120)


def run_jobs(r: Rehearsal) -> None:
    gpus = pj.GpuRequests(encoder_gpus=1, eval_gpus=1) if CUDA else pj.GpuRequests()
    for job in pj.phi2_jobs(r.runs, [*r.weights, *NODE], gpus):
        submit(r, job.name, *job.argv)


def test_the_jobs_train_a_phi2_run_with_the_presets_recipe(rehearsal):
    r = rehearsal
    manifest = json.loads((r.runs / "data" / "manifest.json").read_text())
    assert manifest["encoder"]["num_patches"] == 49 and manifest["encoder"]["hidden_size"] == 640, manifest["encoder"]
    meta = json.loads((r.final / "run.json").read_text())
    assert meta["preset"] == "phi2" and meta["quantized"] is True and meta["stage"] == 2
    adapter = json.loads((r.final / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (64, 16)
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}
    cfg = yaml.safe_load((r.final / "config.yaml").read_text())
    assert cfg["model"]["language_model"]["dtype"] == "bfloat16" and cfg["quant"]["compute_dtype"] == "bfloat16"
    assert cfg["model"]["language_model"]["image_end_token_id"] == 23893
    for stage in ("pretrain", "finetune"):
        losses = [json.loads(line)["loss"] for line in (r.runs / stage / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line]
        assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses), (stage, losses)
    result = json.loads((r.runs / "finetune" / "eval.json").read_text())
    assert result["questions"] and result["captions"], result
    predictions = (r.runs / "finetune" / "predictions.jsonl").read_text().splitlines()
    assert any(json.loads(line).get("first_turn") is False for line in predictions), "no later turn was evaluated"


# ---------------------------------------------------------------------------------------------------------------
# Serving: the same questions on both engines
# ---------------------------------------------------------------------------------------------------------------


def image_part(r: Rehearsal) -> dict:
    png = sorted((r.runs / "shapes" / "val2017").glob("*.png"))[0].read_bytes()
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


def audio_part() -> dict:
    wav = (ROOT / "tests" / "data" / "what_color.wav").read_bytes()
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}


def questions(r: Rehearsal) -> dict[str, list[dict]]:
    image = image_part(r)
    return {
        "text": [{"role": "user", "content": "Name a colour."}],
        "image": [{"role": "user", "content": [image, {"type": "text", "text": "What shape is the object?"}]}],
        "spoken": [{"role": "user", "content": [image, audio_part()]}],
        "three turns": [{"role": "user", "content": [image, {"type": "text", "text": "How many shapes are there?"}]},
                        {"role": "assistant", "content": "There is one shape."},
                        {"role": "user", "content": "What color is it?"},
                        {"role": "assistant", "content": "It is red."},
                        {"role": "user", "content": "Describe the image."}],
    }


def ask_all(r: Rehearsal) -> dict[str, tuple[str, int]]:
    """Every question, greedy: (answer, completion tokens); the streamed answer must equal the non-streamed one."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{r.serve_port}/v1", api_key="unused", max_retries=0, timeout=120)
    answers = {}
    for name, messages in questions(r).items():
        done = client.chat.completions.create(model="trimodal-phi2", messages=messages, max_tokens=8, temperature=0)
        answers[name] = (done.choices[0].message.content, done.usage.completion_tokens)
    stream = client.chat.completions.create(model="trimodal-phi2", messages=questions(r)["three turns"], max_tokens=8,
                                            temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == answers["three turns"][0]
    return answers


def refuses_past_the_context(r: Rehearsal) -> str:
    """Phi-2 reads 2,048 positions: a prompt longer than that is refused with a 400 that says so."""
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{r.serve_port}/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="trimodal-phi2", max_tokens=4,
                                       messages=[{"role": "user", "content": "word " * 2100}])
    return str(refused.value)


def wait_ready(r: Rehearsal, proc: subprocess.Popen | None, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{r.serve_port}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert proc is None or proc.poll() is None, f"serve exited:\n{log.read_text()[-6000:]}"
        time.sleep(2)
    raise AssertionError(f"not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")


def serve_shutdown(r: Rehearsal) -> None:
    """`serve shutdown -y` exits 0 even when it failed: the HTTP port must really close."""
    run([str(BIN / "serve"), "shutdown", "-y", "--address", r.dashboard], r.env, timeout=120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", r.serve_port)) != 0:
                return
        time.sleep(1)
    raise AssertionError(f"Serve still listens on {r.serve_port} after `serve shutdown -y`")


def serve_run_builtin(r: Rehearsal) -> dict[str, tuple[str, int]]:
    """`serve run serve_app:build_app key=value ...`, as docs/serving.md picks an engine and a run."""
    log = r.runs / "serve-run.log"
    run([str(BIN / "serve"), "start", "--address", f"127.0.0.1:{r.ray_port}", "--http-host", "127.0.0.1",
         "--http-port", str(r.serve_port)], r.env, timeout=120)
    args = ["preset=phi2", f"run={r.final}", f"runs_dir={r.runs}", "serving.engine=builtin", "threads=1",
            *r.weights, *FLOAT32, *(["device=cuda"] if CUDA else [])]
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "serve"), "run", "--address", f"127.0.0.1:{r.ray_port}",
                                 "serve_app:build_app", *args], cwd=ROOT, env=r.env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_ready(r, proc, log)
        answers = ask_all(r)
        answers["too long"] = (refuses_past_the_context(r), 0)
    finally:
        proc.terminate()  # SIGTERM ends `serve run` without shutting Serve down: shut it down as a user does
        proc.wait(timeout=60)
        serve_shutdown(r)
    return answers


def deploy_config(r: Rehearsal, path: Path) -> Path:
    """serve_app/serve_config.yaml with its paths pointed at this run. Changed, each for this machine: the run,
    runs directory and weights; device, GPU shares and CPU counts (the A100 node's); the HTTP port (a free one);
    the vllm interpreter (this checkout's); float32 for the comparison."""
    config = pj.serve_config_for_run(r.final, r.runs, r.serve_port, {
        "threads": 1, "device": "cuda" if CUDA else "cpu", **dict(o.split("=", 1) for o in [*r.weights, *FLOAT32])})
    app = config["applications"][0]
    for deployment in app["deployments"]:
        options = deployment["ray_actor_options"]
        options["num_cpus"] = 0.25 if deployment["name"] != "LanguageModel" else 1
        if not CUDA:
            options.pop("num_gpus", None)
        if deployment["name"] == "LanguageModel":  # the only replica in the vllm environment
            options["runtime_env"]["py_executable"] = str(ROOT / ".venv-vllm" / "bin" / "python")
        deployment.pop("autoscaling_config", None)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def serve_deploy_vllm(r: Rehearsal) -> dict[str, tuple[str, int]]:
    """`serve deploy` of the cluster's config file (engine vllm, the phi2 default)."""
    config = deploy_config(r, r.runs / "serve_config.yaml")
    assert yaml.safe_load(config.read_text())["applications"][0]["args"]["serving.engine"] == "vllm"
    log = r.runs / "serve-deploy.log"
    log.write_text(run([str(BIN / "serve"), "deploy", str(config), "--address", r.dashboard], r.env, timeout=120))
    try:
        wait_ready(r, None, log)
        answers = ask_all(r)
        answers["too long"] = (refuses_past_the_context(r), 0)
    finally:
        serve_shutdown(r)
    return answers


def test_serve_run_builtin_and_serve_deploy_vllm_answer_token_for_token_alike(rehearsal):
    if not (ROOT / ".venv-vllm" / "bin" / "python").exists() and not os.environ.get("CI"):
        pytest.skip("needs the vllm environment: make install-vllm")
    builtin = serve_run_builtin(rehearsal)
    vllm = serve_deploy_vllm(rehearsal)
    for name in ("text", "image", "spoken", "three turns"):
        assert builtin[name][1] > 0, (name, builtin[name])
        assert vllm[name] == builtin[name], (name, vllm[name], builtin[name])
    for refused in (builtin["too long"][0], vllm["too long"][0]):
        assert "2047" in refused.replace(",", "") and "2048 positions" in refused.replace(",", ""), refused
