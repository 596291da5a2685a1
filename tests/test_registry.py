"""`kd_jax.registry.Registry`: the one table behind every name a config can give."""
import pytest

from kd_jax import models, objective, workflows
from kd_jax.data import augment, preprocess
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
                      (workflows.WORKFLOWS, "distill"), (augment.OPS, "jpeg"),
                      (preprocess.AUGMENTATIONS, "cifar")):
    assert isinstance(table, Registry) and name in table


def test_a_config_section_takes_its_owners_defaults_and_rejects_unknown_keys():
  from kd_jax.registry import section
  defaults = {"pacing": "none", "stages": 4}
  assert section("curriculum", None, defaults) == defaults
  assert section("curriculum", {"stages": 2, "pacing": None}, defaults) == {
      "pacing": "none", "stages": 2}
  with pytest.raises(ValueError, match="^curriculum has no key 'pacnig'; did you mean "
                                       "'pacing'\\? its keys: pacing, stages$"):
    section("curriculum", {"pacnig": "root"}, defaults)
