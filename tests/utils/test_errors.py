"""User errors as one line (diffusers_aria/errors.py): the guard of the entry points, --debug, argparse."""

from __future__ import annotations

import argparse

import pytest

from diffusers_aria.utils.errors import (
    OneLineArgumentParser,
    UserError,
    is_user_error,
    one_line,
    parse_briefly,
    run_main,
    split_debug_flag,
)


def _raise(exc: BaseException):
    def fn(argv):
        raise exc
    return fn


def test_a_user_error_is_one_line_on_stderr_and_exit_code_2(capsys):
    assert run_main(_raise(UserError("--pool 'x.txt': no such file\nsecond line")), []) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: --pool 'x.txt': no such file; second line\n" and captured.out == ""


def test_debug_shows_the_traceback_of_a_user_error():
    with pytest.raises(UserError, match="no such file"):
        run_main(_raise(UserError("no such file")), [], debug=True)


def test_other_exceptions_keep_their_traceback(capsys):
    with pytest.raises(ZeroDivisionError):
        run_main(_raise(ZeroDivisionError("a bug")), [])
    with pytest.raises(ValueError):  # a plain ValueError is not a user error: it may be a bug
        run_main(_raise(ValueError("bad")), [])
    assert capsys.readouterr().err == ""


def test_exit_codes_pass_through():
    assert run_main(lambda argv: None, []) == 0
    assert run_main(lambda argv: 3, ["a"]) == 3
    assert run_main(lambda argv: len(argv), ["a", "b"]) == 2


def test_library_errors_that_are_user_mistakes_count_as_user_errors():
    from diffusers_aria.pool import PromptPoolError
    from diffusers_aria.regions import RegionsMismatchError
    from diffusers_aria.training.checkpointing import CheckpointError
    from diffusers_aria.training.data import StaleCacheError
    from diffusers_aria.training.inputs import RankMismatchError
    from diffusers_aria.training.outputs import OutputDirError
    from diffusers_aria.training.student import FeatureMappingError

    for cls in (PromptPoolError, RegionsMismatchError, OutputDirError, FeatureMappingError, RankMismatchError,
                CheckpointError, StaleCacheError):
        assert is_user_error(cls("x")), cls
    assert issubclass(UserError, ValueError) and issubclass(PromptPoolError, UserError)
    assert not is_user_error(RuntimeError("x")) and not is_user_error(KeyError("x"))


def test_split_debug_flag_leaves_what_follows_double_dash():
    assert split_debug_flag(["report", "--debug", "x"]) == (["report", "x"], True)
    assert split_debug_flag(["demo", "--", "--debug"]) == (["demo", "--", "--debug"], False)
    assert split_debug_flag([]) == ([], False)


def test_one_line():
    assert one_line("a\n\n  b  \n") == "a; b" and one_line("") == "unknown error"


def test_one_line_argument_parser_prints_one_line(capsys):
    p = OneLineArgumentParser(prog="tool")
    p.add_argument("--k", type=int, required=True)
    for _ in range(30):
        p.add_argument(f"--flag{_}")
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--k", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --k: invalid int value: 'many'" in err and "usage" not in err


def _script_like_parser(argv):
    p = argparse.ArgumentParser(prog="train.py")
    p.add_argument("--allocation", choices=["aria", "rc"], default="aria")
    p.add_argument("--image_free", action="store_true")
    args = p.parse_args(argv)
    if not args.image_free:
        p.error("paired data is needed: pass --image_free")
    return args


def test_parse_briefly_turns_argparse_errors_into_one_line_user_errors(capsys):
    with pytest.raises(UserError) as e:
        parse_briefly(_script_like_parser, ["--image_free", "--allocation", "nope"])
    assert str(e.value).startswith("argument --allocation: invalid choice: 'nope'") and "\n" not in str(e.value)
    with pytest.raises(UserError, match="paired data is needed"):
        parse_briefly(_script_like_parser, [])
    assert capsys.readouterr().err == ""  # the usage text was held back
    assert parse_briefly(_script_like_parser, ["--image_free"]).allocation == "aria"


def test_parse_briefly_lets_help_through(capsys):
    with pytest.raises(SystemExit) as e:
        parse_briefly(_script_like_parser, ["--help"])
    assert e.value.code == 0 and "--allocation" in capsys.readouterr().out
