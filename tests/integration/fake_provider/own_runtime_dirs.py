"""Ray's fake multi-node provider, with a runtime-resources directory of its own for every fake node.

Imported by the fake cluster's autoscaler (tests/integration/fake_cluster.py names this module as its `external`
provider and puts this directory on the head's PYTHONPATH).

The fake nodes are raylets on one machine in one Ray session, so by default they share the session's
`runtime_resources` directory, where each node's runtime-env agent unpacks a job's working_dir. Ray's working_dir
plugin unpacks with `overwrite=True` (ray/_private/runtime_env/working_dir.py): the first time a newly launched
node sets up a job's working_dir, it deletes the directory the head's processes of that job are running in, and
they fail with FileNotFoundError from os.getcwd(). Real nodes have separate disks; here each fake node gets a
`runtime_resources_<n>` directory of its own (RayParams.runtime_env_dir_name) instead.
"""

from __future__ import annotations

import functools
import itertools
import threading

import ray._private.parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

_PATCH_LOCK = threading.Lock()
"""Held while RayParams is swapped: the autoscaler may launch nodes from several threads."""
_NODE_NUMBERS = itertools.count(1)
"""Numbers the fake nodes' runtime-resources directories."""


class OwnRuntimeDirsProvider(FakeMultiNodeProvider):
    """FakeMultiNodeProvider whose every node unpacks runtime environments into its own directory."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # The parent builds the node's RayParams inline (ray._private.parameter.RayParams(...)); for the duration
        # of the call that name gives every RayParams this node's own runtime_env_dir_name.
        with _PATCH_LOCK:
            real = ray._private.parameter.RayParams
            own_dir = f"runtime_resources_{next(_NODE_NUMBERS)}"
            ray._private.parameter.RayParams = functools.partial(real, runtime_env_dir_name=own_dir)
            try:
                return super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray._private.parameter.RayParams = real
