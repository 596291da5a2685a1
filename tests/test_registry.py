"""`kd_jax.registry.Registry`: the one table behind every name a config can give."""
import pytest

from kd_jax import models, objective, workflows
from kd_jax.registry import Registry


def test_register_get_names_and_decorator():
  table = Registry("colour", hint="set --config.colour")
  table.register("red", 1)

  @table.register("green")
  def green():
    return 2

  assert table.get("red") == 1 and table.get("green") is green
  assert table.names() == ["red", "green"] and list(table) == ["red", "green"]
  assert "red" in table and "blue" not in table and len(table) == 2
  with pytest.raises(ValueError, match="colour 'red' is registered already"):
    table.register("red", 3)


def test_unknown_name_is_one_line_with_the_closest_and_every_name():
  table = Registry("colour", hint="set --config.colour")
  for name in ("red", "green", "blue"):
    table.register(name, name)
  message = table.unknown("gren")
  assert message == ("unknown colour 'gren'; did you mean 'green'? set --config.colour "
                     "to one of red, green, blue")
  assert table.unknown("zzz") == "unknown colour 'zzz'; set --config.colour to one of red, green, blue"
  with pytest.raises(ValueError, match="^unknown colour 'gren'; did you mean 'green'"):
    table.get("gren")


def test_the_package_tables_are_registries():
  for table, name in ((models._REGISTRY, "resnet8"), (objective.METHODS, "kd"),
                      (workflows.WORKFLOWS, "distill")):
    assert isinstance(table, Registry) and name in table
