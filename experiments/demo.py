r"""The demo: runs the `cpu` preset of every system and writes one report beside the papers' numbers.

    python -m theorax.experiments.demo --workdir=results/demo            # what `make demo` runs
    python -m theorax.experiments.demo --workdir=results/demo --systems=scaled_mlp

Each system is a module `experiments/<name>.py` with `run(config, workdir) -> results` and
`report(results, workdir) -> markdown`, and a config `configs/<name>.py` with a `cpu` preset. Finished runs are
reused; a system whose preset changed since its run is refused with the keys that differ, and `--fresh` moves the
old runs of the chosen systems aside (to `<name>.old-<time>`) and redoes them. The report is `WORKDIR/report.md`, its plots sit beside it.
From Python (a notebook, say) the same is `run_demo(workdir, systems, preset)`; the flags exist only when this
module runs as a script.
"""

from __future__ import annotations

import importlib
import os
import platform
import time

import jax
from absl import app, flags, logging
from theorax.experiments import runtime

# Every system adds itself here when it lands.
SYSTEMS = ("scaled_mlp", "dc_solver", "distribution_transformer", "dkm", "interaction_basis")
FLAGS = flags.FLAGS


def run_system(name: str, root: str, preset: str, fresh: bool = False) -> str:
    module = importlib.import_module(f"theorax.experiments.{name}")
    config = importlib.import_module(f"theorax.configs.{name}").get_config(preset)
    workdir = os.path.join(root, name)
    if fresh:
        runtime.set_aside(workdir)
    start = time.perf_counter()
    results = module.run(config, workdir)
    seconds = time.perf_counter() - start
    section = module.report(results, workdir)
    # Plots are written in the system's workdir; the report links them relative to itself.
    section = section.replace("](./", f"]({name}/")
    return (
        section
        + f"\n_{name}: {seconds:.0f} s on this machine (0 s means the finished run was reused)._\n"
    )


def unknown_systems(systems) -> str | None:
    """The error message for names in `systems` that are not systems, or None."""
    unknown = [s for s in systems if s not in SYSTEMS]
    return f"unknown systems {unknown}; choose from {list(SYSTEMS)}" if unknown else None


def run_demo(
    workdir: str = "results/demo", systems=SYSTEMS, preset: str = "cpu", *, fresh: bool = False
) -> str:
    """Runs `preset` of each of `systems` under `workdir` and writes `workdir/report.md`; returns its path.

    `fresh=True` first moves each system's earlier run aside (`runtime.set_aside`), so that it is redone.
    """
    if message := unknown_systems(systems):
        raise ValueError(message)
    os.makedirs(workdir, exist_ok=True)
    sections = [run_system(name, workdir, preset, fresh) for name in systems]
    header = (
        "# theorax demo report\n\n"
        f"Preset `{preset}` of every system, run on {platform.processor() or platform.machine()} "
        f"with {os.cpu_count()} CPU cores, JAX {jax.__version__} on {jax.default_backend()}. "
        "Each section sets our numbers beside the paper's and says what differs in the set-up.\n"
    )
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n\n".join([header, *sections]))
    return path


def define_flags() -> None:
    """The command line's flags; defined only when this module runs as a script."""
    flags.DEFINE_string("workdir", "results/demo", "Where the report and every system's run go.")
    flags.DEFINE_list("systems", list(SYSTEMS), "Which systems to run.")
    flags.DEFINE_string("preset", "cpu", "Preset of each system's config.")
    flags.DEFINE_bool("fresh", False, "Move the systems' earlier runs aside and redo them.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    if message := unknown_systems(FLAGS.systems):
        raise app.UsageError(message)
    with runtime.exit_status_on_errors():
        path = run_demo(FLAGS.workdir, FLAGS.systems, FLAGS.preset, fresh=FLAGS.fresh)
    print(f"wrote {path}")


if __name__ == "__main__":
    runtime.tune_process()
    define_flags()
    app.run(main)
