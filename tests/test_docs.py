"""Every command written in README.md and docs/ names things that exist.

Each `kd-jax ...` line of a code block (or table cell) is checked as far as it can be
without training: the subcommand exists, its flags are the command's, `--config=` names
a config file and variant that load, and every `--config.KEY=VALUE` override names a key
of that config. `python benchmarks/X.py` names a script that exists. Runs of the
commands themselves are the end-to-end tests (`test_cli.py`, `test_edge.py`, ...).
"""
import glob
import os
import re
import shlex

import pytest

from kd_jax import cli, configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
_FLAGS = {"distill": {"config", "workdir", "coordinator_address", "num_processes",
                      "process_id"},
          "reproduce": {"workdir", "pairs", "methods", "tiny", "data_dir", "export", "seeds"},
          "import-teacher": {"checkpoint", "model", "num_classes", "workdir", "config"}}


def _commands():
  """(file, command) for each kd-jax / benchmark command of the docs: the lines of code
  blocks that start with one, and inline code spans that do."""
  found = []
  start = re.compile(r"^\s*((?:kd-jax|python benchmarks/)\S*(?: [^#]*)?)")
  for path in DOCS:
    text = open(path).read().replace("\\\n", " ")
    candidates, fenced = [], False
    for line in text.splitlines():
      if line.lstrip().startswith("```"):
        fenced = not fenced
      elif fenced:
        candidates.append(line)
      else:
        candidates += re.findall(r"`([^`]+)`", line)
    for line in candidates:
      match = start.match(line)
      if not match:
        continue
      command = match.group(1).strip()
      if len(command.split()) < 2:
        continue  # the command's name alone
      if "..." in command or re.search(r"\b(DIR|NAME|I|PAIR|METHOD)\b", command):
        continue  # a template, not a command
      found.append((os.path.relpath(path, ROOT), command))
  return found


def test_the_docs_hold_commands():
  assert len(_commands()) > 20


@pytest.mark.parametrize("where, command", _commands())
def test_documented_command_is_well_formed(where, command):
  words = shlex.split(command)
  if words[0] == "python":
    assert os.path.isfile(os.path.join(ROOT, words[1])), f"{where}: {command}"
    return
  sub = words[1]
  assert sub in cli.COMMANDS, f"{where}: {command}"
  flags = {w[2:].split("=")[0] for w in words[2:] if w.startswith("--")}
  allowed = _FLAGS.get(sub, _FLAGS["distill"] | {"robustness", "target"})
  assert {f for f in flags if not f.startswith("config.")} <= allowed, f"{where}: {command}"
  given = [w.split("=", 1)[1] for w in words if w.startswith("--config=")]
  if not given:
    return
  path, _, variant = configs.resolve_config_path(given[0]).partition(":")
  assert os.path.isfile(path), f"{where}: {command}"
  config = configs.load_config_file(path, variant)
  for word in words:
    if word.startswith("--config."):
      key = word[len("--config."):].split("=")[0]
      node = config
      for part in key.split("."):
        assert part in node, f"{where}: {command}: no config key {key}"
        node = node[part]
