"""Data parallelism over every device of every host.

One `Mesh` with a single axis ``'data'`` spans all devices (all processes). Host-local
numpy batches become global `jax.Array`s sharded along their leading axis; the train
step is a per-shard function under `jax.shard_map` inside `jax.jit` (the maintained
form of what `jax.pmap` used to do), with explicit `lax.pmean` over ``'data'``.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 peer_timeout_s: int = 100) -> bool:
  """Calls `jax.distributed.initialize` for multi-host runs; returns True if it did.

  Explicit arguments win; otherwise a cluster environment that JAX detects itself
  (SLURM, a TPU pod slice, Open MPI, Kubernetes with JAX_COORDINATOR_ADDRESS) is used.
  A plain single-process run initialises nothing. A process not heard from for
  `peer_timeout_s` seconds is declared dead and the others stop with an error (JAX's
  coordination service heartbeat), instead of waiting for it forever.
  """
  if coordinator_address or num_processes:
    # Collectives between CPU processes (tests, CPU clusters); accelerators ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=peer_timeout_s)
    return True
  in_cluster = any(k in os.environ for k in (
      "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
      "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
  if in_cluster and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
    jax.distributed.initialize(heartbeat_timeout_seconds=peer_timeout_s)
    return True
  return False


def data_mesh() -> Mesh:
  """A 1-D mesh named ``'data'`` over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, key: str) -> None:
  """Raises a one-line error if a batch does not split evenly over devices and hosts."""
  n_dev = jax.device_count()
  if global_batch_size % n_dev:
    raise ValueError(
        f"{key}={global_batch_size} is not divisible by the {n_dev} devices; "
        f"set {key} to a multiple of {n_dev}")
  if global_batch_size % jax.process_count():
    raise ValueError(
        f"{key}={global_batch_size} is not divisible by the {jax.process_count()} "
        f"processes; set {key} to a multiple of {jax.process_count()}")


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over ``'data'`` (all hosts)."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def prefetch_to_device(batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh,
                       size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """`to_global` of each host batch, `size` batches ahead of the consumer.

  The transfers of the next batches are issued while the current step runs (JAX
  dispatches asynchronously), so the step never waits for its input to reach the
  devices.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(to_global(batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree of host values identically on every device."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def gather_outputs(fn, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
                   mesh: Mesh) -> dict[str, np.ndarray]:
  """`jit(fn)(variables, batch) -> {name: [b, ...]}` over host batches, all hosts at once.

  `batches` are host-local and carry 'mask' (e.g. `kd_jax.data.eval_iterator`); each is
  sharded over `mesh`. Every host gets every real example's outputs, in batch order,
  padding (mask 0) dropped.
  """
  fn = jax.jit(fn)
  parts = []
  for batch in batches:
    global_batch = to_global(batch, mesh)
    out, mask = to_host((fn(variables, global_batch), global_batch["mask"]))
    parts.append({k: v[mask > 0] for k, v in out.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def to_host(tree: Any) -> Any:
  """Replicated or batch-sharded arrays -> numpy, the same on every process."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(fetch, tree)
