"""The typed experiment config: one frozen value built once from an experiment's ``get_config()``.

``experiment(config)`` is the one place a raw ConfigDict (or its JSON, as saved
with a checkpoint) becomes an ``ExperimentConfig``: it refuses unknown keys,
naming the key, its section and the known keys, and every default lives in the
dataclasses below. Jobs call it right after flag parsing and pass the typed value
down; ``to_dict`` gives the ConfigDict-shaped dict that is saved as
``config.json`` (every field written out, so a checkpoint records what ran).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping

from interaction import layout, sharding
from interaction.config import ModelConfig, model_config

SECTIONS = ("stream_order", "streams", "model", "rules", "mesh", "data", "train", "serve")
PROCESS_SHARDING = ("records", "whole")
BAD_RECORDS = ("fail", "skip")
# Keys that configs saved by older versions hold, read only at their empty value so those checkpoints still
# open (fault injection moved from the config to a test fixture).
RETIRED = {"train": ("inject_nan_steps",)}


def _one_of(key: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{key} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (``sharding.MESH_AXES``); one axis may be -1: the devices left over."""

  data: int = 1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1

  def axes(self) -> dict[str, int]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where windows come from and how they are batched (``data_pipeline.pipeline.make_pipeline``)."""

  dir: str = ""  # empty: generate the embedded synthetic tasks into the workdir
  synthetic_train: int = 2048  # conversations generated for the train split
  synthetic_eval: int = 448  # ... and for the held-out split (spread evenly over the tasks)
  synthetic_mix: tuple[tuple[str, int], ...] = ()  # train mix: (task, weight) pairs; unnamed tasks weigh 1
  window_turns: int = 32
  batch_size: int = 8  # global, in windows
  seed: int = 0
  workers: int = 0  # featurizing processes (0: in-process)
  read_threads: int = 1
  bad_records: str = "fail"  # or "skip" (counted in the iterator's state)
  # "records": each process reads its own records (batch_size / processes windows per step; scales);
  # "whole": each reads the global batch and keeps its rows (the same batches as one process, at the
  # cost of every host decoding everything).
  process_sharding: str = "records"
  prepare_timeout: float = 3600.0  # seconds the other processes wait while process 0 generates data

  def __post_init__(self):
    _one_of("data.bad_records", self.bad_records, BAD_RECORDS)
    _one_of("data.process_sharding", self.process_sharding, PROCESS_SHARDING)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The optimizer, the loss weights and the loop's cadence (``train_step``, ``launch.trainer``)."""

  steps: int = 600
  lr: float = 3e-3
  warmup_steps: int = 50
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  clip_norm: float = 1.0
  grad_accum: int = 1
  moment_dtype: str = "float32"  # the dtype Adam's moments are stored in (train_step.optimizer)
  aux_weight: float = 0.01  # router load-balancing loss
  z_weight: float = 1e-3  # router z-loss
  # Loss weight of output slots where speech starts or stops (objective.transition_weights); 1: no reweighting.
  transition_weight: float = 1.0
  listen_weight: float = 0.0  # the listening loss (objective.heard_logprobs); 0: off
  time_offset_turns: int = 0  # each window's clock starts at a random turn in [0, this]; 0: at its own turn
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  max_bad_steps: int = 5  # non-finite steps in a row before the run stops
  preemption_check_every: int = 1  # steps between the processes' collective SIGTERM check


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """Sessions served at once, their ring-buffer cache and the serving mesh (``launch.aot --job serve``)."""

  slots: int = 8
  cache_tokens: int = 0  # 0: the model's attention window
  mesh: MeshConfig | None = None  # None: the training mesh


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """An experiment: the model (its streams and sharding rules included), the mesh, data, training, serving."""

  model: ModelConfig
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  serve: ServeConfig = ServeConfig()

  @property
  def serve_mesh(self) -> MeshConfig:
    return self.serve.mesh or self.mesh

  def to_dict(self) -> dict:
    """The ConfigDict-shaped dict (JSON-able) that ``experiment`` reads back into this value."""
    skip = ("streams", "rules")
    model = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(ModelConfig) if f.name not in skip}
    streams = {s.name: {k: v for k, v in dataclasses.asdict(s).items() if k != "name"} for s in self.model.streams}
    serve = dataclasses.asdict(self.serve)
    if serve["mesh"] is None:
      del serve["mesh"]
    data = dataclasses.asdict(self.data)
    data["synthetic_mix"] = dict(self.data.synthetic_mix)
    return {
      "stream_order": [s.name for s in self.model.streams],
      "streams": streams,
      "model": model,
      "rules": self.model.rules.to_dict(),
      "mesh": self.mesh.axes(),
      "data": data,
      "train": dataclasses.asdict(self.train),
      "serve": serve,
    }


def experiment(config, *, model: ModelConfig | None = None) -> ExperimentConfig:
  """The typed experiment from a ConfigDict or a plain dict (e.g. a saved ``config.json``).

  Missing sections and fields take the defaults above; an unknown key anywhere is a ValueError
  naming it, its section and the known keys. ``model`` replaces the model sections (a serve
  checkpoint's manifest holds the model config itself).
  """
  config = _plain(config)
  _check_keys("experiment config", config, SECTIONS)
  if model is None:
    model = _model(config)
  serve = _section(ServeConfig, "serve", config.get("serve"))
  if serve.mesh is not None:
    serve = dataclasses.replace(serve, mesh=_section(MeshConfig, "serve.mesh", serve.mesh))
  if not serve.cache_tokens:
    serve = dataclasses.replace(serve, cache_tokens=model.attention_window)
  return ExperimentConfig(
    model=model,
    mesh=_section(MeshConfig, "mesh", config.get("mesh")),
    data=_section(DataConfig, "data", config.get("data")),
    train=_section(TrainConfig, "train", config.get("train")),
    serve=serve,
  )


def _model(config: dict) -> ModelConfig:
  for name in ("stream_order", "streams", "model"):
    if name not in config:
      raise ValueError(f"experiment config has no {name!r} section; it needs stream_order, streams and model")
  _check_keys(
    "model", config["model"], [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("streams", "rules")]
  )
  stream_keys = [f.name for f in dataclasses.fields(layout.StreamSpec) if f.name != "name"]
  for name, stream in dict(config["streams"]).items():
    _check_keys(f"streams.{name}", stream, stream_keys)
  _check_keys("rules", config.get("rules") or {}, sharding.DEFAULT_RULES.names())
  return model_config(config)


def _plain(config) -> dict:
  """A ConfigDict (or FrozenConfigDict, or dict) as nested plain dicts."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return {k: _plain(v) if isinstance(v, Mapping) or hasattr(v, "to_dict") else v for k, v in dict(config).items()}


def _check_keys(section: str, values, known) -> None:
  if not isinstance(values, Mapping):
    raise ValueError(f"config section {section!r} must be a mapping, got {type(values).__name__}")
  for key in values:
    if key not in known:
      raise ValueError(f"unknown key {key!r} in config section {section!r}; known keys: {', '.join(sorted(known))}")


def _section(cls, section: str, values):
  """``cls`` from a section's mapping: unknown keys refused, values checked against the field types."""
  values = dict(values or {})
  for key in RETIRED.get(section, ()):
    if values.pop(key, None):
      raise ValueError(f"config key '{section}.{key}' is retired; remove it from the config")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  _check_keys(section, values, fields)
  hints = typing.get_type_hints(cls)
  return cls(**{k: _typed(f"{section}.{k}", v, hints[k]) for k, v in values.items()})


def _typed(key: str, value, hint):
  """``value`` as the field type ``hint`` wants (ints for floats, lists or dicts for tuples)."""
  if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
    return float(value)
  if hint is int and isinstance(value, int) and not isinstance(value, bool):
    return value
  if hint in (str, bool) and isinstance(value, hint):
    return value
  origin = typing.get_origin(hint)
  if origin is tuple:
    items = value.items() if isinstance(value, Mapping) else value
    if isinstance(items, list | tuple | type({}.items())):
      inner = typing.get_args(hint)[0]
      return tuple(tuple(x) if typing.get_origin(inner) is tuple else x for x in items)
  if origin in (typing.Union, types.UnionType):  # MeshConfig | None: checked by the caller
    return value
  raise ValueError(f"config key {key!r} must be {getattr(hint, '__name__', hint)}, got {value!r}")
