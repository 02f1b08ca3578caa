import pytest
from hypothesis import given, settings

from slimfx import Pipeline
from slimfx.errors import PipelineError
from slimfx.testing import strategies as sst


def test_parse_and_print_canonical_form():
    p = Pipeline.parse(" fold-bn , dce{prune_modules = false} ,canonicalize{}", validate=True)
    assert str(p) == "fold-bn,dce{prune_modules=false},canonicalize"
    assert [s.name for s in p] == ["fold-bn", "dce", "canonicalize"]
    assert p.specs[1].option_dict() == {"prune_modules": "false"}


def test_lists_and_quoted_values_round_trip():
    text = 'x-pass{block=[4,4],ignore=["head.*","a b"],name="q\\"uote"}'
    p = Pipeline.parse(text, validate=False)
    assert p.specs[0].option_dict()["block"] == ("4", "4")
    assert p.specs[0].option_dict()["ignore"] == ("head.*", "a b")
    assert p.specs[0].option_dict()["name"] == 'q"uote'
    assert Pipeline.parse(str(p), validate=False) == p


@settings(max_examples=200)
@given(sst.pipeline_specs())
def test_grammar_round_trips(pipeline):
    text = str(pipeline)
    assert Pipeline.parse(text, validate=False) == pipeline
    assert str(Pipeline.parse(text, validate=False)) == text


@pytest.mark.parametrize(
    ("text", "message", "column"),
    [
        ("fold-bn,,dce", "expected a pass name", 8),
        ("fold-bn{strict true}", "expected '=' after option name 'strict'", 15),
        ("fold-bn{strict=true", "expected '}' to close the options of 'fold-bn'", 19),
        ("dce fold-bn", "expected ',' between passes", 4),
        ('x{a="open}', "unterminated string", 4),
        ("x{a=[1,2}", "expected ']' to close the list", 8),
    ],
)
def test_syntax_errors_show_a_caret_under_the_bad_position(text, message, column):
    with pytest.raises(PipelineError) as info:
        Pipeline.parse(text, validate=False)
    lines = str(info.value).splitlines()
    assert message in lines[0]
    assert lines[1] == f"  {text}"
    assert lines[2] == "  " + " " * column + "^"


def test_unknown_pass_has_did_you_mean_and_caret():
    with pytest.raises(PipelineError) as info:
        Pipeline.parse("dce,fold-nb")
    lines = str(info.value).splitlines()
    assert "unknown pass 'fold-nb'" in lines[0] and "did you mean 'fold-bn'" in lines[0]
    assert lines[2] == "  " + " " * 4 + "^"


def test_unknown_option_has_did_you_mean_and_caret():
    with pytest.raises(PipelineError) as info:
        Pipeline.parse("fold-bn{strikt=true}")
    lines = str(info.value).splitlines()
    assert "no option 'strikt'" in lines[0] and "did you mean 'strict'" in lines[0]
    assert lines[2] == "  " + " " * 8 + "^"


def test_mistyped_option_names_the_type():
    with pytest.raises(PipelineError, match="option 'strict' of pass 'fold-bn' expects bool"):
        Pipeline.parse("fold-bn{strict=maybe}")


def test_duplicate_option_is_an_error():
    with pytest.raises(PipelineError, match="given twice"):
        Pipeline.parse("fold-bn{strict=true,strict=false}")
