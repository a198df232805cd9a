"""Numeric flags out of range (issue 20, item 3): every subcommand's, checked by argparse types in one
place (edgeinfer/cliargs.py), before any model is resolved or loaded: one plain sentence on stderr, exit 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from conftest import cli_env
from edgeinfer.cli import build_parser, main

G = ["generate", "-p", "hi"]  # no -m: the catalog's default would be fetched, so the check must come first

BAD = [
    (G + ["--max-tokens", "-1"], "--max-tokens must be at least 1, not -1"),
    (G + ["--max-tokens", "0"], "--max-tokens must be at least 1, not 0"),
    (G + ["--max-tokens", "ten"], "--max-tokens must be a whole number, at least 1, not 'ten'"),
    (G + ["--max-tokens", "2.5"], "--max-tokens must be a whole number, at least 1, not '2.5'"),
    (G + ["--temp", "-1"], "--temp must be at least 0, not -1"),
    (G + ["--temp", "nan"], "--temp must be a number, at least 0, not 'nan'"),
    (G + ["--temp", "inf"], "--temp must be a number, at least 0, not 'inf'"),
    (G + ["--top-p", "0"], "--top-p must be in (0, 1], not 0"),
    (G + ["--top-p", "1.5"], "--top-p must be in (0, 1], not 1.5"),
    (G + ["--top-k", "-3"], "--top-k must be at least 0, not -3"),
    (G + ["--min-p", "1"], "--min-p must be in [0, 1), not 1"),
    (G + ["--min-p", "-0.1"], "--min-p must be in [0, 1), not -0.1"),
    (G + ["--repetition-penalty", "0"], "--repetition-penalty must be more than 0, not 0"),
    (G + ["--seed", "-1"], "--seed must be at least 0, not -1"),
    (G + ["--context", "1"], "--context must be at least 2, not 1"),
    (G + ["--threads", "0"], "--threads must be at least 1, not 0"),
    (G + ["--sparsity", "1"], "--sparsity must be in [0, 1), not 1"),
    (G + ["--num-draft", "0"], "--num-draft must be between 1 and 64, not 0"),
    (G + ["--num-draft", "65"], "--num-draft must be between 1 and 64, not 65"),
    (G + ["--expert-budget", "0"], "--expert-budget must be at least 1, not 0"),
    (G + ["--expert-mass", "1.5"], "--expert-mass must be in (0, 1], not 1.5"),
    (G + ["--moe-top-k", "0"], "--moe-top-k must be at least 1, not 0"),
    (G + ["--memory-budget", "0"], "--memory-budget must be a size above 0 like 1.5GB, 800MiB or 60% (at most 100%), not '0'"),
    (G + ["--memory-budget", "150%"], "--memory-budget must be a size above 0 like 1.5GB, 800MiB or 60% (at most 100%), not '150%'"),
    (G + ["--memory-budget", "lots"], "--memory-budget must be a size above 0 like 1.5GB, 800MiB or 60% (at most 100%), not 'lots'"),
    (["chat", "--max-tokens", "-5"], "--max-tokens must be at least 1, not -5"),
    (["chat", "--temp", "-0.5"], "--temp must be at least 0, not -0.5"),
    (["plan", "--context", "0"], "--context must be at least 2, not 0"),
    (["eval", "ppl", "--data", "x", "--window", "1"], "--window must be at least 2, not 1"),
    (["eval", "ppl", "--data", "x", "--max-windows", "0"], "--max-windows must be at least 1, not 0"),
    (["eval", "gen", "--max-tokens", "0"], "--max-tokens must be at least 1, not 0"),
    (["bench", "-p", "0"], "-p must be at least 1, not 0"),
    (["bench", "-n", "-2"], "-n must be at least 1, not -2"),
    (["bench", "-r", "0"], "-r must be at least 1, not 0"),
    (["bench", "--threads", "0"], "--threads must be at least 1, not 0"),
    (["bench", "--num-draft", "99"], "--num-draft must be between 1 and 64, not 99"),
    (["sparsify", "pkg", "--sparsity", "0"], "--sparsity must be in (0, 1), not 0"),
    (["sparsify", "pkg", "--sparsity", "0.4", "1.2"], "--sparsity must be in (0, 1), not 1.2"),
    (["sparsify", "pkg", "--sparsity", "0.5", "--population", "1"], "--population must be at least 2, not 1"),
    (["sparsify", "pkg", "--sparsity", "0.5", "--generations", "0"], "--generations must be at least 1, not 0"),
    (["sparsify", "pkg", "--sparsity", "0.5", "--fitness-windows", "0"], "--fitness-windows must be at least 1, not 0"),
    (["sparsify", "pkg", "--sparsity", "0.5", "--calib-generate", "0"], "--calib-generate must be at least 1, not 0"),
    (["profile", "--duration", "0"], "--duration must be more than 0, not 0"),
    (["profile", "--idle", "-1"], "--idle must be at least 0, not -1"),
    (["profile", "--max-tokens", "0"], "--max-tokens must be at least 1, not 0"),
    (["profile", "--threads", "0"], "--threads must be at least 1, not 0"),
    (["profile", "--battery-wh", "0"], "--battery-wh must be more than 0, not 0"),
    (["profile", "--interval", "-0.1"], "--interval must be more than 0, not -0.1"),
    (["profile", "--sparsity", "2"], "--sparsity must be in [0, 1), not 2"),
    (["scenario", "run", "x", "--duration", "-1"], "--duration must be more than 0, not -1"),
    (["scenario", "run", "x", "--seed", "-3"], "--seed must be at least 0, not -3"),
    (["scenario", "run", "x", "--memory-budget", "0MB"], "--memory-budget must be a size above 0 like 1.5GB, 800MiB or 60% (at most 100%), not '0MB'"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_out_of_range_is_one_sentence_and_status_2(argv, message, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"edgeinfer: {message}\n"


def test_other_argparse_errors_are_one_line_too(capsys):
    assert main(["generate"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "edgeinfer: the following arguments are required: -p/--prompt (see `edgeinfer generate --help`)\n"
    assert main(G + ["--backend", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeinfer: argument --backend: invalid choice: 'tpu'") and err.count("\n") == 1


def test_the_ends_of_the_ranges_are_accepted():
    a = build_parser().parse_args(G + ["--max-tokens", "1", "--temp", "0", "--top-p", "1", "--top-k", "0", "--min-p", "0",
                                       "--repetition-penalty", "0.01", "--seed", "0", "--context", "2", "--threads", "1",
                                       "--sparsity", "0", "--num-draft", "64", "--expert-mass", "1", "--memory-budget", "100%"])
    assert (a.max_tokens, a.temp, a.top_p, a.top_k, a.min_p, a.num_draft, a.context, a.memory_budget) == (1, 0.0, 1.0, 0, 0.0, 64, 2, "100%")
    assert type(a.max_tokens) is int and type(a.temp) is float
    a = build_parser().parse_args(["sparsify", "pkg", "--sparsity", "0.4", "0.5"])
    assert a.sparsity == [0.4, 0.5]


def _actions(parser: argparse.ArgumentParser):
    for act in parser._actions:
        if isinstance(act, argparse._SubParsersAction):
            for sub in act.choices.values():
                yield from _actions(sub)
        else:
            yield parser.prog, act


def test_every_numeric_flag_is_range_checked():
    """No subcommand has a bare int/float flag left (a new one would accept -1 silently); choices are fine."""
    bare = [f"{prog} {'/'.join(act.option_strings) or act.dest}" for prog, act in _actions(build_parser())
            if act.type in (int, float) and not act.choices]
    assert bare == []


def test_generate_max_tokens_minus_one_from_the_shell():
    r = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "generate", "-p", "hi", "--max-tokens", "-1"],
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "edgeinfer: --max-tokens must be at least 1, not -1\n")


def test_the_parser_imports_no_numpy_and_knows_the_draft_limit():
    """Building the parser stays light (`edgeinfer --help`, `models`, `meters` import no numpy); the --num-draft
    limit it checks is speculative decoding's."""
    code = ("import sys, edgeinfer.cli as c; c.build_parser(); print('numpy' in sys.modules, c.MAX_DRAFT)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.stdout.split() == ["False", "64"], r.stderr
    from edgeinfer.speculative import MAX_DRAFT

    assert MAX_DRAFT == 64
