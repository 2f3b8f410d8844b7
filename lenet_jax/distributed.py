"""Several JAX processes as one run: ``jax.distributed`` (one controller per host) and the one
collective the training loop needs beyond the step's own gradient all-reduce.

After :func:`init`, ``jax.devices()`` lists every process's devices, the trainer's mesh spans
them all, and each process feeds and computes only its own devices' shard of every global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lenet_train.config import Config
from lenet_train.distributed import Layout, deadline, did_not_meet
from lenet_train.errors import ConfigError, activate, active


def init(config: Config) -> Layout:
    """Join the other processes (when the flags or the cluster ask for it); this process's
    place in the run. Gives up with one error after --dist-timeout seconds."""
    if config.num_processes is None and not config.distributed:
        return Layout()
    if config.num_processes == 1:
        return Layout()
    given = (config.process_id, config.num_processes, config.coordinator)
    where = ("process {} of {}, coordinator {}".format(*given) if None not in given
             else "the cluster JAX detects")
    timeout = config.dist_timeout
    with deadline(timeout, did_not_meet(where, timeout)):
        jax.distributed.initialize(
            config.coordinator, config.num_processes, config.process_id,
            initialization_timeout=int(timeout) + 60,
            heartbeat_timeout_seconds=max(int(timeout), 10))
    layout = Layout(jax.process_index(), jax.process_count())
    activate(layout.distributed)
    return layout


def shutdown() -> None:
    """Leave the run: wait for the other processes at the runtime's shutdown barrier (JAX
    would also do this at exit)."""
    if active():
        jax.distributed.shutdown()


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set in any process (every process must call this together)."""
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def shardings(batch_size: int) -> tuple[NamedSharding, dict[int, NamedSharding]]:
    """Data parallel over every device of every process: a 1-D mesh ("batch"); returns the
    replicated sharding (data, parameters, optimizer state) and, by rank, the shardings that
    split one batch's indices (1) or K batches' (2) over the devices, so that each device
    receives only its shard. XLA inserts the gradient all-reduce."""
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    if batch_size % mesh.size:
        raise ConfigError(f"--batch-size {batch_size} does not split evenly over {mesh.size} "
                          "devices", everyone=True)
    return NamedSharding(mesh, P()), {1: NamedSharding(mesh, P("batch")),
                                      2: NamedSharding(mesh, P(None, "batch"))}


def replicate(tree, sharding: NamedSharding):
    """``tree`` placed on ``sharding``'s devices (every process must pass the same values).
    Random keys travel as their key data: ``device_put`` refuses key arrays for devices of
    other processes."""
    def put(leaf):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(leaf), sharding),
                                            impl=jax.random.key_impl(leaf))
        return jax.device_put(leaf, sharding)

    return jax.tree.map(put, tree)


class Processes:
    """The backend's part in joining, polling and leaving the run's other processes."""

    # a collective whose peer has gone fails in XLA's runtime (gloo: a ValueError on CPU)
    transport_errors = (jax.errors.JaxRuntimeError, ValueError)

    def connect(self, config: Config) -> Layout:
        self.layout = init(config)
        return self.layout

    def disconnect(self) -> None:
        shutdown()

    def any_process(self, flag: bool) -> bool:
        return any_process(flag)
