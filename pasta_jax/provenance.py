"""Where every stage's outputs came from: the config fields and input digests behind each
done-marker, the freshness checks a stage passes before it reads its upstream, and the lock that
gives a workdir to one run at a time.

A stage's done-marker (`WORKDIR/<stage>.done.json`) records the values and hash of the config fields
the stage depends on, the sha256 digests of everything it read (upstream outputs and external files
or directories) and of everything it wrote. A stage is fresh when its marker's fields match the
config, its recorded inputs match the files now on disk, its outputs are unchanged, and its upstream
stages are fresh. File digests are cached in `WORKDIR/provenance/digests.json` by path, size and
modification time, so a large input is hashed once.
"""

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence

import ml_collections

from pasta_jax import files, parallel


class StaleInputError(RuntimeError):
  """A stage's input was written for another config or changed since; the message names the input
  and the stage to re-run."""


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir."""


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """What a stage depends on and produces.

  fields: config fields (dotted paths; a block name covers the whole block) that change its results.
  upstream: stages whose outputs it reads; optional_upstream: stages it reads only when they have
  run. external: config -> {config field: path} of files or directories outside the workdir it
  reads. outputs: config -> workdir-relative paths (files or directories) its downstream stages
  read.
  """

  name: str
  fields: tuple[str, ...]
  upstream: tuple[str, ...]
  external: Callable[[ml_collections.ConfigDict], dict[str, str]]
  outputs: Callable[[ml_collections.ConfigDict], tuple[str, ...]]
  optional_upstream: tuple[str, ...] = ()


def _field_value(config: ml_collections.ConfigDict, field: str):
  value = config
  for part in field.split("."):
    value = value[part]
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def _flatten(prefix: str, value) -> dict:
  if isinstance(value, dict):
    return {
      k: v for key in sorted(value) for k, v in _flatten(f"{prefix}.{key}", value[key]).items()
    }
  return {prefix: list(value) if isinstance(value, tuple) else value}


def field_values(config: ml_collections.ConfigDict, fields: Sequence[str]) -> dict:
  """{dotted field: value} of every leaf under `fields`."""
  out = {}
  for field in fields:
    out.update(_flatten(field, _field_value(config, field)))
  return out


def _hash_json(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()[:16]


def fields_hash(config: ml_collections.ConfigDict, fields: Sequence[str]) -> str:
  return _hash_json(field_values(config, fields))


def _read_cache(path: str) -> dict:
  """The cache's entries; a missing or unreadable cache is empty (every file is hashed again)."""
  try:
    entries = files.read_json(path)
  except ValueError:
    return {}
  return entries if isinstance(entries, dict) else {}


class DigestCache:
  """sha256 of files and directories, cached by absolute path, size and mtime in a JSON file."""

  def __init__(self, path: str):
    self._path = path
    self._entries = _read_cache(path)
    self._dirty = False

  def _file(self, path: str) -> str:
    stat = os.stat(path)
    key = os.path.abspath(path)
    entry = self._entries.get(key)
    if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
      return entry["sha256"]
    digest = files.sha256(path)
    self._entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    self._dirty = True
    return digest

  def digest(self, path: str) -> str | None:
    """The file's sha256; a directory's is over its files' relative paths and digests; None if
    absent."""
    if os.path.isfile(path):
      return self._file(path)
    if not os.path.isdir(path):
      return None
    listing = []
    for root, dirs, names in os.walk(path):
      dirs.sort()
      for name in sorted(names):
        full = os.path.join(root, name)
        listing.append((os.path.relpath(full, path), self._file(full)))
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

  def save(self) -> None:
    if self._dirty:
      os.makedirs(os.path.dirname(self._path), exist_ok=True)
      files.write_json(self._path, self._entries)
      self._dirty = False


def marker_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, f"{stage}.done.json")


def read_marker(workdir: str, stage: str) -> dict | None:
  """The stage's done-marker, None when it has not finished; a corrupt one names the stage to
  re-run."""
  path = marker_path(workdir, stage)
  if not os.path.exists(path):
    return None
  try:
    marker = files.read_json(path, remedy=f"re-run stage {stage!r}")
  except ValueError as e:
    raise StaleInputError(str(e)) from None
  if not isinstance(marker, dict) or not {"fields_hash", "inputs", "outputs"} <= set(marker):
    raise StaleInputError(f"{path}: not a done-marker of this version; re-run stage {stage!r}")
  return marker


class Ledger:
  """The provenance of a workdir's stages under one config."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, specs: dict[str, StageSpec]):
    self.config, self.workdir, self.specs = config, workdir, specs
    self.digests = DigestCache(os.path.join(workdir, "provenance", "digests.json"))

  def _output_digests(self, stage: str) -> dict[str, str | None]:
    return {
      rel: self.digests.digest(os.path.join(self.workdir, rel))
      for rel in self.specs[stage].outputs(self.config)
    }

  def _upstream_present(self, stage: str) -> tuple[str, ...]:
    spec = self.specs[stage]
    optional = tuple(u for u in spec.optional_upstream if read_marker(self.workdir, u) is not None)
    return spec.upstream + optional

  def inputs(self, stage: str) -> dict[str, str | None]:
    """{input name: digest now}: each upstream output as '<stage>:<path>', each external path as
    '<config field>:<path>'."""
    out = {}
    for upstream in self._upstream_present(stage):
      out.update({f"{upstream}:{rel}": d for rel, d in self._output_digests(upstream).items()})
    for field, path in self.specs[stage].external(self.config).items():
      if path:
        out[f"{field}:{path}"] = self.digests.digest(path)
    return out

  def staleness(self, stage: str) -> str | None:
    """Why the stage's recorded outputs do not hold for this config and these inputs (None:
    fresh)."""
    marker = read_marker(self.workdir, stage)
    if marker is None:
      return f"stage {stage!r} has not finished in {self.workdir}"
    spec = self.specs[stage]
    if marker["fields_hash"] != fields_hash(self.config, spec.fields):
      now = field_values(self.config, spec.fields)
      was = marker.get("fields", {})
      changed = sorted(k for k in set(now) | set(was) if now.get(k) != was.get(k))
      shown = ", ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
      return f"stage {stage!r} ran with other config values ({shown})"
    for upstream in self._upstream_present(stage):
      reason = self.staleness(upstream)
      if reason:
        return reason
    now = self.inputs(stage)
    for name in sorted(set(now) | set(marker["inputs"])):
      if now.get(name) != marker["inputs"].get(name):
        return f"input {name} of stage {stage!r} changed since that stage ran"
    for rel, digest in self._output_digests(stage).items():
      if digest != marker["outputs"].get(rel):
        return f"{os.path.join(self.workdir, rel)}, written by stage {stage!r}, changed since"
    return None

  def check_upstream(self, stage: str) -> None:
    """Raises StaleInputError when an upstream stage's outputs do not hold for this config."""
    for upstream in self._upstream_present(stage):
      reason = self.staleness(upstream)
      if reason:
        raise StaleInputError(
          f"stage {stage!r} reads the outputs of stage {upstream!r}, but {reason}; re-run "
          f"stage {upstream!r} (add it to config.stages) on this workdir"
        )

  def run_key(self, stage: str) -> str:
    """A hash of the stage's config fields and input digests: names its checkpoints, so a run never
    resumes one trained on other inputs."""
    return _hash_json(
      {"fields": fields_hash(self.config, self.specs[stage].fields), "inputs": self.inputs(stage)}
    )

  def record(self, stage: str, seconds: float, result: dict) -> None:
    """Writes the stage's done-marker after it ran."""
    spec = self.specs[stage]
    marker = {
      "stage": stage,
      "fields": field_values(self.config, spec.fields),
      "fields_hash": fields_hash(self.config, spec.fields),
      "inputs": self.inputs(stage),
      "outputs": self._output_digests(stage),
      "seconds": seconds,
      "result": result,
    }
    files.write_json(marker_path(self.workdir, stage), marker)
    self.digests.save()


@contextlib.contextmanager
def _flock(workdir: str, description: str) -> Iterator[None]:
  """Holds an exclusive flock on WORKDIR/.lock for the block; WorkdirBusyError names the holder."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, ".lock")
  with open(path, "a+") as handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      raise WorkdirBusyError(
        f"{workdir} is in use by another run ({holder}); wait for it to finish or choose "
        "another --workdir"
      ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, {description}")
    handle.flush()
    try:
      yield
    finally:
      handle.seek(0)
      handle.truncate()
      fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def workdir_lock(workdir: str, description: str) -> Iterator[None]:
  """Holds an exclusive lock on the workdir for the block; raises WorkdirBusyError naming the holder
  when another run has it. The lock dies with its process, so a killed run leaves nothing to clean
  up.

  In a job of several processes process 0 takes the lock for the job; when it cannot, every process
  raises WorkdirBusyError. Every process leaves the block together."""
  with contextlib.ExitStack() as stack:
    busy = None
    if parallel.is_leader():
      try:
        stack.enter_context(_flock(workdir, description))
      except WorkdirBusyError as e:
        busy = e
    if not parallel.agree(busy is None):
      raise busy or WorkdirBusyError(
        f"{workdir} is in use by another run (process 0 could not lock it)"
      )
    yield
    parallel.sync(f"release {workdir}")
