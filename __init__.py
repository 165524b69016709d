"""theorax: theory-driven models in JAX (scaled MLPs, DC-Solver, distribution transformers, ...).

The repository's folders are this package's subpackages: `theorax.models` (Flax modules and pure functions),
`theorax.inference` (algorithms acting on them), `theorax.experiments` (absl entry points, the runtime, benches),
`theorax.configs` (ml_collections presets) and `theorax.third_party` (adapters to other formats). Importing
`theorax` imports none of them.
"""

__version__ = "0.1.0"
