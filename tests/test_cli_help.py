"""Every command's `--help` prints its options and exits 0.

argparse %-formats help strings, so a literal "%" in a field's help text (as "10%" once was in two of them)
turns `--help` into a traceback.
"""

import importlib

import pytest

# (module, function taking argv, an option its help must list)
COMMANDS = [
    ("sa2va_trl.grpo", "parse_args", "--text_hidden_fcs_learning_rate"),
    ("sa2va_trl.sft", "parse_args", "--warmup_steps"),
    ("sa2va_trl.reward_net.train", "parse_args", "--channels_last"),
    ("sa2va_trl.evaluate", "main", "--tasks"),
    ("sa2va_trl.checkpointing", "main", "check"),
    ("sa2va_trl.merge", "main", "--base-model"),
    ("sa2va_trl.convert.__main__", "main", "--max-shard-size"),
    ("sa2va_trl.data.synthetic", "main", "--n-test"),
]


@pytest.mark.parametrize("module, function, option", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_prints_usage_and_exits_zero(module, function, option, capsys):
    entry = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exit_info:
        entry(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage:") and option in printed
