"""README.md: every train.py / probe.py / ood.py / viz.py command a user can paste names flags that exist, with
values their parser takes (parsing only: the paths in the examples are placeholders)."""

import os
import re
import shlex

import pytest

import finetune
import ood
import probe
import train
import viz
import zeroshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARSERS = {"train.py": train.build_parser, "probe.py": probe.build_parser, "ood.py": ood.build_parser,
           "viz.py": viz.build_parser, "finetune.py": finetune.build_parser,
           "zeroshot.py": zeroshot.build_parser}


def readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    commands = []
    for line in (line for block in blocks for line in block.splitlines()):
        words = shlex.split(line.split("  #")[0])
        scripts = [i for i, w in enumerate(words) if w in PARSERS]
        if scripts:
            commands.append((words[scripts[0]], words[scripts[0] + 1:]))
    return commands


def test_the_readme_shows_each_script():
    assert {script for script, _ in readme_commands()} == set(PARSERS)


@pytest.mark.parametrize("script, argv", readme_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_readme_commands_parse(script, argv):
    PARSERS[script]().parse_args(argv)  # an unknown flag or a bad value exits 2
