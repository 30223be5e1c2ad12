"""Loading and validating workflow definitions: every problem with its file, line and field."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from services.workflow.errors import DefinitionError, DefinitionIssue
from services.workflow.expressions import compile_expression, render
from services.workflow.loader import execution_levels, load_definition, parse_definition
from services.workflow.model import (
    BUILTIN_AGENTS,
    FallbackSpec,
    LoopSpec,
    RetryPolicy,
    StepDef,
    WorkflowDef,
)

FIXTURES = Path(__file__).parent / "fixtures" / "definitions"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def issues(text: str, **options: str) -> list[tuple[int, str, str]]:
    """(line, field, message) of every issue of a definition that must be invalid."""
    with pytest.raises(DefinitionError) as caught:
        parse_definition(textwrap.dedent(text), source="wf.yaml", **options)
    assert {issue.file for issue in caught.value.issues} == {"wf.yaml"}
    return [(issue.line, issue.field, issue.message) for issue in caught.value.issues]


def where(text: str) -> list[tuple[int, str]]:
    """(line, field) of every issue."""
    return [(line, field) for line, field, _ in issues(text)]


def only_issue(text: str) -> tuple[int, str, str]:
    found = issues(text)
    assert len(found) == 1, found
    return found[0]


# --- good definitions --------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda path: path.name)
def test_every_example_loads(path: Path) -> None:
    definition = load_definition(path)
    assert definition.name == path.stem
    assert definition.source == str(path)
    assert definition.format == "yaml"
    assert execution_levels(definition)


def test_examples_cover_every_pattern() -> None:
    steps = [step for path in EXAMPLES.glob("*.yaml") for step in load_definition(path).steps]
    assert any(step.when for step in steps)
    assert any(step.loop for step in steps)
    assert any(step.for_each for step in steps)
    assert any(step.fallback for step in steps)
    assert any(not step.critical for step in steps)
    assert any(step.agent == "flaky" and step.retry.max_attempts > 1 for step in steps)
    assert any(len(step.depends_on) > 1 for step in steps)


def test_order_pipeline_is_read_field_by_field() -> None:
    path = EXAMPLES / "order-pipeline.yaml"
    text = path.read_text()
    definition = load_definition(path)
    assert definition.digest == hashlib.sha256(text.encode()).hexdigest()
    assert definition.body == text
    assert definition.inputs == {"mode": "full", "items": [1, 2, 3]}
    assert definition.max_parallel == 4
    fetch, check, each, poll = definition.steps
    assert fetch.with_ == {"argv": ["python3", "-c", "print('{\"n\": 3}')"]}
    assert check == StepDef(
        id="check",
        agent="echo",
        with_={"value": "${{ steps.fetch.output.n }}"},
        depends_on=("fetch",),
        when="inputs.mode == 'full'",
        retry=RetryPolicy(max_attempts=3, initial_delay=0.2, backoff=2.0, max_delay=5.0),
        timeout=10.0,
        fallback=(FallbackSpec(agent="echo", with_={"value": "degraded"}),),
        critical=False,
        cache_ttl=3600.0,
    )
    assert each.for_each == "${{ inputs.items }}"
    assert poll.loop == LoopSpec(until="iteration >= 3", max_iterations=5)
    assert execution_levels(definition) == [["fetch"], ["check", "poll"], ["each"]]


def test_example_templates_render_against_a_run_scope() -> None:
    definition = load_definition(EXAMPLES / "order-pipeline.yaml")
    scope = {
        "inputs": definition.inputs,
        "steps": {"fetch": {"output": {"n": 3}, "status": "succeeded"}},
        "run": {"id": "r1", "workflow": definition.name},
    }
    check = definition.step("check")
    assert check.when is not None
    assert compile_expression(check.when).evaluate(scope) is True
    assert render(check.with_, scope) == {"value": 3}
    each = definition.step("each")
    assert each.for_each is not None
    assert render(each.for_each, scope) == [1, 2, 3]
    assert compile_expression(each.for_each).evaluate(scope) == [1, 2, 3]


def test_json_definition_with_tabs_and_every_field() -> None:
    definition = load_definition(FIXTURES / "good_all_fields.json")
    assert definition.format == "json"
    assert definition.max_parallel == 2
    first, each, again = definition.steps
    assert first.queue == "fast"
    assert each.depends_on == ("first",)
    assert each.for_each == "inputs.items"  # kept as written, as when is
    assert each.when == "true"
    assert each.retry == RetryPolicy(max_attempts=2)
    assert each.timeout == 1.5
    assert each.fallback == (FallbackSpec(agent="noop", timeout=0.5),)
    assert (each.critical, each.cache_ttl) == (False, 60.0)
    assert again.loop == LoopSpec(until="${{ output == iteration }}", max_iterations=3)
    assert again.retry == RetryPolicy(
        max_attempts=4,
        initial_delay=0.0,
        backoff=1.0,
        max_delay=0.5,
        jitter=0.0,
        non_retryable=("AgentInputError",),
    )


def test_format_is_sniffed_or_given() -> None:
    text = '{"name": "j", "steps": [{"id": "a", "agent": "noop"}]}'
    assert parse_definition(text).format == "json"
    assert parse_definition(text, format="yaml").format == "yaml"
    assert parse_definition("name: y\nsteps: [{id: a, agent: noop}]").format == "yaml"
    assert parse_definition("{name: y, steps: [{id: a, agent: noop}]}").format == "yaml"
    assert parse_definition("name: y\nsteps: [{id: a, agent: noop}]", format="yml").format == "yaml"


def test_accepted_shorthands_and_yaml_merge_keys() -> None:
    definition = parse_definition(
        textwrap.dedent(
            """\
            name: shapes
            steps:
              - &base {id: a, agent: noop, when: false, retry: {max_attempts: 2, non_retryable: E}}
              - <<: *base
                id: b
                depends_on: a
                retry: 5
              - <<: *base
                id: c
                depends_on: [a, b]
                for_each: inputs.things
                when: "${{ inputs.go }}"
            """
        )
    )
    a, b, c = definition.steps
    assert a.when == "false"
    assert a.retry == RetryPolicy(max_attempts=2, non_retryable=("E",))
    assert (b.agent, b.depends_on, b.retry) == ("noop", ("a",), RetryPolicy(max_attempts=5))
    assert c.depends_on == ("a", "b")
    assert c.for_each == "inputs.things"
    assert c.when == "${{ inputs.go }}"


def test_an_aliased_mapping_with_a_merge_key_is_read_once() -> None:
    definition = parse_definition(
        textwrap.dedent(
            """\
            name: shared
            inputs:
              base: &base {a: 1, b: 2}
              merged: &merged {<<: *base, b: 3}
              again: *merged
            steps: [{id: a, agent: noop}]
            """
        )
    )
    assert definition.inputs["merged"] == {"a": 1, "b": 3}
    assert definition.inputs["again"] == {"a": 1, "b": 3}


def test_custom_agent_names() -> None:
    text = "name: c\nsteps: [{id: a, agent: mine, fallback: [{agent: other}]}]"
    assert parse_definition(text, agents={"mine", "other"}).steps[0].agent == "mine"
    with pytest.raises(DefinitionError, match="unknown agent 'mine'"):
        parse_definition(text)


def test_builtin_agent_names() -> None:
    assert frozenset({"noop", "echo", "sleep", "flaky", "shell", "python", "http", "llm"}) == (
        BUILTIN_AGENTS
    )


def test_transitive_dependencies_may_be_referenced() -> None:
    definition = parse_definition(
        textwrap.dedent(
            """\
            name: chain
            steps:
              - {id: a, agent: echo, with: {value: 1}}
              - {id: b, agent: echo, depends_on: a, with: {value: "${{ steps.a.output }}"}}
              - id: c
                agent: echo
                depends_on: b
                when: "steps.a.status == 'succeeded'"
                with: {value: "${{ steps['a'].output + steps.b.output }}"}
            """
        )
    )
    assert [step.id for step in definition.steps] == ["a", "b", "c"]


# --- execution levels --------------------------------------------------------------------


def test_execution_levels_are_topological_and_stable() -> None:
    definition = parse_definition(
        textwrap.dedent(
            """\
            name: diamond
            steps:
              - {id: join, agent: noop, depends_on: [right, left]}
              - {id: right, agent: noop, depends_on: root}
              - {id: lonely, agent: noop}
              - {id: left, agent: noop, depends_on: [root, root2]}
              - {id: root, agent: noop}
              - {id: root2, agent: noop, depends_on: root}
            """
        )
    )
    assert execution_levels(definition) == [
        ["lonely", "root"],
        ["right", "root2"],
        ["left"],
        ["join"],
    ]


def test_execution_levels_refuse_a_cycle_built_by_hand() -> None:
    definition = WorkflowDef(
        name="hand",
        steps=(
            StepDef(id="a", agent="noop", depends_on=("b",)),
            StepDef(id="b", agent="noop", depends_on=("a",)),
            StepDef(id="c", agent="noop"),
        ),
    )
    with pytest.raises(DefinitionError, match="dependency cycle among a, b"):
        execution_levels(definition)
    unknown = WorkflowDef(name="u", steps=(StepDef(id="a", agent="noop", depends_on=("z",)),))
    with pytest.raises(DefinitionError, match="unknown step 'z'"):
        execution_levels(unknown)


# --- syntax -------------------------------------------------------------------------------


def test_yaml_syntax_error_has_its_line() -> None:
    with pytest.raises(DefinitionError) as caught:
        load_definition(FIXTURES / "bad_syntax.yaml")
    (issue,) = caught.value.issues
    assert issue.file.endswith("bad_syntax.yaml")
    assert issue.line == 5
    assert issue.field == ""
    assert issue.message.startswith("YAML syntax error")


def test_json_syntax_error_has_its_line() -> None:
    with pytest.raises(DefinitionError) as caught:
        load_definition(FIXTURES / "bad_syntax.json")
    (issue,) = caught.value.issues
    assert (issue.line, issue.field) == (4, "")
    assert issue.message.startswith("JSON syntax error")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the definition is empty"),
        ("# only a comment\n", "the definition is empty"),
        ("- a\n- b\n", "expected a mapping, got a list"),
        ("a: 1\n---\nb: 2\n", "YAML syntax error"),
    ],
)
def test_documents_that_are_not_one_mapping(text: str, message: str) -> None:
    (_, _, found) = only_issue(text)
    assert message in found


def test_unsupported_format_and_file_problems(tmp_path: Path) -> None:
    with pytest.raises(DefinitionError, match="unsupported format 'toml'"):
        parse_definition("name: x", format="toml")
    toml = tmp_path / "wf.toml"
    toml.write_text("name = 'x'")
    with pytest.raises(DefinitionError, match=r"wf\.toml: expected a \.yaml, \.yml or \.json"):
        load_definition(toml)
    with pytest.raises(DefinitionError, match="cannot read"):
        load_definition(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"name: \xff\xfe")
    with pytest.raises(DefinitionError, match="cannot read"):
        load_definition(binary)


# --- structure: unknown keys, missing keys, types ----------------------------------------


def test_unknown_keys_at_every_level() -> None:
    found = issues(
        """\
        name: x
        title: nope
        steps:
          - id: a
            agent: noop
            retries: 3
            retry: {max_attempt: 2}
            loop: {until: "true", max: 3}
            fallback: [{agent: echo, wiht: {}}]
        """
    )
    assert found == [
        (2, "title", "unknown key"),
        (6, "steps[0].retries", "unknown key (did you mean 'retry'?)"),
        (7, "steps[0].retry.max_attempt", "unknown key (did you mean 'max_attempts'?)"),
        (8, "steps[0].loop.max", "unknown key"),
        (9, "steps[0].fallback[0].wiht", "unknown key (did you mean 'with'?)"),
    ]


def test_missing_required_keys() -> None:
    assert where(
        """\
        description: no name, no steps
        """
    ) == [(1, "name"), (1, "steps")]
    found = issues(
        """\
        name: x
        steps:
          - agent: noop
          - id: b
            loop: {max_iterations: 2}
            fallback:
              - with: {value: 1}
        """
    )
    assert found == [
        (3, "steps[0].id", "missing required key 'id'"),
        (4, "steps[1].agent", "missing required key 'agent'"),
        (5, "steps[1].loop.until", "missing required key 'until'"),
        (7, "steps[1].fallback[0].agent", "missing required key 'agent'"),
    ]


def test_bad_types_in_json_carry_lines() -> None:
    with pytest.raises(DefinitionError) as caught:
        load_definition(FIXTURES / "bad_types.json")
    found = [(i.line, i.field, i.message) for i in caught.value.issues]
    assert found == [
        (2, "name", "expected a string, got integer 7"),
        (3, "max_parallel", "expected an integer, got string 'four'"),
        (8, "steps[0].timeout", "expected a number, got string '10s'"),
        (9, "steps[0].critical", "expected true or false, got string 'no'"),
        (10, "steps[0].with", "expected a mapping, got a list"),
        (11, "steps[0].retry.max_attempts", "expected an integer, got float 2.5"),
        (11, "steps[0].retry.jitter", "must be >= 0 and <= 1, got 2"),
        (13, "steps[1].depends_on", "expected a string, got integer 3"),
        (13, "steps[1].fallback", "expected a list, got a mapping"),
    ]


def test_more_bad_types() -> None:
    found = issues(
        """\
        name: ""
        inputs: [1, 2]
        steps:
          - id: "has space"
            agent: [echo]
          - id: b
            agent: echo
            depends_on: [a, {x: 1}]
            when: 3
            for_each: [1, 2]
            retry: "three"
            queue: 5
            cache_ttl: .nan
          - id: c
            agent: echo
            timeout: true
            with: {value: !!binary aGVsbG8=}
        """
    )
    assert [(line, field) for line, field, _ in found] == [
        (1, "name"),
        (2, "inputs"),
        (4, "steps[0].id"),
        (5, "steps[0].agent"),
        (8, "steps[1].depends_on[1]"),
        (8, "steps[1].depends_on[0]"),
        (9, "steps[1].when"),
        (10, "steps[1].for_each"),
        (11, "steps[1].retry"),
        (12, "steps[1].queue"),
        (13, "steps[1].cache_ttl"),
        (16, "steps[2].timeout"),
        (17, "steps[2].with.value"),
    ]
    messages = [message for _, _, message in found]
    assert messages[0] == "must not be empty"
    assert messages[2].startswith("must start with a letter")
    assert messages[4] == "expected a string, got a mapping"
    assert messages[5] == "unknown step 'a'"
    assert messages[6] == "expected an expression string, got integer 3"
    assert messages[8] == "expected a mapping, got string 'three'"
    assert messages[10] == "must be a finite number, got '.nan'"
    assert messages[11] == "expected a number, got boolean true"
    assert messages[12] == "unsupported YAML tag 'tag:yaml.org,2002:binary'"


@pytest.mark.parametrize(
    ("snippet", "field", "message"),
    [
        ("timeout: 0", "steps[0].timeout", "must be > 0, got 0"),
        ("timeout: -1.5", "steps[0].timeout", "must be > 0, got -1.5"),
        ("cache_ttl: 0", "steps[0].cache_ttl", "must be > 0, got 0"),
        ("retry: 0", "steps[0].retry", "must be > 0, got 0"),
        ("retry: {max_attempts: -1}", "steps[0].retry.max_attempts", "must be > 0, got -1"),
        ("retry: {initial_delay: -1}", "steps[0].retry.initial_delay", "must be >= 0, got -1"),
        ("retry: {backoff: 0.5}", "steps[0].retry.backoff", "must be >= 1, got 0.5"),
        ("loop: {until: 'true', max_iterations: 0}", "steps[0].loop.max_iterations", "> 0"),
        ("fallback: [{agent: echo, timeout: 0}]", "steps[0].fallback[0].timeout", "> 0, got 0"),
    ],
)
def test_non_positive_limits(snippet: str, field: str, message: str) -> None:
    line, found_field, found_message = only_issue(
        f"name: x\nsteps:\n  - id: a\n    agent: noop\n    {snippet}\n"
    )
    assert (line, found_field) == (5, field)
    assert message in found_message


def test_non_positive_max_parallel() -> None:
    assert only_issue("name: x\nmax_parallel: -2\nsteps: [{id: a, agent: noop}]\n") == (
        2,
        "max_parallel",
        "must be > 0, got -2",
    )
    assert only_issue("name: x\nsteps: []\n") == (2, "steps", "must list at least one step")
    assert only_issue("name: x\nsteps: {a: 1}\n")[2] == "expected a list, got a mapping"


def test_duplicate_mapping_keys() -> None:
    assert only_issue(
        """\
        name: x
        steps:
          - id: a
            agent: noop
            agent: echo
        """
    ) == (5, "steps[0].agent", "duplicate key (first on line 4)")


def test_recursive_alias_and_alias_bombs_are_reported_not_followed() -> None:
    (line, field, message) = only_issue(
        """\
        name: x
        steps:
          - id: a
            agent: echo
            with: &loop {value: [*loop]}
        """
    )
    assert (line, field) == (5, "steps[0].with.value[0]")
    assert "alias refers to a node that contains it" in message
    bomb = ["name: x", "l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(1, 8)]
    text = "\n".join(bomb).replace("l0:", "inputs:\n  l0:").replace("\nl", "\n  l")
    text += "\nsteps: [{id: a, agent: noop}]\n"
    assert [message for _, _, message in issues(text)] == [
        "more than 100000 values (alias expansion?)"
    ]


# --- the graph ----------------------------------------------------------------------------


def test_duplicate_step_ids() -> None:
    assert only_issue(
        """\
        name: x
        steps:
          - id: a
            agent: noop
          - id: b
            agent: noop
          - id: a
            agent: echo
        """
    ) == (7, "steps[2].id", "duplicate step id 'a' (first on line 3)")


def test_self_dependency_and_unknown_dependencies() -> None:
    found = issues(
        """\
        name: x
        steps:
          - id: fetch
            agent: noop
            depends_on: fetch
          - id: check
            agent: noop
            depends_on: [fetch, fecth, zzz, fetch]
        """
    )
    assert found == [
        (5, "steps[0].depends_on", "step 'fetch' depends on itself"),
        (8, "steps[1].depends_on[1]", "unknown step 'fecth' (did you mean 'fetch'?)"),
        (8, "steps[1].depends_on[2]", "unknown step 'zzz'"),
        (8, "steps[1].depends_on[3]", "'fetch' is listed twice"),
    ]


def test_cycles_are_named_with_their_path() -> None:
    found = issues(
        """\
        name: x
        steps:
          - {id: start, agent: noop}
          - id: a
            agent: noop
            depends_on: [start, c]
          - id: b
            agent: noop
            depends_on: a
          - id: c
            agent: noop
            depends_on:
              - b
          - {id: x, agent: noop, depends_on: y}
          - {id: y, agent: noop, depends_on: x}
        """
    )
    assert found == [
        (9, "steps[2].depends_on", "dependency cycle: a -> c -> b -> a"),
        (15, "steps[5].depends_on", "dependency cycle: x -> y -> x"),
    ]


def test_unknown_agents_also_in_fallbacks() -> None:
    found = issues(
        """\
        name: x
        steps:
          - id: a
            agent: shel
            fallback:
              - agent: echo
              - agent: gpt
        """
    )
    assert found[0] == (4, "steps[0].agent", "unknown agent 'shel' (did you mean 'shell'?)")
    assert found[1][:2] == (7, "steps[0].fallback[1].agent")
    assert found[1][2].startswith("unknown agent 'gpt' (known: echo, flaky, http, llm, noop")


def test_for_each_with_loop_is_refused() -> None:
    assert only_issue(
        """\
        name: x
        steps:
          - id: a
            agent: echo
            for_each: "${{ inputs.items }}"
            loop: {until: "iteration > 2"}
        """
    ) == (6, "steps[0].loop", "a step cannot have both for_each and loop")


# --- expressions ---------------------------------------------------------------------------


def test_bad_expressions_in_every_place() -> None:
    found = issues(
        """\
        name: x
        steps:
          - id: a
            agent: echo
            when: "inputs.mode == "
            for_each: "${{ [x for x in inputs.items] }}"
            with:
              value: "${{ 1 + }}"
              nested:
                list: ["ok", "${{ inputs.__class__ }}", "unterminated ${{ inputs.a"]
            fallback:
              - agent: echo
                with: {value: "${{ eval('1') }}"}
          - id: b
            agent: echo
            loop: {until: "output.done and"}
            for_each: "items: ${{ inputs.items }}"
        """
    )
    assert [(line, field) for line, field, _ in found] == [
        (5, "steps[0].when"),
        (6, "steps[0].for_each"),
        (8, "steps[0].with.value"),
        (10, "steps[0].with.nested.list[2]"),
        (10, "steps[0].with.nested.list[1]"),
        (13, "steps[0].fallback[0].with.value"),
        (16, "steps[1].loop"),
        (16, "steps[1].loop.until"),
        (17, "steps[1].for_each"),
    ]
    messages = [message for _, _, message in found]
    assert messages[0].startswith("syntax error")
    assert messages[1].startswith("ListComp is not allowed")
    assert "unterminated template" in messages[3]
    assert "field '__class__' is not allowed" in messages[4]
    assert messages[5].startswith("only these functions may be called")
    assert messages[6] == "a step cannot have both for_each and loop"
    assert messages[8].startswith("expected an expression or one whole ${{ }} template")


def test_names_must_be_in_scope_where_they_are_used() -> None:
    found = issues(
        """\
        name: x
        steps:
          - id: a
            agent: echo
            when: "item > 1"
            with: {value: "${{ item }} ${{ iteration }} ${{ output }} ${{ run.id }}"}
          - id: b
            agent: echo
            for_each: "${{ item }}"
            with: {value: "${{ item }}"}
          - id: c
            agent: echo
            loop: {until: "output == iteration and item"}
            with: {value: "${{ iteration }}"}
        """
    )
    assert [(line, message.split(" in ")[0]) for line, _, message in found] == [
        (5, "unknown name 'item'"),
        (6, "unknown name 'item'"),
        (6, "unknown name 'iteration'"),
        (6, "unknown name 'output'"),
        (9, "unknown name 'item'"),
        (13, "unknown name 'item'"),
    ]
    assert found[0][2].endswith("(available here: inputs, run, steps)")
    assert found[5][2].endswith("(available here: inputs, iteration, output, run, steps)")


def test_step_references_must_be_dependencies() -> None:
    found = issues(
        """\
        name: x
        steps:
          - {id: fetch, agent: echo, with: {value: 1}}
          - {id: other, agent: echo, with: {value: 2}}
          - id: check
            agent: echo
            depends_on: fetch
            when: "steps.other.status == 'succeeded'"
            with:
              ok: "${{ steps.fetch.output }}"
              later: "${{ steps.after.output }}"
              nope: "${{ steps.nope.output }}"
              own: "${{ steps.check.output }}"
              field: "${{ steps.fetch.result }}"
          - {id: after, agent: echo, depends_on: check, with: {value: 3}}
        """
    )
    assert found == [
        (8, "steps[2].when", "step 'other' is not a dependency of 'check'; add it to depends_on"),
        (
            11,
            "steps[2].with.later",
            "step 'after' is not a dependency of 'check'; add it to depends_on",
        ),
        (12, "steps[2].with.nope", "unknown step 'nope' in 'steps.nope.output'"),
        (
            13,
            "steps[2].with.own",
            "step 'check' cannot read its own result (loop.until has 'output')",
        ),
        (14, "steps[2].with.field", "steps.fetch has only 'output' and 'status', not 'result'"),
    ]


# --- reporting ----------------------------------------------------------------------------


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(DefinitionError) as caught:
        load_definition(FIXTURES / "bad_many.yaml")
    found = [(issue.line, issue.field) for issue in caught.value.issues]
    assert found == [
        (3, "max_parallel"),
        (8, "steps[0].retires"),
        (9, "steps[1].id"),
        (12, "steps[2].agent"),
        (13, "steps[2].depends_on[1]"),
        (13, "steps[2].depends_on[2]"),
        (14, "steps[2].when"),
        (18, "steps[3].loop"),
        (18, "steps[3].loop.max_iterations"),
        (20, "steps[3].with.value"),
        (21, "steps[3].timeout"),
        (23, "steps[3].fallback[0].agent"),
        (24, "steps[3].fallback[0].with.value"),
        (25, "steps[3].fallback[0].timeout"),
        (31, "steps[5].depends_on"),
        (38, "steps[6].with.nested[1]"),
    ]
    cycle = caught.value.issues[-2].message
    assert cycle == "dependency cycle: ring_a -> ring_c -> ring_b -> ring_a"


def test_error_text_lists_file_line_field_and_message() -> None:
    with pytest.raises(DefinitionError) as caught:
        parse_definition("name: x\nsteps:\n  - {id: a, agent: bad}\n  - {id: b}\n", source="f.yml")
    assert str(caught.value).splitlines() == [
        "f.yml:3: steps[0].agent: unknown agent 'bad'"
        " (known: echo, flaky, http, llm, noop, python, shell, sleep)",
        "f.yml:4: steps[1].agent: missing required key 'agent'",
    ]
    assert str(DefinitionIssue("f.yml", 0, "", "whole file")) == "f.yml: whole file"
