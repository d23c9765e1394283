"""``ExpertLibrary``: a directory (or Hub repository) of saved sparse experts plus a JSON manifest.

Layout (plain files, relative paths only, so the same tree works as a Hub repository)::

    LIB/
      library.json                      manifest: format version, base model, targets, one record per expert
      experts/<name>/<digest16>/        a normal saved PEFT adapter (adapter_config.json,
                                        adapter_model.safetensors, README.md)
      cache/<kind>/<key>.safetensors    derived data (prototypes, similarities), keyed by the experts' digests
      .library.lock                     local write lock (not needed on the Hub)

Every expert directory is named after its content digest, so adding or replacing an expert never touches the
files the current manifest points at: the new files are staged inside the library, renamed into place, and the
manifest is replaced atomically last. A crash at any point leaves the previous manifest with intact experts;
unreferenced leftovers are removed by the next write.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from . import adapter_files
from .adapter_files import CONFIG_NAME, README_NAME, WEIGHTS_NAME, AdapterFormatError, SparseAdapterFile
from .files import atomic_write_bytes, atomic_write_text

MANIFEST_NAME = "library.json"
EXPERTS_DIR = "experts"
CACHE_DIR = "cache"
LOCK_NAME = ".library.lock"
FORMAT = "peft-sparse-expert-library"
FORMAT_VERSION = 1
HASHED_FILES = (CONFIG_NAME, WEIGHTS_NAME)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
KIND_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ENTRY_FIELDS = (
    "name",
    "task",
    "path",
    "base_model",
    "shapes_digest",
    "block_size",
    "config",
    "metrics",
    "digest",
    "files",
    "stored_rows",
)
_SUMMARY_DROP = ("entries_pattern", "weight_shapes")  # large; kept in the expert's own adapter_config.json


class LibraryError(ValueError):
    """A library is missing, corrupted, or an operation on it would break its invariants."""


# --- pure helpers -------------------------------------------------------------------------------------------------
def targets_digest(shapes: Mapping[str, Sequence[int]]) -> str:
    """Digest of the target layer names and their weight shapes (order-independent)."""
    canonical = json.dumps(sorted([name, [int(s) for s in shape]] for name, shape in shapes.items()))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One digest over the per-file SHA-256s of an expert."""
    canonical = "".join(f"{name}:{files[name]['sha256']}\n" for name in sorted(files))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_expert_name(name: object) -> str:
    """Return ``name`` if it is a valid expert name (letters, digits, ``._-``; starts alphanumeric; ≤ 128)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise LibraryError(
            f"invalid expert name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _json_object(value: object, what: str) -> dict[str, Any]:
    """A deep copy of a JSON-serialisable dict, or a ``LibraryError``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LibraryError(f"{what} must be a JSON object (dict), got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise LibraryError(f"{what} is not JSON-serialisable: {error}") from error


def describe_expert(expert_dir: Path) -> dict[str, Any]:
    """Validate a saved sparse adapter completely and return its manifest fields (without name/task/path/metrics).

    Reads every layer (indices checked, values finite) and hashes the files.
    """
    try:
        with SparseAdapterFile(expert_dir) as adapter:
            if adapter.extra_keys:
                raise LibraryError(
                    f"{expert_dir}: stores tensors other than sparse deltas ({adapter.extra_keys[0]!r}, e.g. "
                    "modules_to_save); a library holds sparse experts only"
                )
            if not adapter.layer_names:
                raise LibraryError(f"{expert_dir}: the adapter has no layers")
            stored_rows = 0
            for layer in adapter.layer_names:
                indices, values = adapter.read_layer(layer)
                if not bool(torch.isfinite(values).all()):
                    raise LibraryError(f"{expert_dir}: layer {layer!r} has non-finite values")
                stored_rows += int(indices.numel())
            shapes = {layer: list(adapter.shape(layer)) for layer in adapter.layer_names}
            config = copy.deepcopy(adapter.config)
    except AdapterFormatError as error:
        raise LibraryError(str(error)) from error
    files = {
        name: {"sha256": file_sha256(expert_dir / name), "size": (expert_dir / name).stat().st_size}
        for name in HASHED_FILES
    }
    return {
        "base_model": config.get("base_model_name_or_path"),
        "shapes_digest": targets_digest(shapes),
        "block_size": config.get("block_size"),
        "config": {k: v for k, v in config.items() if k not in _SUMMARY_DROP},
        "digest": content_digest(files),
        "files": files,
        "stored_rows": stored_rows,
        "_targets": shapes,
    }


def _empty_manifest() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": None,
        "targets": None,
        "targets_digest": None,
        "experts": [],
    }


def _describe_mismatch(ref: Mapping[str, Sequence[int]], new: Mapping[str, Sequence[int]]) -> str:
    """Human-readable difference between two target sets."""
    only_ref = sorted(set(ref) - set(new))
    only_new = sorted(set(new) - set(ref))
    parts = []
    if only_new:
        parts.append(f"layers not in the library: {only_new[:5]}" + (" ..." if len(only_new) > 5 else ""))
    if only_ref:
        parts.append(f"library layers missing: {only_ref[:5]}" + (" ..." if len(only_ref) > 5 else ""))
    for layer in sorted(set(ref) & set(new)):
        if list(ref[layer]) != list(new[layer]):
            parts.append(f"weight_shapes[{layer!r}] is {list(new[layer])}, the library has {list(ref[layer])}")
            break
    return "; ".join(parts) or "same layers and shapes"


# --- the library --------------------------------------------------------------------------------------------------
class ExpertLibrary:
    """A directory of saved sparse experts with a JSON manifest (``library.json``).

    ``ExpertLibrary(root)`` opens an existing library and validates its manifest completely (format, fields,
    relative paths, that every expert's files exist with the recorded sizes, base model and targets); any
    problem raises :class:`LibraryError` instead of loading part of it. ``create=True`` creates an empty
    library when ``root`` is absent or an empty directory.

    All experts share one base model id and one set of target layers with their weight shapes, fixed by the
    first expert added (reset when the library becomes empty). Block sizes may differ between experts.
    """

    def __init__(self, root: str | os.PathLike, create: bool = False) -> None:
        self.root = Path(root)
        manifest = self.root / MANIFEST_NAME
        if not manifest.is_file():
            if not create:
                raise LibraryError(f"{self.root}: not an expert library (no {MANIFEST_NAME}); pass create=True")
            if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
                raise LibraryError(f"{self.root}: exists and is not an empty directory; cannot create a library")
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(manifest, json.dumps(_empty_manifest(), indent=2) + "\n")
        self._manifest = self._read_manifest()

    @classmethod
    def from_hub(cls, repo_id: str, revision: str | None = None, **kwargs: Any) -> ExpertLibrary:
        """Download a library stored as a Hub repository (``huggingface_hub.snapshot_download``) and open it."""
        from huggingface_hub import snapshot_download

        return cls(snapshot_download(repo_id, revision=revision, **kwargs))

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the library as a Hub repository of plain files (``huggingface_hub.upload_folder``).

        One commit mirrors the library: remote files under ``experts/`` and ``cache/`` that are no longer in
        the local library are deleted (``delete_patterns``). The write lock and staging leftovers are not
        uploaded. ``kwargs`` go to ``upload_folder`` (e.g. ``commit_message``, ``revision``); the repository
        must exist (``huggingface_hub.create_repo``).
        """
        from huggingface_hub import upload_folder

        ignore = list(kwargs.pop("ignore_patterns", None) or [])
        ignore += [LOCK_NAME, f"{EXPERTS_DIR}/.staging-*", "**/.*.tmp"]
        kwargs.setdefault("delete_patterns", [f"{EXPERTS_DIR}/**", f"{CACHE_DIR}/**"])
        return upload_folder(folder_path=str(self.root), repo_id=repo_id, ignore_patterns=ignore, **kwargs)

    # --- reading ------------------------------------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any]:
        """Parse and fully validate ``library.json``."""
        path = self.root / MANIFEST_NAME
        where = str(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise LibraryError(f"{self.root}: {MANIFEST_NAME} disappeared") from error
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise LibraryError(f"{where}: not valid JSON ({error})") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LibraryError(f"{where}: not a peft-sparse expert library manifest (format != {FORMAT!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise LibraryError(f"{where}: format_version missing or not an integer")
        if version > FORMAT_VERSION:
            raise LibraryError(f"{where}: format_version {version} is newer than this peft-sparse ({FORMAT_VERSION})")
        for field in ("base_model", "targets", "targets_digest", "experts"):
            if field not in data:
                raise LibraryError(f"{where}: missing field {field!r}")
        experts = data["experts"]
        if not isinstance(experts, list):
            raise LibraryError(f"{where}: 'experts' must be a list")
        if experts:
            targets = data["targets"]
            if not isinstance(targets, dict) or not targets:
                raise LibraryError(f"{where}: 'targets' must be a non-empty object when the library has experts")
            try:
                digest = targets_digest(targets)
            except (TypeError, ValueError) as error:
                raise LibraryError(f"{where}: malformed 'targets' ({error})") from error
            if digest != data["targets_digest"]:
                raise LibraryError(f"{where}: targets_digest does not match 'targets' (hand-edited?)")
        seen: set[str] = set()
        for position, entry in enumerate(experts):
            self._check_entry(entry, position, data, where)
            if entry["name"].lower() in seen:
                raise LibraryError(f"{where}: expert name {entry['name']!r} appears twice (names are case-insensitive)")
            seen.add(entry["name"].lower())
        return data

    def _check_entry(self, entry: object, position: int, data: dict[str, Any], where: str) -> None:
        if not isinstance(entry, dict):
            raise LibraryError(f"{where}: experts[{position}] is not an object")
        missing = [f for f in ENTRY_FIELDS if f not in entry]
        if missing:
            raise LibraryError(f"{where}: experts[{position}] is missing fields {missing}")
        try:
            name = check_expert_name(entry["name"])
        except LibraryError as error:
            raise LibraryError(f"{where}: experts[{position}]: {error}") from error
        label = f"{where}: expert {name!r}"
        path = entry["path"]
        parts = PurePosixPath(path).parts if isinstance(path, str) else ()
        if (
            not isinstance(path, str)
            or "\\" in path
            or PurePosixPath(path).is_absolute()
            or len(parts) != 3
            or parts[:2] != (EXPERTS_DIR, name)
            or parts[2] in (".", "..")
        ):
            raise LibraryError(f"{label}: path {path!r} must be the relative path '{EXPERTS_DIR}/{name}/<version>'")
        if entry["base_model"] != data["base_model"]:
            raise LibraryError(
                f"{label}: base_model {entry['base_model']!r} differs from the library's {data['base_model']!r}"
            )
        if entry["shapes_digest"] != data["targets_digest"]:
            raise LibraryError(f"{label}: shapes_digest differs from the library's targets_digest")
        if not isinstance(entry["metrics"], dict) or not isinstance(entry["config"], dict):
            raise LibraryError(f"{label}: 'metrics' and 'config' must be objects")
        files = entry["files"]
        if not isinstance(files, dict) or set(files) != set(HASHED_FILES):
            raise LibraryError(f"{label}: 'files' must describe exactly {list(HASHED_FILES)}")
        directory = self.root / path
        if not directory.is_dir():
            raise LibraryError(f"{label}: directory {path} is missing")
        for file_name, info in files.items():
            if not isinstance(info, dict) or not isinstance(info.get("size"), int) or "sha256" not in info:
                raise LibraryError(f"{label}: files[{file_name!r}] needs 'sha256' and an integer 'size'")
            file_path = directory / file_name
            if not file_path.is_file():
                raise LibraryError(f"{label}: {path}/{file_name} is missing")
            if file_path.stat().st_size != info["size"]:
                raise LibraryError(
                    f"{label}: {path}/{file_name} has {file_path.stat().st_size} bytes, the manifest records "
                    f"{info['size']} (modified or truncated)"
                )
        if content_digest(files) != entry["digest"]:
            raise LibraryError(f"{label}: digest does not match its file hashes (hand-edited manifest?)")

    def refresh(self) -> None:
        """Re-read the manifest (another process may have changed the library)."""
        self._manifest = self._read_manifest()

    def _entries(self) -> list[dict[str, Any]]:
        return self._manifest["experts"]

    def _find(self, name: str) -> dict[str, Any]:
        for entry in self._entries():
            if entry["name"] == name:
                return entry
        raise KeyError(f"no expert named {name!r} in the library {self.root} (has: {self.names()})")

    def names(self) -> list[str]:
        """Expert names in manifest order (the order they were added)."""
        return [entry["name"] for entry in self._entries()]

    def __contains__(self, name: object) -> bool:
        return any(entry["name"] == name for entry in self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"ExpertLibrary({str(self.root)!r}, experts={self.names()})"

    @property
    def base_model(self) -> str | None:
        """Base model id shared by all experts (None if unknown or the library is empty)."""
        return self._manifest["base_model"]

    @property
    def targets(self) -> dict[str, list[int]] | None:
        """``{layer: [R, C]}`` of the target layers shared by all experts (None while empty)."""
        return copy.deepcopy(self._manifest["targets"])

    def entry(self, name: str) -> dict[str, Any]:
        """A copy of the manifest record of ``name``: name, task, path, base_model, shapes_digest, block_size,
        config (adapter config without entries_pattern / weight_shapes), metrics, digest, files, stored_rows."""
        return copy.deepcopy(self._find(name))

    def adapter_dir(self, name: str) -> Path:
        """The expert's saved PEFT adapter directory (load it with ``PeftModel.from_pretrained``)."""
        return self.root / self._find(name)["path"]

    def verify(self, names: Sequence[str] | None = None) -> None:
        """Re-hash the experts' files and raise ``LibraryError`` on any difference from the manifest."""
        for name in self._select(names):
            entry = self._find(name)
            directory = self.root / entry["path"]
            for file_name, info in entry["files"].items():
                if file_sha256(directory / file_name) != info["sha256"]:
                    raise LibraryError(
                        f"{self.root}: expert {name!r}: {entry['path']}/{file_name} does not match its SHA-256 in "
                        "the manifest (modified after it was added)"
                    )

    def _select(self, names: Sequence[str] | None) -> list[str]:
        if names is None:
            return self.names()
        if isinstance(names, str):
            raise TypeError("names must be a sequence of expert names, not a single string")
        selected = list(names)
        unknown = [n for n in selected if n not in self]
        if unknown:
            raise KeyError(f"unknown experts {unknown} in the library {self.root} (has: {self.names()})")
        if len(set(selected)) != len(selected):
            raise ValueError(f"expert names repeat: {selected}")
        return selected

    # --- writing ------------------------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive write lock (POSIX ``flock``) and a fresh manifest for read-modify-write."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no cross-process lock
            self.refresh()
            yield
            return
        with open(self.root / LOCK_NAME, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self.refresh()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_text(self.root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")

    def _collect_garbage(self) -> None:
        """Remove staging leftovers and expert versions the manifest does not reference (call under the lock)."""
        experts = self.root / EXPERTS_DIR
        if not experts.is_dir():
            return
        referenced = {PurePosixPath(e["path"]).parts[1:] for e in self._entries()}
        names = {name for name, _ in referenced}
        for child in experts.iterdir():
            if not child.is_dir():
                child.unlink(missing_ok=True)
            elif child.name not in names:  # staging leftovers and removed experts
                shutil.rmtree(child, ignore_errors=True)
            else:
                for version in child.iterdir():
                    if (child.name, version.name) in referenced:
                        continue
                    if version.is_dir():
                        shutil.rmtree(version, ignore_errors=True)
                    else:
                        version.unlink(missing_ok=True)

    def add(
        self,
        source: Any,
        name: str,
        *,
        task: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        adapter_name: str = "default",
        overwrite: bool = False,
        base_model: str | None = None,
    ) -> None:
        """Add an expert from a live ``PeftModel`` (its adapter ``adapter_name``) or a saved adapter directory.

        The expert must match the library's base model id and target layers/shapes (the first expert fixes
        them); ``base_model`` overrides the id read from the adapter config (e.g. a local path of the same
        model). An existing ``name`` is replaced only with ``overwrite=True``; derived data cached for the old
        version becomes unreachable and is pruned. Nothing changes if any check fails.
        """
        check_expert_name(name)
        if task is not None and not isinstance(task, str):
            raise LibraryError(f"task must be a string or None, got {type(task).__name__}")
        metrics_dict = _json_object(metrics, "metrics")
        with self._locked():
            if name in self and not overwrite:
                raise LibraryError(f"expert {name!r} already exists in {self.root}; pass overwrite=True to replace it")
            clash = [n for n in self.names() if n.lower() == name.lower() and n != name]
            if clash:
                raise LibraryError(f"expert name {name!r} differs from the existing {clash[0]!r} only by case")
            self._collect_garbage()
            experts_dir = self.root / EXPERTS_DIR
            experts_dir.mkdir(exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=experts_dir, prefix=".staging-"))
            moved: Path | None = None
            try:
                staged = self._stage(source, adapter_name, staging)
                record = describe_expert(staged)
                targets = record.pop("_targets")
                if base_model is not None:
                    record["base_model"] = base_model
                self._check_fits(name, record, targets, source)
                record["config"]["base_model_name_or_path"] = record["base_model"]
                version = record["digest"].split(":", 1)[1][:16]
                relative = f"{EXPERTS_DIR}/{name}/{version}"
                final = self.root / relative
                if not final.exists():
                    final.parent.mkdir(exist_ok=True)
                    os.replace(staged, final)
                    moved = final
                entry = {"name": name, "task": task, "path": relative, **record, "metrics": metrics_dict}
                entry = {field: entry[field] for field in ENTRY_FIELDS}
                manifest = copy.deepcopy(self._manifest)
                others = [e for e in manifest["experts"] if e["name"] != name]
                if not others:
                    manifest["base_model"] = record["base_model"]
                    manifest["targets"] = targets
                    manifest["targets_digest"] = record["shapes_digest"]
                names = [e["name"] for e in manifest["experts"]]
                if name in names:
                    manifest["experts"][names.index(name)] = entry
                else:
                    manifest["experts"].append(entry)
                self._write_manifest(manifest)
            except BaseException:
                if moved is not None:
                    shutil.rmtree(moved, ignore_errors=True)
                raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self._manifest = manifest
            self._clean_up()

    def _clean_up(self) -> None:
        """After a committed change: delete unreferenced files and stale cache (failures only warn)."""
        try:
            self._collect_garbage()
            self.prune_cache()
        except OSError as error:
            warnings.warn(f"{self.root}: could not remove leftovers ({error}); the next write retries", stacklevel=3)

    def _stage(self, source: Any, adapter_name: str, staging: Path) -> Path:
        """Copy or save the source adapter into ``staging``; return the directory holding its files."""
        if isinstance(source, str | os.PathLike):
            src = Path(source)
            try:
                adapter_files.read_adapter_config(src)
            except AdapterFormatError as error:
                raise LibraryError(str(error)) from error
            target = staging / "expert"
            target.mkdir()
            for file_name in (*HASHED_FILES, README_NAME):
                if (src / file_name).is_file():
                    shutil.copyfile(src / file_name, target / file_name)
            return target
        peft_config = getattr(source, "peft_config", None)
        if not isinstance(peft_config, dict) or not hasattr(source, "save_pretrained"):
            raise LibraryError(f"source must be a saved adapter directory or a PeftModel, got {type(source).__name__}")
        if adapter_name not in peft_config:
            raise LibraryError(f"the model has no adapter {adapter_name!r} (has: {sorted(peft_config)})")
        peft_type = getattr(peft_config[adapter_name].peft_type, "value", peft_config[adapter_name].peft_type)
        if str(peft_type) != adapter_files.SPARSE_PEFT_TYPE:
            raise LibraryError(f"adapter {adapter_name!r} is a {peft_type} adapter, not a sparse adapter")
        out = staging / "saved"
        source.save_pretrained(str(out), selected_adapters=[adapter_name])
        return out if adapter_name == "default" else out / adapter_name

    def _check_fits(self, name: str, record: dict[str, Any], targets: dict[str, list[int]], source: Any) -> None:
        """Refuse an expert whose base model or targets differ from the library's (other experts than ``name``)."""
        if not any(e["name"] != name for e in self._entries()):
            return
        label = str(source) if isinstance(source, str | os.PathLike) else "the model's adapter"
        if record["base_model"] != self.base_model:
            raise LibraryError(
                f"{label}: base model {record['base_model']!r} differs from the library's {self.base_model!r} "
                "(pass base_model=... if they are the same model)"
            )
        if record["shapes_digest"] != self._manifest["targets_digest"]:
            raise LibraryError(
                f"{label}: target layers differ from the library's: {_describe_mismatch(self.targets, targets)}"
            )

    def remove(self, name: str) -> None:
        """Remove an expert (manifest first, then its files) and prune cached data that used it."""
        with self._locked():
            self._find(name)
            manifest = copy.deepcopy(self._manifest)
            manifest["experts"] = [e for e in manifest["experts"] if e["name"] != name]
            if not manifest["experts"]:
                manifest.update(base_model=None, targets=None, targets_digest=None)
            self._write_manifest(manifest)
            self._manifest = manifest
            self._clean_up()

    # --- loading ------------------------------------------------------------------------------------------------
    def load_into(self, model: Any, names: Sequence[str] | None = None, *, is_trainable: bool = False) -> Any:
        """Load experts as named adapters (adapter name = expert name) into a base model or a ``PeftModel``.

        With a base ``nn.Module`` this returns ``PeftModel.from_pretrained(model, first)`` plus ``load_adapter``
        for the rest (the first expert is active); with a ``PeftModel`` the experts are added to it (the active
        adapter is unchanged). Files are re-hashed first; if any expert fails to load, the ones added by this
        call are removed again.
        """
        from peft import PeftModel

        selected = self._select(names)
        if not selected:
            raise LibraryError("no experts to load (the library or the names list is empty)")
        self.verify(selected)
        dirs = [str(self.adapter_dir(n)) for n in selected]
        if isinstance(model, PeftModel):
            clash = [n for n in selected if n in model.peft_config]
            if clash:
                raise LibraryError(f"the model already has adapters named {clash}")
            peft_model, added = model, []
        else:
            peft_model = PeftModel.from_pretrained(model, dirs[0], adapter_name=selected[0], is_trainable=is_trainable)
            added = [selected[0]]
            selected, dirs = selected[1:], dirs[1:]
        try:
            for name, directory in zip(selected, dirs, strict=True):
                peft_model.load_adapter(directory, adapter_name=name, is_trainable=is_trainable)
                added.append(name)
        except BaseException:
            if peft_model is model:
                for name in added:
                    peft_model.delete_adapter(name)
            else:
                peft_model.unload()
            raise
        return peft_model

    # --- derived-data cache -------------------------------------------------------------------------------------
    def _cache_key(self, kind: str, names: Sequence[str], params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        if not isinstance(kind, str) or not KIND_PATTERN.fullmatch(kind):
            raise ValueError(f"invalid cache kind {kind!r}: letters, digits, '_', '.', '-'")
        selected = self._select(names)
        material = {
            "kind": kind,
            "experts": [[n, self._find(n)["digest"]] for n in selected],
            "params": _json_object(params, "params"),
            "format_version": FORMAT_VERSION,
        }
        text = json.dumps(material, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32], material

    def cache_path(self, kind: str, names: Sequence[str], params: Mapping[str, Any]) -> Path:
        """Where :meth:`cached` stores the data for these arguments."""
        key, _ = self._cache_key(kind, names, params)
        return self.root / CACHE_DIR / kind / f"{key}.safetensors"

    def cached(
        self,
        kind: str,
        names: Sequence[str],
        params: Mapping[str, Any],
        compute: Callable[[], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Derived data for ``names`` from the cache, or ``compute()`` stored atomically on a miss.

        The key covers ``kind``, the experts' names *and content digests* in order, and ``params`` (a JSON
        object), so replacing an expert invalidates every entry that used it. An unreadable cache file is
        recomputed; a read-only library (e.g. a Hub snapshot) computes without storing.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file, save

        key, material = self._cache_key(kind, names, params)
        path = self.root / CACHE_DIR / kind / f"{key}.safetensors"
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    stored = json.loads((handle.metadata() or {}).get("peft_sparse_key", "null"))
                if stored == material:
                    return load_file(str(path))
                warnings.warn(f"{path}: cache key collision or stale file; recomputing", stacklevel=2)
            except Exception as error:  # a damaged cache file is derived data: recompute it
                warnings.warn(f"{path}: unreadable cache file ({error}); recomputing", stacklevel=2)
        result = compute()
        if not isinstance(result, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in result.items()
        ):
            raise TypeError("compute() must return a dict[str, torch.Tensor]")
        tensors = {k: v.detach().cpu().contiguous() for k, v in result.items()}
        metadata = {"format": "pt", "peft_sparse_key": json.dumps(material, sort_keys=True)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, save(tensors, metadata=metadata))
        except OSError as error:
            warnings.warn(f"could not store cached {kind!r} in {self.root} ({error}); not cached", stacklevel=2)
        return tensors

    def prune_cache(self) -> int:
        """Delete cache files that used an expert version no longer in the library; returns how many."""
        from safetensors import safe_open

        cache = self.root / CACHE_DIR
        if not cache.is_dir():
            return 0
        current = {(e["name"], e["digest"]) for e in self._entries()}
        removed = 0
        for path in cache.glob("*/*.safetensors"):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    material = json.loads((handle.metadata() or {}).get("peft_sparse_key", "null"))
                used = {tuple(pair) for pair in material["experts"]}
            except Exception:
                used = {("", "")}  # unreadable: drop it
            if not used <= current:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


__all__ = [
    "EXPERTS_DIR",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ExpertLibrary",
    "LibraryError",
    "check_expert_name",
    "describe_expert",
    "targets_digest",
]
