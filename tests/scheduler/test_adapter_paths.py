"""`--adapter-root`: LoadAdapter paths must resolve inside the root, symlinks included."""

from __future__ import annotations

import pytest

from scheduler.adapter_paths import OutsideAdapterRoot, confine


@pytest.fixture
def tree(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "good").mkdir(parents=True)
    (root / "good" / "adapter_config.json").write_text("{}")
    outside.mkdir()
    (outside / "adapter_model.safetensors").write_text("secret")
    (root / "alias").symlink_to(root / "good")  # a symlink that stays inside
    (root / "escape").symlink_to(outside)  # a symlinked directory that leaves
    (root / "sneaky").mkdir()
    (root / "sneaky" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    return root, outside


def test_paths_inside_the_root_are_resolved(tree):
    root, _ = tree
    assert confine(str(root / "good"), str(root)) == str((root / "good").resolve())
    assert confine("good", str(root)) == str((root / "good").resolve()), "relative paths start at the root"
    assert confine(str(root / "alias"), str(root)) == str((root / "good").resolve())
    assert confine(str(root / "not-yet"), str(root)) == str((root / "not-yet").resolve()), "the worker says NOT_FOUND"


@pytest.mark.parametrize("path", ["{root}/good/../good", "../outside", "{root}/../outside", "{outside}", "/etc",
                                  "{root}/escape", "escape", "{root}/sneaky"])
def test_paths_that_escape_are_refused(tree, path):
    root, outside = tree
    with pytest.raises(OutsideAdapterRoot):
        confine(path.format(root=root, outside=outside), str(root))
