"""Safe expressions and ``${{ expr }}`` templates of workflow definitions.

An expression is parsed with :func:`ast.parse` and a whitelist of node kinds is turned into a
tree of small closures; user text is never handed to ``eval``, ``exec`` or ``compile``.

The language:

* literals: strings, integers, floats, ``true``/``false``/``null`` (also ``True``/``False``/
  ``None``), lists ``[..]`` (a tuple ``(a, b)`` is a list too) and dicts ``{'k': v}``;
* names bound in the scope; ``a.b`` and ``a['b']`` read a field of a dict, ``a[0]`` an element of
  a list (negative indexes count from the end). Nothing else has fields: ``'x'.upper`` fails;
  names and fields starting with ``__`` are rejected outright;
* comparisons ``== != < <= > >=`` (chainable), ``in`` / ``not in`` (element of a list, key of a
  dict, substring of a string), ``and`` / ``or`` / ``not`` (Python semantics: ``a or b`` gives
  ``a`` when it is truthy);
* arithmetic ``+ - * / %`` and unary ``-`` / ``+`` on numbers; ``+`` also joins two strings or
  two lists (no repetition of strings or lists by ``*``);
* functions ``len(x)``, ``int(x)``, ``float(x)``, ``str(x)`` (non-strings as JSON), ``lower(s)``,
  ``upper(s)``.

:func:`compile_expression` takes a bare expression (``inputs.mode == 'full'``) or one whole
template (``${{ inputs.items }}``). Templates are strings containing ``${{ expr }}`` (the
expression may not contain ``}}``): :func:`render` replaces a string that is exactly one
template by the expression's value, keeping its type, and interpolates templates embedded in
text as strings (JSON for anything but strings).

The scope the scheduler evaluates with at run time:

* ``inputs`` — the run's inputs (the definition's ``inputs`` overlaid by the submitted ones);
* ``steps`` — ``steps.<id>.output`` and ``steps.<id>.status`` of the step's (transitive)
  dependencies; a skipped dependency has output ``null``;
* ``run`` — ``run.id`` and ``run.workflow``;
* ``item`` — the current element, in ``with`` (and fallback ``with``) of a ``for_each`` step;
* ``iteration`` — the 1-based iteration, in ``with`` and ``loop.until`` of a ``loop`` step;
* ``output`` — the output of the iteration just finished, in ``loop.until``.

``when`` and ``for_each`` are evaluated once per step, before any unit runs, so ``item``,
``iteration`` and ``output`` are not in their scope. Every failure, at compile or evaluation
time, is an :class:`ExpressionError` naming the expression, the position and, for a missing
name or field, the path (``steps.fetch.output.n: no field 'n'``).
"""

from __future__ import annotations

import ast
import functools
import operator
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Final, final

import msgspec

from services.workflow.errors import ExpressionError

__all__ = [
    "FUNCTIONS",
    "Expression",
    "ExpressionError",
    "compile_expression",
    "render",
    "template_expressions",
]

_Fn = Callable[[Mapping[str, Any]], Any]
AccessPath = tuple[str | int, ...]

MAX_LENGTH: Final = 4096
MAX_DEPTH: Final = 64

_LITERAL_NAMES: Final[dict[str, Any]] = {
    "true": True,
    "false": False,
    "null": None,
    "True": True,
    "False": False,
    "None": None,
}
_TEMPLATE: Final = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)
_JSON: Final = msgspec.json.Encoder()


def _kind(value: Any) -> str:
    """The JSON-ish name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, Mapping):
        return "dict"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(value: Any) -> str:
    """A value as text: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    try:
        return _JSON.encode(value).decode()
    except (TypeError, msgspec.EncodeError) as exc:
        raise ValueError(f"cannot turn a {_kind(value)} into text: {exc}") from exc


def _typed(name: str, accepted: Any, function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``function`` refusing arguments that are not instances of ``accepted``."""

    def call(value: Any) -> Any:
        if isinstance(value, accepted):
            return function(value)
        raise TypeError(f"{name}() of a {_kind(value)}")

    return call


#: The functions an expression may call, each with one argument.
FUNCTIONS: Final[dict[str, Callable[[Any], Any]]] = {
    "len": _typed("len", str | list | tuple | Mapping, len),
    "int": _typed("int", str | int | float, int),
    "float": _typed("float", str | int | float, float),
    "str": _text,
    "lower": _typed("lower", str, str.lower),
    "upper": _typed("upper", str, str.upper),
}

_COMPARE: Final[dict[type[ast.cmpop], Callable[[Any, Any], bool]]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_ARITHMETIC: Final[dict[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
}


def _contains(container: Any, element: Any) -> bool:
    if isinstance(container, str):
        if not isinstance(element, str):
            raise TypeError(f"'in <string>' needs a string on the left, got a {_kind(element)}")
        return element in container
    if isinstance(container, list | tuple | Mapping):
        return element in container
    raise TypeError(f"'in' needs a list, dict or string on the right, got a {_kind(container)}")


def _arithmetic(op: type[ast.operator], left: Any, right: Any) -> Any:
    if _is_number(left) and _is_number(right):
        return _ARITHMETIC[op](left, right)
    joinable = isinstance(left, str) and isinstance(right, str)
    joinable = joinable or (isinstance(left, list) and isinstance(right, list))
    if op is ast.Add and joinable:
        return left + right
    raise TypeError(f"unsupported operand types: {_kind(left)} and {_kind(right)}")


@final
class Expression:
    """A compiled expression: evaluate it with :meth:`evaluate`.

    ``names`` are the scope names it reads; ``paths`` the static access paths of the values it
    reads, such as ``('steps', 'fetch', 'output', 'n')``: a path the expression only goes
    through to a longer one is not listed, and a value indexed with a computed key ends a path
    (``steps[inputs.which]`` reads ``('steps',)``, all of it).
    """

    __slots__ = ("_fn", "names", "paths", "source")

    def __init__(self, source: str, fn: _Fn, names: frozenset[str], paths: frozenset[AccessPath]):
        self.source = source
        self.names = names
        self.paths = paths
        self._fn = fn

    def evaluate(self, scope: Mapping[str, Any]) -> Any:
        """The value of the expression with ``scope``'s names bound."""
        return self._fn(scope)

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


class _Compiler:
    """Turns one parsed expression into closures, checking every node against the whitelist."""

    def __init__(self, source: str, text: str, lead: int) -> None:
        self.source = source
        self.text = text
        self.lead = lead
        self.names: set[str] = set()
        #: How many reads of each static path the expression makes, less the reads that
        #: only go through it to a longer static path.
        self.reads: Counter[AccessPath] = Counter()

    @property
    def paths(self) -> frozenset[AccessPath]:
        return frozenset(path for path, count in self.reads.items() if count > 0)

    def error(self, node: ast.AST, reason: str) -> ExpressionError:
        offset = getattr(node, "col_offset", 0)
        column = self.lead + len(self.text.encode()[:offset].decode(errors="ignore")) + 1
        return ExpressionError(reason, self.source, column)

    def guarded(self, node: ast.AST, fn: Callable[[Mapping[str, Any]], Any]) -> _Fn:
        """``fn`` with Python errors of its own work turned into :class:`ExpressionError`."""

        def run(scope: Mapping[str, Any]) -> Any:
            try:
                return fn(scope)
            except (TypeError, ValueError, ArithmeticError) as exc:
                raise self.error(node, str(exc)) from exc

        return run

    def build(self, node: ast.AST, depth: int = 0) -> _Fn:
        if depth > MAX_DEPTH:
            raise self.error(node, f"nested deeper than {MAX_DEPTH} levels")
        method = getattr(self, f"build_{type(node).__name__}", None)
        if method is None:
            raise self.error(node, f"{type(node).__name__} is not allowed in expressions")
        fn: _Fn = method(node, depth + 1)
        return fn

    def build_Constant(self, node: ast.Constant, depth: int) -> _Fn:
        value = node.value
        if value is not None and not isinstance(value, str | int | float | bool):
            raise self.error(node, f"literal {value!r} is not allowed")
        return lambda scope: value

    def build_Name(self, node: ast.Name, depth: int) -> _Fn:
        name = node.id
        if name in _LITERAL_NAMES:
            literal = _LITERAL_NAMES[name]
            return lambda scope: literal
        if name.startswith("__"):
            raise self.error(node, f"name {name!r} is not allowed")
        self.names.add(name)
        self.reads[(name,)] += 1

        def lookup(scope: Mapping[str, Any]) -> Any:
            try:
                return scope[name]
            except KeyError:
                known = ", ".join(sorted(scope)) or "nothing"
                raise self.error(node, f"{name}: unknown name (in scope: {known})") from None

        return lookup

    def access(self, node: ast.AST, container: _Fn, key: _Fn, label: str) -> _Fn:
        def get(scope: Mapping[str, Any]) -> Any:
            value = container(scope)
            k = key(scope)
            if isinstance(value, Mapping):
                try:
                    return value[k]
                except KeyError:
                    raise self.error(node, f"{label}: no field {k!r}") from None
                except TypeError:
                    raise self.error(node, f"{label}: bad key {k!r}") from None
            if isinstance(value, list | tuple) and isinstance(k, int) and not isinstance(k, bool):
                try:
                    return value[k]
                except IndexError:
                    msg = f"{label}: index {k} out of range (length {len(value)})"
                    raise self.error(node, msg) from None
            raise self.error(node, f"{label}: cannot take {k!r} of a {_kind(value)}")

        return get

    def record_path(self, node: ast.Attribute | ast.Subscript) -> None:
        path = _static_path(node)
        if path is not None:
            self.reads[path] += 1
            self.reads[path[:-1]] -= 1

    def build_Attribute(self, node: ast.Attribute, depth: int) -> _Fn:
        if node.attr.startswith("__"):
            raise self.error(node, f"field {node.attr!r} is not allowed")
        container = self.build(node.value, depth)
        attr = node.attr
        self.record_path(node)
        return self.access(node, container, lambda scope: attr, ast.unparse(node))

    def build_Subscript(self, node: ast.Subscript, depth: int) -> _Fn:
        if isinstance(node.slice, ast.Slice):
            raise self.error(node, "slices are not allowed in expressions")
        if isinstance(node.slice, ast.Constant) and str(node.slice.value).startswith("__"):
            raise self.error(node, f"field {node.slice.value!r} is not allowed")
        container = self.build(node.value, depth)
        key = self.build(node.slice, depth)
        self.record_path(node)
        return self.access(node, container, key, ast.unparse(node))

    def build_List(self, node: ast.List | ast.Tuple, depth: int) -> _Fn:
        items = [self.build(element, depth) for element in node.elts]
        return lambda scope: [item(scope) for item in items]

    build_Tuple = build_List

    def build_Dict(self, node: ast.Dict, depth: int) -> _Fn:
        if any(key is None for key in node.keys):
            raise self.error(node, "'**' is not allowed in expressions")
        pairs = [
            (self.build(key, depth), self.build(value, depth))
            for key, value in zip(node.keys, node.values, strict=True)
            if key is not None
        ]
        return self.guarded(node, lambda scope: {k(scope): v(scope) for k, v in pairs})

    def build_Compare(self, node: ast.Compare, depth: int) -> _Fn:
        left = self.build(node.left, depth)
        steps: list[tuple[Callable[[Any, Any], bool], _Fn]] = []
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = self.build(comparator, depth)
            if isinstance(op, ast.In):
                steps.append((lambda a, b: _contains(b, a), right))
            elif isinstance(op, ast.NotIn):
                steps.append((lambda a, b: not _contains(b, a), right))
            elif type(op) in _COMPARE:
                steps.append((_COMPARE[type(op)], right))
            else:
                raise self.error(node, f"comparison {type(op).__name__} is not allowed")

        def compare(scope: Mapping[str, Any]) -> bool:
            current = left(scope)
            for check, right_fn in steps:
                following = right_fn(scope)
                if not check(current, following):
                    return False
                current = following
            return True

        return self.guarded(node, compare)

    def build_BoolOp(self, node: ast.BoolOp, depth: int) -> _Fn:
        operands = [self.build(value, depth) for value in node.values]
        is_and = isinstance(node.op, ast.And)

        def boolean(scope: Mapping[str, Any]) -> Any:
            value: Any = None
            for operand in operands:
                value = operand(scope)
                if bool(value) is not is_and:
                    return value
            return value

        return boolean

    def build_UnaryOp(self, node: ast.UnaryOp, depth: int) -> _Fn:
        operand = self.build(node.operand, depth)
        if isinstance(node.op, ast.Not):
            return lambda scope: not operand(scope)
        if not isinstance(node.op, ast.USub | ast.UAdd):
            raise self.error(node, f"operator {type(node.op).__name__} is not allowed")
        sign = -1 if isinstance(node.op, ast.USub) else 1

        def signed(scope: Mapping[str, Any]) -> Any:
            value = operand(scope)
            if not _is_number(value):
                raise TypeError(f"unary minus or plus of a {_kind(value)}")
            return sign * value

        return self.guarded(node, signed)

    def build_BinOp(self, node: ast.BinOp, depth: int) -> _Fn:
        op = type(node.op)
        if op not in _ARITHMETIC:
            raise self.error(node, f"operator {op.__name__} is not allowed")
        left = self.build(node.left, depth)
        right = self.build(node.right, depth)
        return self.guarded(node, lambda scope: _arithmetic(op, left(scope), right(scope)))

    def build_Call(self, node: ast.Call, depth: int) -> _Fn:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            allowed = ", ".join(FUNCTIONS)
            raise self.error(node, f"only these functions may be called: {allowed}")
        if node.keywords or len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
            raise self.error(node, f"{node.func.id}() takes exactly one argument")
        function = FUNCTIONS[node.func.id]
        argument = self.build(node.args[0], depth)
        return self.guarded(node, lambda scope: function(argument(scope)))


def _static_path(node: ast.AST) -> AccessPath | None:
    """``a.b[0]['c']`` -> ``('a', 'b', 0, 'c')``; None when some index is not a literal."""
    if isinstance(node, ast.Name):
        return None if node.id in _LITERAL_NAMES else (node.id,)
    if isinstance(node, ast.Attribute):
        parent = _static_path(node.value)
        return None if parent is None else (*parent, node.attr)
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        key = node.slice.value
        parent = _static_path(node.value)
        if parent is None or not isinstance(key, str | int) or isinstance(key, bool):
            return None
        return (*parent, key)
    return None


def _split(text: str) -> tuple[list[str], list[str]]:
    """``text`` split into its literal parts and template sources (one more literal than source).

    Raises :class:`ExpressionError` for a ``${{`` without its ``}}``.
    """
    literals: list[str] = []
    sources: list[str] = []
    position = 0
    for match in _TEMPLATE.finditer(text):
        literals.append(text[position : match.start()])
        sources.append(match.group(1))
        position = match.end()
    rest = text[position:]
    if "${{" in rest:
        raise ExpressionError("unterminated template: '${{' without '}}'", rest)
    literals.append(rest)
    return literals, sources


@functools.lru_cache(maxsize=4096)
def _compile(source: str) -> Expression:
    inner = source
    if "${{" in source:
        literals, sources = _split(source)
        if len(sources) != 1 or "".join(literals).strip():
            reason = "expected an expression or one whole ${{ }} template, not text with templates"
            raise ExpressionError(reason, source)
        inner = sources[0]
    if len(inner) > MAX_LENGTH:
        raise ExpressionError(f"longer than {MAX_LENGTH} characters", inner[:80] + "...")
    stripped = inner.strip()
    if not stripped:
        raise ExpressionError("empty expression", inner)
    lead = len(inner) - len(inner.lstrip())
    text = stripped.replace("\r", " ").replace("\n", " ")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ExpressionError(f"syntax error: {exc.msg}", inner, lead + (exc.offset or 1)) from None
    except (RecursionError, MemoryError):
        raise ExpressionError(f"nested deeper than {MAX_DEPTH} levels", inner) from None
    compiler = _Compiler(inner, text, lead)
    fn = compiler.build(tree.body)
    return Expression(inner, fn, frozenset(compiler.names), compiler.paths)


def compile_expression(source: str) -> Expression:
    """Parse and check ``source`` once (compiled expressions are cached).

    ``source`` is a bare expression or one whole ``${{ expr }}`` template. Raises
    :class:`ExpressionError` for syntax errors and anything outside the language.
    """
    return _compile(source)


@functools.lru_cache(maxsize=4096)
def _template(text: str) -> Expression | tuple[Expression | str, ...]:
    """The expression ``text`` consists of, or its literal parts and expressions in order."""
    literals, sources = _split(text)
    if literals == ["", ""]:
        return _compile(sources[0])
    parts: list[Expression | str] = [literals[0]]
    for source, literal in zip(sources, literals[1:], strict=True):
        parts += [_compile(source), literal]
    return tuple(part for part in parts if part != "")


def render(value: Any, scope: Mapping[str, Any]) -> Any:
    """``value`` with every ``${{ expr }}`` in its strings evaluated against ``scope``.

    Dict values and lists are walked (keys are kept as they are; tuples come back as lists); a
    string that is exactly one template becomes the expression's value; templates inside text
    are interpolated as text.
    """
    if isinstance(value, str):
        if "${{" not in value:
            return value
        compiled = _template(value)
        if isinstance(compiled, Expression):
            return compiled.evaluate(scope)
        pieces: list[str] = []
        for part in compiled:
            if isinstance(part, str):
                pieces.append(part)
                continue
            try:
                pieces.append(_text(part.evaluate(scope)))
            except ValueError as exc:
                raise ExpressionError(str(exc), part.source) from exc
        return "".join(pieces)
    if isinstance(value, Mapping):
        return {key: render(item, scope) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [render(item, scope) for item in value]
    return value


def template_expressions(value: Any) -> list[str]:
    """The source of every expression in the templates inside ``value``, in order (stripped).

    Raises :class:`ExpressionError` for a ``${{`` without its ``}}``.
    """
    if isinstance(value, str):
        return [source.strip() for source in _split(value)[1]] if "${{" in value else []
    if isinstance(value, Mapping):
        return [source for item in value.values() for source in template_expressions(item)]
    if isinstance(value, list | tuple):
        return [source for item in value for source in template_expressions(item)]
    return []
