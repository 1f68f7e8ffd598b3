"""model.arguments: the command-line tools' number types."""
from __future__ import annotations

import argparse

import pytest

from model.arguments import non_negative_int, number, positive_int


def _parse(kind, text):
    p = argparse.ArgumentParser(prog="tool", exit_on_error=False)
    p.add_argument("--x", type=kind)
    return p.parse_args(["--x", text]).x


@pytest.mark.parametrize("kind,text,value", [
    (positive_int, "3", 3), (non_negative_int, "0", 0), (number(0, 1), "1", 1.0), (number(above=0), "1e-9", 1e-9),
    (number(-45, 45), "-45", -45.0), (number(), "-1000.5", -1000.5),
])
def test_accepted(kind, text, value):
    assert _parse(kind, text) == value


@pytest.mark.parametrize("kind,text,message", [
    (positive_int, "0", "must be at least 1, got 0"), (positive_int, "-4", "must be at least 1, got -4"),
    (positive_int, "2.5", "not a whole number: '2.5'"), (non_negative_int, "-1", "must be at least 0, got -1"),
    (number(0, 1), "1.5", "must be <= 1, got 1.5"), (number(0, 1), "-3", "must be >= 0, got -3"),
    (number(above=0), "0", "must be > 0, got 0"), (number(below=360), "360", "must be < 360, got 360"),
    (number(), "nan", "must be a finite number, got 'nan'"), (number(), "inf", "must be a finite number"),
    (number(), "ten", "not a number: 'ten'"),
])
def test_refused_with_the_reason(kind, text, message):
    with pytest.raises(argparse.ArgumentError, match=message) as caught:
        _parse(kind, text)
    assert "--x" in str(caught.value)
