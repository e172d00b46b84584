"""Flag rewriting, REQUIRED macros and unknown-binding errors of the gin edge."""

import gin
import pytest

from t5x_like import gin_utils

pytestmark = pytest.mark.usefixtures("clean_gin")  # see conftest.py


@pytest.mark.parametrize(
    "flag, binding",
    [
        ("--gin.MODEL_DIR=/tmp/x", "MODEL_DIR = '/tmp/x'"),
        ("--gin.MODEL_DIR='/tmp/x'", "MODEL_DIR = '/tmp/x'"),
        ("--gin.TRAIN_STEPS=100", "TRAIN_STEPS = 100"),
        ("--gin.LR=1e-3", "LR = 1e-3"),
        ("--gin.FLAG=True", "FLAG = True"),
        ("--gin.LENS={'inputs': 128, 'targets': 32}", "LENS = {'inputs': 128, 'targets': 32}"),
        ("--gin.OPT=@optimizers.adamw()", "OPT = @optimizers.adamw()"),
        ("--gin.X=%Y", "X = %Y"),
        ("--gin.NAME=c4_span_corruption", "NAME = 'c4_span_corruption'"),
    ],
)
def test_rewrite_quotes_only_plain_strings(flag, binding):
    rest, bindings = gin_utils.rewrite_argv(["--run_mode=train", flag])
    assert rest == ["--run_mode=train"]
    assert bindings == [binding]


def test_flag_without_value_is_an_error():
    with pytest.raises(ValueError, match=r"gin flag '--gin\.MODEL_DIR' has no value"):
        gin_utils.rewrite_argv(["--gin.MODEL_DIR"])


def test_missing_required_macro_is_named(tmp_path):
    f = tmp_path / "run.gin"
    f.write_text("MODEL_DIR = %gin.REQUIRED\nTRAIN_STEPS = %gin.REQUIRED\nBATCH_SIZE = 8\n")
    with pytest.raises(ValueError, match=r"required gin macro\(s\) not set: MODEL_DIR, TRAIN_STEPS"
                                         r".*--gin\.MODEL_DIR=\.\.\. --gin\.TRAIN_STEPS=\.\.\."):
        gin_utils.parse_gin([str(f)], ["BATCH_SIZE = 4"], search_paths=[str(tmp_path)])


def test_required_macro_set_on_command_line_passes(tmp_path):
    f = tmp_path / "run.gin"
    f.write_text("MODEL_DIR = %gin.REQUIRED\n")
    _, bindings = gin_utils.rewrite_argv(["--gin.MODEL_DIR=/tmp/run"])
    gin_utils.parse_gin([str(f)], bindings, search_paths=[str(tmp_path)])
    assert gin.query_parameter("%MODEL_DIR") == "/tmp/run"


def test_unknown_binding_names_it_and_suggests(tmp_path):
    f = tmp_path / "run.gin"
    f.write_text(
        "from __gin__ import dynamic_registration\n"
        "from t5x_like import gin_utils\n"
        "gin_utils.write_config.operative = False\n"
    )
    with pytest.raises(ValueError,
                       match=r"unknown gin binding 'gin_utils\.write_confg'.*Did you mean"):
        gin_utils.parse_gin([str(f)], ["gin_utils.write_confg.operative = True"],
                            search_paths=[str(tmp_path)])


def test_missing_gin_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gin file 'nope\.gin' not found"):
        gin_utils.parse_gin(["nope.gin"], search_paths=[str(tmp_path)])
