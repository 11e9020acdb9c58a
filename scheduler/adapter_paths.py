"""Confines LoadAdapter paths to an adapter root directory (`--adapter-root`).

A path is accepted only if it has no `..` component and, with every symlink resolved, it
and the files directly inside it lie within the root; relative paths are taken from the
root. The worker is given the resolved path, so a symlink changed after the check cannot
redirect it (a directory swapped by someone with write access inside the root still can).
"""

from __future__ import annotations

from pathlib import Path


class OutsideAdapterRoot(ValueError):
    """The path escapes the adapter root (PERMISSION_DENIED)."""


def confine(path: str, root: str) -> str:
    """The resolved path of `path` inside `root`; raises OutsideAdapterRoot otherwise."""
    if ".." in Path(path).parts:
        raise OutsideAdapterRoot(f"adapter path {path!r} must not contain '..'")
    base = Path(root).resolve()
    resolved = (base / path).resolve()
    _check_inside(resolved, base, path)
    if resolved.is_dir():
        for child in resolved.iterdir():
            _check_inside(child.resolve(), base, f"{path}/{child.name}")
    return str(resolved)


def _check_inside(resolved: Path, base: Path, shown: str) -> None:
    if resolved != base and base not in resolved.parents:
        raise OutsideAdapterRoot(f"adapter path {shown!r} is outside the adapter root {str(base)!r}")
