"""The 1-D `data` mesh over every device of every process, its shardings and global batches."""

from __future__ import annotations

import jax
import numpy as np
from theorax.experiments.runtime.errors import ConfigError


def data_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh named `data` over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Leading (batch) axis split over `data`, the rest replicated."""
    return jax.sharding.NamedSharding(mesh, jax.P("data"))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.P())


def global_batch(local_batch, mesh: jax.sharding.Mesh):
    """Assembles each process's slice of the batch (numpy, leading axis) into global jax Arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of a global batch; the batch must split evenly over processes and devices."""
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if global_batch_size % n_dev:
        raise ConfigError(
            f"batch_size={global_batch_size} does not split over {n_dev} devices; "
            f"use a multiple of {n_dev}"
        )
    return global_batch_size // n_proc
