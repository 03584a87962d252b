"""Where checkpoints are: confinement of paths read from metadata to their checkpoint directory."""

from __future__ import annotations

import pathlib


class CheckpointNotFoundError(FileNotFoundError):
  """The path holds nothing a loader knows how to read (or not the requested step)."""


class UnsafePathError(ValueError):
  """A path from metadata escapes its checkpoint directory (``..``, absolute, or a symlink out)."""


def confined(root, rel, *, what: str = "path") -> pathlib.Path:
  """``root / rel`` after checking that it stays inside ``root``, symlinks resolved."""
  if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
    raise UnsafePathError(f"{what} {rel!r}: not a plain relative path")
  p = pathlib.PurePosixPath(rel)
  if p.is_absolute() or rel.startswith("~") or any(part == ".." for part in p.parts):
    raise UnsafePathError(f"{what} {rel!r}: absolute paths and '..' are not allowed in checkpoint metadata")
  root = pathlib.Path(root)
  full = root / p
  real_root = root.resolve()
  if not full.resolve().is_relative_to(real_root):
    raise UnsafePathError(f"{what} {rel!r} resolves to {full.resolve()}, outside {real_root} (a symlink out?)")
  return full


def check_tree(root) -> None:
  """Refuse a directory that holds a symlink resolving outside it (before a library reads it)."""
  root = pathlib.Path(root)
  real_root = root.resolve()
  for p in root.rglob("*"):
    if p.is_symlink() and not p.resolve().is_relative_to(real_root):
      raise UnsafePathError(f"{p} is a symlink to {p.resolve()}, outside {real_root}")
