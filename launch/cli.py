r"""The jobs' command lines: absl flags, ``--help``, one-line errors, quiet libraries.

Each entry point defines its flags on its own ``flags.FlagValues`` (``flag_values()``), so
jobs imported into one process (tests, the demo) never collide, and its ``main(argv)`` calls
``parse`` first; ``python -m launch.X`` runs ``run(main)``. What the helpers give every job:

- ``--help`` (``-h``) prints the module's docstring and every flag with its default, exit 0;
- ``--token-file`` is read as ``--token_file`` (the argparse spelling keeps working);
- a refused command line or input (missing config file, unknown override key, missing flag,
  a job's own ``UsageError``) is one ``error: ...`` line on stderr and exit status 2, no
  traceback (``--log_level=debug`` shows it);
- libraries' log records (orbax's checkpoint manager, absl) below ``--log_level`` (default
  ``warning``) stay out of the job's output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from absl import flags
from absl import logging as absl_logging

LOG_LEVELS = ("debug", "info", "warning", "error")
HELP = ("-h", "-help", "--help", "--helpshort", "--helpfull")
# Errors a job's input can cause (a path that is not there, a value the job refuses): one line, exit 2.
REFUSED = (FileNotFoundError, FileExistsError, NotADirectoryError)
_level = "warning"  # the last parsed --log_level: debug re-raises refused errors with their traceback


class UsageError(SystemExit):
  """A refused command line or input: ``str(e)`` is one ``error: ...`` line; the exit status is 2."""

  def __init__(self, message: str):
    super().__init__(message if message.startswith("error: ") else f"error: {message}")
    self.code = 2


def flag_values() -> flags.FlagValues:
  """A job's own flags, with ``--log_level``."""
  fv = flags.FlagValues()
  flags.DEFINE_enum(
    "log_level", "warning", LOG_LEVELS, "Libraries' log records at or above this level reach stderr.", flag_values=fv
  )
  return fv


def _all_flags(fv: flags.FlagValues) -> list:
  unique = {id(fv[name]): fv[name] for name in fv}
  return sorted((f for f in unique.values() if f.name not in ("flagfile", "undefok")), key=lambda f: f.name)


def usage(fv: flags.FlagValues, doc: str | None, prog: str) -> str:
  """The ``--help`` text: the docstring, then each flag with its help and default."""
  lines = [(doc or f"usage: {prog} [flags]").strip(), "", "flags:"]
  for f in _all_flags(fv):
    name = f"--[no]{f.name}" if f.boolean else f"--{f.name}"
    repeat = " (repeat for several)" if isinstance(f, flags.MultiFlag) else ""
    lines += [f"  {name}: {f.help}{repeat}", f"    (default: {f.default_as_str or repr(f.default)})"]
  return "\n".join(lines)


def _absl_spelling(fv: flags.FlagValues, arg: str) -> str:
  """``--token-file=x`` -> ``--token_file=x`` when that is a flag (argparse's dashed names keep working)."""
  if not arg.startswith("--") or "-" not in arg[2:].partition("=")[0]:
    return arg
  name, eq, value = arg[2:].partition("=")
  name = name.replace("-", "_")
  known = name in fv or (name.startswith("no") and name[2:] in fv and fv[name[2:]].boolean)
  return f"--{name}{eq}{value}" if known else arg


def _config_flags(fv: flags.FlagValues) -> list[str]:
  return [f.name for f in _all_flags(fv) if type(f).__name__ == "_ConfigFlag"]


def _check_config_files(fv: flags.FlagValues, args: Sequence[str]) -> None:
  """A missing config file is named before ml_collections tries to load it (a double traceback)."""
  for name in _config_flags(fv):
    for i, arg in enumerate(args):
      if arg == f"--{name}" and i + 1 < len(args):
        path = args[i + 1]
      elif arg.startswith(f"--{name}="):
        path = arg.partition("=")[2]
      else:
        continue
      if not os.path.isfile(path.split(":")[0]):
        raise UsageError(f"--{name}={path}: no such config file (a get_config() module, e.g. experiments/tiny.py)")


def _unknown_key(fv: flags.FlagValues, flag: str) -> str | None:
  """The fix for ``--config.train.stepz``: which keys the section holds."""
  for name in _config_flags(fv):
    if not flag.startswith(f"{name}."):
      continue
    node, path = fv[name].value, flag.split(".")[1:]
    for depth, key in enumerate(path):
      keys = sorted(node.keys()) if hasattr(node, "keys") else []
      if key not in keys:
        where = ".".join([name, *path[:depth]])
        return f"--{flag}: the config has no key {'.'.join(path)}; {where} holds {', '.join(keys) or 'no keys'}"
      node = node[key]
  return None


def _missing_override(fv: flags.FlagValues, args: Sequence[str], e: Exception) -> str:
  """One line for ``--config.train.stepz=3`` (ml_collections raises a chained KeyError/AttributeError)."""
  inner = e
  while inner.args and isinstance(inner.args[0], BaseException):
    inner = inner.args[0]
  missing, _, suggestion = str(inner.args[0] if inner.args else inner).partition("\n")
  missing = missing.strip("'\"")
  for name in _config_flags(fv):
    for arg in args:
      key = arg.partition("=")[0].removeprefix(f"--{name}.")
      if arg.startswith(f"--{name}.") and missing in key.split("."):
        return f"--{name}.{key}: the config has no key {key}. {suggestion.strip()}".strip()
  raise e


def parse(
  fv: flags.FlagValues,
  argv: Sequence[str] | None = None,
  *,
  doc: str | None = None,
  prog: str = "",
  required: Sequence[str] = (),
  positional: bool = False,
) -> list[str]:
  """Parse ``argv`` (no program name; ``sys.argv[1:]`` by default) into ``fv``; returns the positional args.

  What follows ``--`` is never parsed (a wrapped command); without ``positional`` a stray argument is
  refused. Raises ``UsageError`` for a bad command line and ``SystemExit(0)`` after printing ``--help``.
  """
  global _level
  argv = sys.argv[1:] if argv is None else list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  head, tail = [_absl_spelling(fv, a) for a in argv[:split]], argv[split:]
  if any(a in HELP for a in head):
    print(usage(fv, doc, prog))
    raise SystemExit(0)
  _check_config_files(fv, head)
  fv.unparse_flags()
  saved, sys.argv = sys.argv, [prog or "prog", *head, *tail]  # config_flags reads --config.x overrides there
  try:
    rest = fv(sys.argv)[1:]
  except flags.Error as e:
    flag = getattr(e, "flagname", None)
    hint = _unknown_key(fv, flag) if isinstance(e, flags.UnrecognizedFlagError) and flag else None
    raise UsageError(hint or f"{' '.join(str(e).split())} (see --help)") from None
  except (KeyError, AttributeError) as e:  # ml_collections: an override of a key the config lacks
    raise UsageError(_missing_override(fv, head, e)) from None
  finally:
    sys.argv = saved
  for name in required:
    if fv[name].value is None:
      raise UsageError(f"--{name} is required: {fv[name].help} (see --help)")
  if rest and not positional:
    raise UsageError(f"unexpected argument {rest[0]!r}: flags are --name=value (see --help)")
  _level = fv["log_level"].value if "log_level" in fv else "warning"
  quiet(_level)
  return rest


def quiet(level: str = "warning") -> None:
  """Libraries' log records below ``level`` are dropped; at info or debug they go to stderr."""
  number = getattr(logging, level.upper())
  absl_logging.set_verbosity(level)
  logging.getLogger().setLevel(number)
  if number < logging.WARNING and not logging.getLogger().handlers:
    logging.basicConfig(level=number, format="%(levelname)s %(name)s: %(message)s")


def mesh_flag(text: str | None, flag: str = "--mesh", share: int = 1) -> dict | None:
  """A ``--mesh data=2,expert=4`` value checked against this job's devices, or a ``1/share`` of them
  (``None`` when not given)."""
  if not text:
    return None
  import jax  # noqa: PLC0415 (the command line is parsed before jax is needed)

  from interaction import sharding  # noqa: PLC0415

  try:
    axes = sharding.parse_mesh(text)
    sharding.mesh_shape(axes, jax.device_count() // share)
  except ValueError as e:
    hint = ""
    if jax.default_backend() == "cpu":
      hint = "; a CPU host gets virtual devices with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    raise UsageError(f"{flag} {text!r}: {e}{hint}") from None
  return axes


def one_line(e: BaseException) -> str:
  """``error: ...`` for an exception, its message on one line."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if text.startswith("error: ") else f"error: {text}"


def run(main: Callable[[list[str]], int | None], *, refused: tuple[type[BaseException], ...] = ()) -> None:
  """Run ``main(sys.argv[1:])`` as the program: exit with its status; refused input is one line, exit 2."""
  try:
    status = main(sys.argv[1:])
  except UsageError as e:
    _fail(str(e))
  except REFUSED + refused as e:
    if _level == "debug":
      raise
    _fail(f"{one_line(e)} (--log_level=debug shows where)")
  sys.exit(status or 0)


def _fail(message: str) -> None:
  with contextlib.suppress(BrokenPipeError):
    sys.stdout.flush()
  print(message, file=sys.stderr, flush=True)
  sys.exit(2)
