"""The training workers' torch.distributed process group, with no listener beyond loopback on a single node.

Ray Train starts the group through torch's `env://` rendezvous, whose TCPStore listens on every interface whatever
MASTER_ADDR says, unauthenticated, and Gloo binds its pairs to the address the hostname resolves to. When every
worker runs on one node none of that is needed: the workers meet through a file store in a private temp directory,
and Gloo and NCCL are told to use the loopback interface. Across nodes the group starts as Ray Train starts it
(docs/cluster.md, "Ports", lists what it opens).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import psutil
import ray
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

LOOPBACK_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
"""Where Gloo and NCCL choose the interface they listen and connect on."""


def loopback_interface() -> str:
    """The name of this machine's loopback interface (lo on Linux, lo0 on macOS)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    raise RuntimeError("this machine has no interface with 127.0.0.1: cannot keep training on loopback")


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _use_loopback() -> None:
    """Point Gloo and NCCL at loopback, unless the user chose an interface."""
    interface = loopback_interface()
    for name in LOOPBACK_ENV:
        os.environ.setdefault(name, interface)


def _private_dir() -> str:
    return tempfile.mkdtemp(prefix="trimodal-process-group-")


class _LoopbackTorchBackend(_TorchBackend):
    """Ray Train's torch backend, except that a group on one node meets through a file store on loopback."""

    store_dir: str | None = None

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        if len(set(worker_group.execute(_node_id))) > 1:
            super().on_start(worker_group, backend_config)
            return
        if self.store_dir is not None:  # a group that failed and is being replaced never reached on_shutdown
            worker_group.execute_single(0, shutil.rmtree, self.store_dir, ignore_errors=True)
        self.store_dir = worker_group.execute_single(0, _private_dir)
        worker_group.execute(_use_loopback)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        url = f"file://{os.path.join(self.store_dir, 'store')}"
        ray.get([worker_group.execute_single_async(rank, _setup_torch_process_group, backend=backend_config.backend,
                                                   world_rank=rank, world_size=len(worker_group), init_method=url,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: TorchConfig) -> None:
        super().on_shutdown(worker_group, backend_config)
        if self.store_dir is not None:
            worker_group.execute_single(0, shutil.rmtree, self.store_dir, ignore_errors=True)


class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose process group opens no listener beyond loopback when all workers share a node."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
