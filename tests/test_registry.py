"""Plug-in registries: duplicate names refused, unknown names listed, plug-ins and entry points found."""

import textwrap
from importlib.metadata import EntryPoint

import pytest

import rcm_nddr.registry as registry_module
from rcm_nddr.registry import TASKS, Registry, RegistryError, discover, import_plugin


def test_register_refuses_duplicates_and_lists_known_names():
    reg = Registry("widget")

    @reg.register("a")
    class A:
        pass

    with pytest.raises(RegistryError, match="widget 'a' is already registered"):

        @reg.register("a")
        class B:
            pass

    assert reg.get("a") is A
    with pytest.raises(RegistryError, match="unknown widget 'zzz'; known: a"):
        reg.get("zzz")


def test_builtin_tasks_are_discovered():
    discover()
    assert {"semseg", "parts", "depth", "normals", "edge", "sal"} <= set(TASKS.names())


def test_plugin_module_from_a_file(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        textwrap.dedent(
            """
            from rcm_nddr.registry import TASKS
            @TASKS.register("plugin_from_file_test")
            class Thing:
                pass
            """
        )
    )
    discover([str(plugin)])
    assert "plugin_from_file_test" in TASKS
    discover([str(plugin)])  # a second discovery must not re-register (no duplicate error)
    with pytest.raises(RegistryError, match="does not exist"):
        import_plugin(str(tmp_path / "absent.py"))
    with pytest.raises(RegistryError, match="could not be imported"):
        import_plugin("no_such_module_anywhere")


def test_entry_point_group_is_loaded_on_a_miss(tmp_path, monkeypatch):
    (tmp_path / "ep_plugin_pkg.py").write_text(
        "from rcm_nddr.registry import TASKS\n@TASKS.register('entry_point_task_test')\nclass T:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="ep", value="ep_plugin_pkg", group="rcm_nddr.tasks")
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [ep] if group == "rcm_nddr.tasks" else [])
    monkeypatch.setattr(TASKS, "_items", dict(TASKS._items))  # undone after the test
    monkeypatch.setattr(TASKS, "_entry_points_loaded", False)
    assert "entry_point_task_test" not in TASKS
    assert TASKS.get("entry_point_task_test").__name__ == "T"


def test_broken_entry_point_is_a_clear_error(monkeypatch):
    ep = EntryPoint(name="broken", value="no_such_module_xyz", group="rcm_nddr.tasks")
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [ep])
    reg = Registry("task type", "rcm_nddr.tasks")
    with pytest.raises(RegistryError, match="entry point 'broken' = 'no_such_module_xyz'"):
        reg.get("anything")
