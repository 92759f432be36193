"""Flags from config dataclasses: `--help` describes each flag with its field's comment."""

import argparse
import json
from dataclasses import dataclass, field

import pytest

from jobs.cli import main as cli
from jobs.config import add_dataclass_args, field_comments


@dataclass
class Example:
    data: str  # the store folder
    # Two lines above a field describe it. Only their first sentence
    # reaches --help.
    steps: int = 10
    tag: str = "a#b"  # a '#' inside a default is not a comment; 50% is kept as is
    sizes: tuple[int, ...] = (
        1,
        2,
    )  # on the field's last line

    plain: int = 0
    given: float = field(default=1.0, metadata={"help": "metadata wins"})  # not this comment


def test_field_comments_take_the_trailing_comment_else_the_first_sentence_above():
    assert field_comments(Example) == {
        "data": "the store folder",
        "steps": "Two lines above a field describe it.",
        "tag": "a '#' inside a default is not a comment; 50% is kept as is",
        "sizes": "on the field's last line",
        "given": "not this comment",
    }
    p = argparse.ArgumentParser()
    add_dataclass_args(p, Example)
    text = p.format_help()
    assert "metadata wins" in text and "not this comment" not in text
    assert "50% is kept as is (default: a#b)" in " ".join(text.split())  # a bare % would break argparse


def test_a_stage_s_help_describes_its_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["sample", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--n N images per prompt (default: 4)" in out
    assert "--sampler SAMPLER ddim or dpm++, for both models (default: dpm++)" in out


@dataclass
class Flags:
    store: str
    check: bool = False
    prompt: list[str] = field(default_factory=list)


@pytest.mark.parametrize(
    "argv, want",
    [
        # a bare bool flag before the positional took it for its value ("expected true/false, got 'store'")
        (["--check", "st"], ("st", True)),
        (["st", "--check"], ("st", True)),
        (["--check", "false", "st"], ("st", False)),
        (["--check=no", "st"], ("st", False)),
        (["st"], ("st", None)),
        (["--che", "st"], ("st", True)),  # shortened, as argparse allows
    ],
)
def test_a_bare_bool_flag_leaves_the_next_argument_alone(argv, want):
    from jobs.cli import _Parser

    p = _Parser()
    add_dataclass_args(p, Flags, positional=("store",))
    args = p.parse_args(argv)
    assert (args.store, getattr(args, "check", None)) == want


def test_a_list_flag_given_twice_keeps_both_lists():
    from jobs.cli import _Parser

    p = _Parser()
    add_dataclass_args(p, Flags, positional=("store",))
    assert p.parse_args(["st", "--prompt", "a", "b", "--prompt", "c"]).prompt == ["a", "b", "c"]


def test_a_refused_read_or_write_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    from pipeline import validate

    def full(cfg):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(validate, "run", full)
    assert cli(["validate", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"unclip validate: failed: [Errno 28] No space left on device: '{tmp_path / 'x'}' (--verbose shows where)"
    ]


def test_only_rank_0_prints_a_training_runs_report_under_torchrun(tmp_path, capsys, monkeypatch):
    """Every rank printed the run's report. Other commands print theirs under any RANK (a script run by a
    launcher that sets it, a Kubernetes job's pod): their report is their output."""
    from jobs import train_prior
    from tests.synthetic_store import make_store

    make_store(tmp_path / "s", [8], dim=16, n_classes=2)
    monkeypatch.setattr(train_prior, "run", lambda cfg: {"steps": 1})
    monkeypatch.setenv("RANK", "1")
    train = ["train-prior", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "r")]
    assert cli(train) == 0 and capsys.readouterr().out == ""
    assert cli(["validate", str(tmp_path / "s")]) == 0 and "rows: OK" in capsys.readouterr().out
    monkeypatch.setenv("RANK", "0")
    assert cli(train) == 0 and json.loads(capsys.readouterr().out) == {"steps": 1}


def test_a_positional_setting_may_come_from_the_config_file(tmp_path, capsys):
    """--config loads settings, but validate's STORE and adopt's FOLDER had to be typed: "required: store"."""
    from tests.synthetic_store import make_store

    make_store(tmp_path / "s", [8], dim=16, n_classes=2)
    (tmp_path / "c.json").write_text(json.dumps({"store": str(tmp_path / "s")}))
    assert cli(["validate", "--config", str(tmp_path / "c.json")]) == 0
    assert "rows: OK" in capsys.readouterr().out
    assert cli(["validate"]) == 2
    assert capsys.readouterr().err.strip() == "unclip validate: error: missing required setting(s): STORE"


def test_a_ctrl_c_while_the_commands_module_imports_is_one_line(capsys, monkeypatch):
    """Importing torch takes seconds: a Ctrl-C then was a KeyboardInterrupt traceback through importlib."""
    import importlib

    from jobs import cli as cli_module

    real = importlib.import_module

    def slow(name, *a):
        if name == "jobs.train_prior":
            raise KeyboardInterrupt
        return real(name, *a)

    monkeypatch.setattr(cli_module.importlib, "import_module", slow)
    assert cli_module.main(["train-prior", "--data", "x", "--out", "y"]) == 130
    assert capsys.readouterr().err == "unclip: interrupted\n"


def test_make_targets_take_any_path_and_name_an_empty_variable(tmp_path):
    """Paths were pasted into the recipe's shell line in single quotes: a quote in one broke the command, a
    double quote in PROMPT was dropped, an empty STORE became "." and a missing URLS was said only after the
    venv was built (minutes, in a fresh clone)."""
    import subprocess
    from pathlib import Path

    from tests.synthetic_store import make_store

    repo = Path(__file__).resolve().parent.parent
    odd = tmp_path / 'it\'s a "store"'
    make_store(odd, [5], dim=8, n_classes=2)

    def make(*args):  # -o: never rebuild the venv here, whatever its stamp's age
        return subprocess.run(
            ["make", "-s", "-C", str(repo), "-o", ".venv/.installed", *args], capture_output=True, text=True
        )

    r = make("validate", f"STORE={odd}")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    r = make("validate", "STORE=")
    assert r.returncode == 2 and "make: STORE is empty; give it a value" in r.stderr
    r = make("download")
    assert r.returncode == 2 and r.stderr.startswith("usage: make download URLS=")
    # the defaults stand (an `export` above their `?=` once emptied them, and `make validate`, `make sample
    # PROMPT=...` said "STORE is empty"): read from make's database, as a user's checkout may hold a store/
    r = make("-p", "-n", "validate")
    values = dict(
        line.split(" = ", 1) for line in r.stdout.splitlines() if " = " in line and line[0].isupper()
    )
    want = {"STORE": "store", "PRIOR_OUT": "prior", "DECODER_OUT": "decoder", "SAMPLES": "samples.png"}
    assert {k: values.get(k) for k in want} == want
