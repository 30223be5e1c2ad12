"""The safe expression evaluator and ``${{ }}`` templates."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.workflow.errors import ExpressionError
from services.workflow.expressions import (
    MAX_DEPTH,
    MAX_LENGTH,
    compile_expression,
    render,
    template_expressions,
)

SCOPE: dict[str, Any] = {
    "inputs": {"mode": "full", "items": [1, 2, 3], "name": "Order", "limit": 2.5},
    "steps": {
        "fetch": {"output": {"n": 3, "tags": ["a", "b"]}, "status": "succeeded"},
        "skipped": {"output": None, "status": "skipped"},
    },
    "item": {"sku": "x-1", "qty": 2},
    "iteration": 2,
    "run": {"id": "r-1", "workflow": "order-pipeline"},
    "text": "hello",
}


def evaluate(source: str, scope: dict[str, Any] | None = None) -> Any:
    return compile_expression(source).evaluate(SCOPE if scope is None else scope)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("'abc'", "abc"),
        ('"abc"', "abc"),
        ("42", 42),
        ("-1.5", -1.5),
        ("true", True),
        ("false", False),
        ("null", None),
        ("True", True),
        ("None", None),
        ("[1, 'a', null]", [1, "a", None]),
        ("(1, 2)", [1, 2]),
        ("{'a': 1, 'b': [true]}", {"a": 1, "b": [True]}),
        ("[]", []),
        ("{}", {}),
    ],
)
def test_literals(source: str, expected: Any) -> None:
    assert evaluate(source) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("inputs.mode", "full"),
        ("inputs['mode']", "full"),
        ("inputs.items[0]", 1),
        ("inputs.items[-1]", 3),
        ("steps.fetch.output.n", 3),
        ("steps['fetch']['output'].tags[1]", "b"),
        ("steps.skipped.output", None),
        ("item.sku", "x-1"),
        ("run.workflow", "order-pipeline"),
        ("{'k': inputs.items}['k'][1]", 2),
    ],
)
def test_field_and_index_access(source: str, expected: Any) -> None:
    assert evaluate(source) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("inputs.mode == 'full'", True),
        ("inputs.mode != 'full'", False),
        ("1 < 2 < 3", True),
        ("1 < 3 < 2", False),
        ("3 >= 3 > 2 <= 2", True),
        ("2 in inputs.items", True),
        ("5 not in inputs.items", True),
        ("'mode' in inputs", True),
        ("'ell' in text", True),
        ("inputs.mode == 'full' and iteration > 1", True),
        ("inputs.mode == 'quick' or iteration", 2),
        ("null or 'default'", "default"),
        ("0 and missing_name", 0),
        ("not steps.skipped.output", True),
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2", 3.5),
        ("7 % 3", 1),
        ("10 - iteration", 8),
        ("-iteration", -2),
        ("+inputs.limit", 2.5),
        ("'a' + 'b'", "ab"),
        ("inputs.items + [4]", [1, 2, 3, 4]),
        ("len(inputs.items)", 3),
        ("len(inputs)", 4),
        ("len(text)", 5),
        ("int('12') + int(2.9)", 14),
        ("float('1.5') + float(1)", 2.5),
        ("str(inputs.items)", "[1,2,3]"),
        ("str(text)", "hello"),
        ("lower(inputs.name)", "order"),
        ("upper(inputs.name)", "ORDER"),
    ],
)
def test_operators_and_functions(source: str, expected: Any) -> None:
    assert evaluate(source) == expected


def test_names_and_paths_are_reported() -> None:
    expression = compile_expression(
        "steps.fetch.output.n > len(inputs.items) and steps[x].status == 'ok' or true"
    )
    assert expression.names == {"steps", "inputs", "x"}
    # steps[x] reads steps with a computed key: all of it, beside the static steps.fetch...
    assert expression.paths == {
        ("steps", "fetch", "output", "n"),
        ("steps",),
        ("inputs", "items"),
        ("x",),
    }
    assert compile_expression("item['a'][0]").paths == {("item", "a", 0)}
    assert compile_expression("[steps.a.output, steps.a]").paths == {
        ("steps", "a", "output"),
        ("steps", "a"),
    }


def test_a_whole_template_compiles_like_the_bare_expression() -> None:
    assert evaluate("${{ inputs.items }}") == [1, 2, 3]
    assert evaluate("  ${{ iteration >= 2 }}  ") is True
    assert compile_expression("${{ inputs.mode }}").source == " inputs.mode "


def test_multiline_expression() -> None:
    assert evaluate("inputs.mode == 'full'\n  and iteration == 2") is True


def test_compiled_expressions_are_cached() -> None:
    assert compile_expression("iteration + 1") is compile_expression("iteration + 1")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("steps.fetch.output.n2", "steps.fetch.output.n2: no field 'n2'"),
        ("steps.nope.output", "steps.nope: no field 'nope'"),
        ("inputs['missing']", "inputs['missing']: no field 'missing'"),
        ("inputs.items[3]", "inputs.items[3]: index 3 out of range (length 3)"),
        ("inputs.items.first", "inputs.items.first: cannot take 'first' of a list"),
        ("text.upper", "text.upper: cannot take 'upper' of a string"),
        ("text[0]", "text[0]: cannot take 0 of a string"),
        ("steps.skipped.output.n", "steps.skipped.output.n: cannot take 'n' of a null"),
        ("inputs.items[true]", "inputs.items[true]: cannot take True of a list"),
        ("undefined + 1", "undefined: unknown name (in scope: inputs, item, iteration"),
    ],
)
def test_missing_names_and_fields_name_the_path(source: str, message: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        evaluate(source)
    assert caught.value.reason.startswith(message)
    assert caught.value.expression == source
    assert source in str(caught.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("1 < 'a'", "'<' not supported"),
        ("1 / 0", "division by zero"),
        ("7 % 0", "modulo by zero"),
        ("int('x1')", "invalid literal"),
        ("len(3)", "len() of a int"),
        ("lower(3)", "lower() of a int"),
        ("-text", "unary minus or plus of a string"),
        ("1 + 'a'", "unsupported operand types: int and string"),
        ("true + 1", "unsupported operand types: bool and int"),
        ("3 in 5", "'in' needs a list, dict or string"),
        ("1 in text", "'in <string>' needs a string on the left"),
        ("{[1]: 2}", "unhashable"),
    ],
)
def test_evaluation_errors_are_expression_errors(source: str, message: str) -> None:
    with pytest.raises(ExpressionError, match="column 1") as caught:
        evaluate(source)
    assert message in caught.value.reason


@pytest.mark.parametrize(
    "source",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "text.__class__",
        "text.__class__.__mro__[1].__subclasses__()",
        "inputs['__class__']",
        "().__class__",
        "__builtins__",
        "lambda: 1",
        "(lambda x: x)(1)",
        "[x for x in inputs.items]",
        "{x for x in inputs.items}",
        "{x: 1 for x in inputs.items}",
        "(x for x in inputs.items)",
        "text.upper()",
        "'abc'.upper()",
        "'{}'.format(1)",
        "getattr(text, 'upper')",
        "eval('1')",
        "exec('x = 1')",
        "open('/etc/passwd')",
        "compile('1', 'f', 'eval')",
        "globals()",
        "(y := 1)",
        "f'{text}'",
        "1 if text else 2",
        "'%s' % text",
        "text * 3",
        "[1] * 3",
        "2 ** 64",
        "7 // 2",
        "1 << 3",
        "~1",
        "text is None",
        "inputs.items[0:2]",
        "len(*inputs.items)",
        "len(x=1)",
        "len(text, text)",
        "b'bytes'",
        "1j",
        "...",
        "{**inputs}",
        "[*inputs.items]",
        "await x",
        "yield",
        "x = 1",
        "import os",
        "",
        "   ",
    ],
)
def test_anything_outside_the_language_is_refused(source: str) -> None:
    with pytest.raises(ExpressionError):
        evaluate(source)


def test_dunder_names_are_refused_even_when_bound() -> None:
    with pytest.raises(ExpressionError, match="'__x' is not allowed"):
        compile_expression("__x")
    with pytest.raises(ExpressionError, match="'__len__' is not allowed"):
        compile_expression("inputs.__len__")


def test_syntax_errors_carry_a_column() -> None:
    with pytest.raises(ExpressionError, match="syntax error") as caught:
        compile_expression("  inputs.mode == 'a' and )")
    assert caught.value.column > 2


def test_errors_point_at_the_offending_part() -> None:
    with pytest.raises(ExpressionError) as caught:
        evaluate("iteration > 1 and steps.fetch.output.zz")
    assert caught.value.column == len("iteration > 1 and ") + 1


def test_nesting_and_length_are_bounded() -> None:
    with pytest.raises(ExpressionError, match="nested deeper"):
        compile_expression("-" * (MAX_DEPTH + 5) + "1")
    with pytest.raises(ExpressionError, match="longer than"):
        compile_expression("1 + " * MAX_LENGTH + "1")
    assert evaluate("-" * 10 + "1") == 1


def test_render_keeps_the_type_of_a_whole_template() -> None:
    value = {
        "items": "${{ inputs.items }}",
        "n": "${{steps.fetch.output.n}}",
        "none": "${{ steps.skipped.output }}",
        "nested": [{"flag": "${{ iteration == 2 }}"}, ("${{ item }}",)],
        "plain": 5,
        "text": "no template",
    }
    assert render(value, SCOPE) == {
        "items": [1, 2, 3],
        "n": 3,
        "none": None,
        "nested": [{"flag": True}, [{"sku": "x-1", "qty": 2}]],
        "plain": 5,
        "text": "no template",
    }


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("n=${{ steps.fetch.output.n }}", "n=3"),
        ("${{ inputs.mode }}/${{ iteration }}", "full/2"),
        (" ${{ inputs.mode }}", " full"),
        ("items: ${{ inputs.items }}", "items: [1,2,3]"),
        ("item: ${{ item }}", 'item: {"sku":"x-1","qty":2}'),
        ("${{ true }} ${{ null }} ${{ inputs.limit }}", "true null 2.5"),
        ("${{ 'a' }}${{ 'b' }}", "ab"),
        ("multi\nline ${{\n  run.id\n}}", "multi\nline r-1"),
    ],
)
def test_render_interpolates_templates_inside_text(template: str, expected: str) -> None:
    assert render(template, SCOPE) == expected


def test_render_reports_bad_templates() -> None:
    with pytest.raises(ExpressionError, match=r"steps\.fetch\.output\.m: no field 'm'"):
        render({"a": ["x ${{ steps.fetch.output.m }}"]}, SCOPE)
    with pytest.raises(ExpressionError, match="unterminated template"):
        render("value ${{ inputs.mode", SCOPE)
    with pytest.raises(ExpressionError, match="not allowed"):
        render("${{ text.__class__ }}", SCOPE)
    with pytest.raises(ExpressionError, match="cannot turn"):
        render("x ${{ item }}", {"item": object()})


def test_template_expressions_lists_every_expression() -> None:
    value = {
        "a": "${{ inputs.a }}",
        "b": ["x ${{ steps.s.output }} y ${{iteration}}", {"c": "${{ item.k }}"}],
        "d": 3,
        "e": "no template",
    }
    assert template_expressions(value) == [
        "inputs.a",
        "steps.s.output",
        "iteration",
        "item.k",
    ]
    assert template_expressions("plain") == []
    with pytest.raises(ExpressionError, match="unterminated"):
        template_expressions(["ok", "${{ broken"])


_TEXT = st.text(max_size=20).filter(lambda text: "${{" not in text)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(_JSON)
def test_render_leaves_template_free_values_unchanged(value: Any) -> None:
    assert render(value, SCOPE) == value


@settings(max_examples=150, deadline=None)
@given(_JSON, st.sampled_from(["${{ x }}", "${{x}}", "${{  x\n}}"]))
def test_render_of_a_whole_template_returns_the_scope_value(value: Any, template: str) -> None:
    assert render(template, {"x": value}) == value
    assert render([template], {"x": value}) == [value]
