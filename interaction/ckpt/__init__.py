"""Every on-disk format of a model, and the one loader that opens them all.

- ``trainer``: the orbax CheckpointManager layout the training job writes (train
  state, data iterator state, metadata), and params-only reads of it; ``verify``:
  its per-file CRC-32C digests, written before a step commits and checked before a read;
- ``serve``: the verified serve layout (one raw file per array, a manifest with
  SHA-256 digests);
- ``open``: ``open_model(path, *, mesh=None, step=None) -> Loaded`` for both;
- ``params`` (names, shapes and axes of a model's parameters, ``abstract_model``;
  the text-only forward), ``safetensors_io`` (a strict, pickle-free safetensors
  reader and streaming writer), ``paths`` (confinement to the checkpoint
  directory), ``train_to_serve`` (array-by-array from a trainer checkpoint) and
  ``hf`` (the Mixtral / Qwen3-MoE mapping). ``launch/convert.py`` is their command line.
"""

from interaction.ckpt.open import LAYOUTS, Loaded, open_model, param_shardings
from interaction.ckpt.params import abstract_model
from interaction.ckpt.paths import CheckpointNotFoundError, UnsafePathError
from interaction.ckpt.serve import IntegrityError, ManifestError, ServeCheckpointError
from interaction.ckpt.trainer import NonFiniteCheckpointError
from interaction.ckpt.verify import CorruptCheckpointError

__all__ = [
  "LAYOUTS",
  "CheckpointNotFoundError",
  "CorruptCheckpointError",
  "IntegrityError",
  "Loaded",
  "ManifestError",
  "NonFiniteCheckpointError",
  "ServeCheckpointError",
  "UnsafePathError",
  "abstract_model",
  "open_model",
  "param_shardings",
]
