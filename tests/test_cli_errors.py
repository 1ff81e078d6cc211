"""argparse's own mistakes (an unknown option, a value of the wrong type, a missing required
option) exit 2 with one line naming the option, in every command (fpkern.errors)."""

import pytest

from fpkern import evaluate, sample
from fpkern.train import cli as train_cli

MAINS = {"sample": sample.main, "evaluate": evaluate.main, "train": train_cli.main}


@pytest.mark.parametrize("argv, word", [
    (["sample", "--checkpoint", "c.pt", "-n", "abc"], "-n"),
    (["sample", "-n", "4"], "--checkpoint"),
    (["sample", "--checkpoint", "c.pt", "--no-such-option"], "--no-such-option"),
    (["evaluate", "--checkpoint", "c.pt", "--limit", "1.5"], "--limit"),
    (["evaluate", "--checkpoint", "c.pt", "--dataset", "digits", "--bogus"], "--bogus"),
    (["evaluate", "--checkpoint", "c.pt"], "--dataset"),
    (["train", "--steps", "many"], "--steps"),
    (["train", "--arch", "resnet"], "--arch"),
])
def test_argparse_mistakes_are_one_line(argv, word, capsys):
    assert MAINS[argv[0]](argv[1:]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and word in err and "error:" in err, err
    assert "usage:" not in err
