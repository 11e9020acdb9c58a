"""The installed loraserve's version, as every process and tool reports it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("loraserve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "dev"
