"""Small file helpers: atomic writes and the model-card install note."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

INSTALL_MARKER = "<!-- peft-sparse install note -->"
INSTALL_NOTE = f"""
{INSTALL_MARKER}
## Loading this adapter

This is a **peft-sparse** adapter (`peft_type: SPARSE_ADAPTER`). PEFT needs the plugin to load it; without it
PEFT fails with `KeyError: 'SPARSE_ADAPTER'`.

```bash
pip install peft-sparse
```

```python
import peft_sparse  # registers the SPARSE_ADAPTER tuner with PEFT
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/or/hub-id")
```
"""


def default_mode(kind: str) -> int:
    """Permission bits a new file (``kind="file"``) or directory would get under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if kind == "dir" else 0o666) & ~umask


def apply_default_mode(path: str | os.PathLike) -> None:
    """Give an existing file the mode a plain ``open()`` would (0644 under umask 022).

    safetensors writes through a private temporary file, so its files come out as 0600 whatever the umask.
    """
    if os.path.isfile(path):
        os.chmod(path, default_mode("file"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, default_mode("file"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def add_install_note(directory: str | os.PathLike) -> None:
    """Append the install note to ``directory/README.md`` (creating it) unless it is already there."""
    readme = Path(directory) / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.exists() else "# peft-sparse adapter\n"
    if INSTALL_MARKER not in text:
        atomic_write_text(readme, text.rstrip("\n") + "\n" + INSTALL_NOTE)
