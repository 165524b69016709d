"""Device memory: what a device has free and what a compiled program needs, checked before it runs."""

from __future__ import annotations

import jax


class DeviceMemoryError(MemoryError):
    """A compiled program needs more memory than the device has free; raised before the program runs."""


def format_bytes(n: float) -> str:
    """`n` bytes in binary units: '512 B', '1.5 MiB', '139.8 GiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.{1 if abs(n) >= 10 * size else 2}f} {unit}"
    return f"{int(n)} B"


def device_memory(device: jax.Device | None = None) -> dict[str, int] | None:
    """A device's memory as XLA's allocator reports it: `{"limit", "in_use", "free"}` in bytes.

    None where the backend reports nothing (the CPU). On a GPU `limit` is the allocator's pool (by default 75%
    of the card, `XLA_PYTHON_CLIENT_MEM_FRACTION`), so `free` is what JAX programs can still have.
    """
    device = device or jax.local_devices()[0]
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    limit, in_use = int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
    return {"limit": limit, "in_use": in_use, "free": limit - in_use}


def program_memory(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """What one device needs to run a compiled program, from XLA's buffer assignment (bytes).

    `total` = arguments + outputs - donated (outputs written into donated arguments) + temporaries +
    generated code; the parts are given too. None when the backend gives no analysis.
    """
    m = compiled.memory_analysis()
    if m is None:
        return None
    parts = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "donated": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
    }
    parts["total"] = (
        parts["arguments"]
        + parts["outputs"]
        - parts["donated"]
        + parts["temporaries"]
        + parts["code"]
    )
    return parts


def compile_within_memory(
    jitted, *args, what: str, limit_bytes: int | None = None, **kwargs
) -> jax.stages.Compiled:
    """Compiles `jitted` for `args` ahead of time and refuses, with sizes, a program the device cannot hold.

    `jitted.lower(*args, **kwargs).compile()`, then `program_memory` against `device_memory`: a program that
    needs more than the free memory raises `DeviceMemoryError` naming what it needs (and its parts) and what
    the device has, instead of XLA's out-of-memory trace at the first call. Arguments may be
    `jax.ShapeDtypeStruct`s (with their shardings), so a workload is checked before its inputs are allocated;
    the figures are per device (a batch sharded over the mesh counts its local shard). `limit_bytes` caps the
    free memory assumed: headroom on an accelerator, or a stand-in on the CPU, which reports none (where,
    without it, nothing is refused).

    Returns:
      The `jax.stages.Compiled` program; call it with arguments of the lowered shapes and shardings.

    Example:
      >>> import numpy as np
      >>> double = jax.jit(lambda x: 2 * x)
      >>> vector = jax.ShapeDtypeStruct((1024,), np.float32)
      >>> compile_within_memory(double, vector, what="doubling")(np.ones(1024, np.float32))[:2]
      Array([2., 2.], dtype=float32)
      >>> compile_within_memory(double, vector, what="doubling", limit_bytes=1000)
      Traceback (most recent call last):
      theorax.experiments.runtime.memory.DeviceMemoryError: doubling does not fit the device's memory: it needs 8.00 KiB per device ...
    """
    compiled = jitted.lower(*args, **kwargs).compile()
    need = program_memory(compiled)
    have = device_memory()
    if need is None or (have is None and limit_bytes is None):
        return compiled
    free = have["free"] if have is not None else limit_bytes
    if limit_bytes is not None:
        free = min(free, limit_bytes)
    if need["total"] > free:
        parts = ", ".join(
            f"{k} {'-' if k == 'donated' else ''}{format_bytes(v)}"
            for k, v in need.items()
            if k != "total" and v
        )
        device = jax.local_devices()[0]
        of = f" of {format_bytes(have['limit'])}" if have is not None else ""
        raise DeviceMemoryError(
            f"{what} does not fit the device's memory: it needs {format_bytes(need['total'])} per device "
            f"({parts}), and {device.device_kind} {device.id} has {format_bytes(free)} free{of}. Use a "
            f"smaller batch or model, or more devices (the batch is split over {jax.device_count()})"
        )
    return compiled
