"""Cases that already hold, kept so they stay holding."""
from __future__ import annotations

import pytest
from hostile_harness import assert_untouched, half_written, refused, run_cli, tree


def test_a_good_run_is_not_refused(world, capsys):
    before = tree(world)
    result = run_cli(capsys, "rtn", world / "model", "-o", world / "out", "--group-size", 32)
    assert result.code == 0, result.err
    assert_untouched(before, world, new=["out"])
    assert half_written(world) == []


@pytest.mark.parametrize("args,needles", [
    (["rtn", "{home}/missing", "-o", "{home}/out"], ("no such folder",)),
    (["rtn", "{home}/model", "-o", "{home}/out", "--bits", "5"], ("--bits 5",)),
    (["rtn", "{home}/model", "-o", "{home}/out", "--group-size", "0"], ("--group-size 0",)),
    (["rtn", "{home}/calib.txt", "-o", "{home}/out"], ("is a file",)),
    (["rtn", "{home}/model", "-o", "{home}/calib.txt"], ("is a file",)),
    (["rtn", "{home}/model", "-o", "{home}/nowhere/out"], ("parent folder",)),
    (["gptq", "{home}/model", "-o", "{home}/out", "--dataset", "{home}/missing.txt"], ("missing.txt",)),
])
def test_refusals_that_already_hold(world, capsys, args, needles):
    refused(capsys, world, [a.format(home=world) for a in args], needles=needles)
