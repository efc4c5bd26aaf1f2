"""``--where EXPR``: an operator's SQL filter, validated by a real PostgreSQL parser (pglast).

:func:`parse_filter` (pure, no database) parses the text as the WHERE clause of
``SELECT FROM t WHERE <text>`` and accepts it only when that gives one plain SELECT with nothing
but the WHERE clause, and every node of the expression is on an allow-list (default deny):
unqualified references to the table's own columns, constants, casts, operators, AND/OR/NOT,
NULL and boolean tests, CASE, COALESCE/NULLIF/GREATEST/LEAST, array constructors, SQL value
functions (CURRENT_DATE ...) and plain function calls. What runs is :attr:`Filter.sql`, the
expression re-rendered by pglast from the validated tree, never the operator's text.

:func:`check_volatility` then asks the database about the functions the filter calls: a volatile
one (``random()``, ``nextval()``, ``set_config()``, ``pg_sleep()`` ...) would select different rows
at each batch or act on its own, and an aggregate, a window function, a set-returning function
(``generate_series()``) or an unknown name cannot run in a WHERE clause; immutable and stable ones
(``now()``, ``lower()``) are accepted.

Every refusal is a :class:`~engine.errors.UsageError` with one line, ``--where: <problem>: <part>``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from pglast import ast
from pglast.enums.parsenodes import A_Expr_Kind
from pglast.parser import ParseError, parse_sql, scan
from pglast.stream import RawStream

from engine.db import Connection
from engine.errors import UsageError

_PREFIX = "SELECT FROM t WHERE "
_QUOTE_MAX = 60

_ALLOWED_A_EXPR = frozenset({  # the operator forms; their operands are checked on their own
    A_Expr_Kind.AEXPR_OP, A_Expr_Kind.AEXPR_OP_ANY, A_Expr_Kind.AEXPR_OP_ALL, A_Expr_Kind.AEXPR_DISTINCT,
    A_Expr_Kind.AEXPR_NOT_DISTINCT, A_Expr_Kind.AEXPR_NULLIF, A_Expr_Kind.AEXPR_IN, A_Expr_Kind.AEXPR_LIKE,
    A_Expr_Kind.AEXPR_ILIKE, A_Expr_Kind.AEXPR_SIMILAR, A_Expr_Kind.AEXPR_BETWEEN,
    A_Expr_Kind.AEXPR_NOT_BETWEEN, A_Expr_Kind.AEXPR_BETWEEN_SYM, A_Expr_Kind.AEXPR_NOT_BETWEEN_SYM,
})

# Aggregates and window functions by name (pg_catalog's, unqualified or qualified): a WHERE clause
# cannot hold them, and refusing them here says so without a database. check_volatility also refuses
# any function whose pg_proc.prokind is not 'f'.
_AGGREGATES = frozenset({
    "array_agg", "avg", "bit_and", "bit_or", "bit_xor", "bool_and", "bool_or", "count", "corr",
    "covar_pop", "covar_samp", "cume_dist", "dense_rank", "every", "first_value", "json_agg",
    "json_object_agg", "jsonb_agg", "jsonb_object_agg", "lag", "last_value", "lead", "max", "min",
    "mode", "nth_value", "ntile", "percent_rank", "percentile_cont", "percentile_disc", "range_agg",
    "range_intersect_agg", "rank", "regr_avgx", "regr_avgy", "regr_count", "regr_intercept",
    "regr_r2", "regr_slope", "regr_sxx", "regr_sxy", "regr_syy", "row_number", "stddev",
    "stddev_pop", "stddev_samp", "string_agg", "sum", "var_pop", "var_samp", "variance", "xmlagg",
})

# The parts of a SELECT that a filter must leave as they are, named for the message.
_CLAUSES = {
    "distinctClause": "DISTINCT", "intoClause": "INTO", "targetList": "a select list",
    "fromClause": "FROM", "groupClause": "GROUP BY", "groupDistinct": "GROUP BY DISTINCT",
    "havingClause": "HAVING", "windowClause": "WINDOW", "valuesLists": "VALUES",
    "sortClause": "ORDER BY", "limitOffset": "OFFSET", "limitCount": "LIMIT",
    "limitOption": "FETCH ... WITH TIES", "lockingClause": "FOR UPDATE/SHARE", "withClause": "WITH",
    "op": "UNION/INTERSECT/EXCEPT", "all": "UNION/INTERSECT/EXCEPT ALL", "larg": "UNION/INTERSECT/EXCEPT",
    "rarg": "UNION/INTERSECT/EXCEPT",
}

# Friendlier names of some refused nodes; any other is named by its parse-node type.
_NODE_NAMES = {
    "A_Indirection": "a subscript or field selection", "RowExpr": "a row constructor",
    "CollateClause": "COLLATE", "GroupingFunc": "GROUPING", "A_Star": "'*'",
}


@dataclass(frozen=True)
class Filter:
    """A validated ``--where`` filter."""

    text: str  # the operator's text, as given (for the run record and `msggc status`)
    sql: str  # the expression re-rendered by pglast from the validated tree, in parentheses: what runs
    columns: frozenset[str]  # the table columns it reads
    functions: frozenset[str]  # the function names it calls, qualified as written, lower-case


def _refuse(problem: str, part: str | None = None) -> UsageError:
    return UsageError(f"--where: {problem}" + (f": {_clip(part)}" if part is not None else ""))


def _clip(part: str) -> str:
    part = " ".join(part.split())
    return part if len(part) <= _QUOTE_MAX else part[: _QUOTE_MAX - 3] + "..."


def _render(node: ast.Node) -> str:
    try:
        return str(RawStream()(node))
    except Exception:  # a node the printer cannot render on its own: name it instead
        return type(node).__name__


def _names(strings: Iterable[ast.Node] | None) -> list[str] | None:
    """The parts of a dotted name (a tuple of String nodes), or None when a part is no String."""
    parts = []
    for part in strings or ():
        if not isinstance(part, ast.String) or part.sval is None:
            return None
        parts.append(part.sval)
    return parts


def _syntax_error(exc: ParseError, shift: int) -> UsageError:
    """The parser's message, its position (given after ``shift`` characters of prefix) in the text."""
    message, *rest = exc.args or (str(exc),)
    where = f" (at character {rest[0] - shift + 1})" if rest and isinstance(rest[0], int) else ""
    message = str(message) if str(message).startswith("syntax error") else f"syntax error: {message}"
    return _refuse(f"{message}{where}")


def _check_tokens(text: str) -> None:
    """Refuse what the parse tree would hide: comments, a ';', parentheses that close the WHERE."""
    try:
        tokens = scan(text)
    except ParseError as exc:
        raise _syntax_error(exc, 0) from None
    depth = 0
    for token in tokens:  # offsets are in characters, the end inclusive
        if token.name in ("SQL_COMMENT", "C_COMMENT"):
            raise _refuse("comments are not allowed", text[token.start : token.end + 1])
        if token.name == "ASCII_59":  # ;
            raise _refuse("only one expression is allowed, ';' is not", text)
        if token.name == "ASCII_40":  # (
            depth += 1
        elif token.name == "ASCII_41":  # )
            depth -= 1
            if depth < 0:
                raise _refuse("unbalanced parentheses", text)
    if depth:
        raise _refuse("unbalanced parentheses", text)


def _where_clause(text: str) -> ast.Node:
    try:
        statements = parse_sql(_PREFIX + text)
    except ParseError as exc:
        raise _syntax_error(exc, len(_PREFIX)) from None
    if len(statements) != 1:
        raise _refuse("only one expression is allowed, not several statements", text)
    stmt = statements[0].stmt
    if not isinstance(stmt, ast.SelectStmt):
        raise _refuse("not an expression", text)
    baseline = parse_sql(_PREFIX + "true")[0].stmt
    for attr in sorted(stmt, key=lambda attr: attr != "op"):  # a set operation first: it moves the rest
        if attr != "whereClause" and getattr(stmt, attr) != getattr(baseline, attr):
            raise _refuse(f"only an expression is allowed, not {_CLAUSES.get(attr, attr)}", text)
    where = stmt.whereClause
    if not isinstance(where, ast.Node):
        raise _refuse("not an expression", text)
    return where


class _Checker:
    """Walks the expression (iteratively: depth is the operator's to choose) against the allow-list."""

    def __init__(self, columns: Collection[str]) -> None:
        self.allowed_columns = frozenset(columns)
        self.columns: set[str] = set()
        self.functions: set[str] = set()

    def walk(self, root: ast.Node) -> None:
        todo: list[object] = [root]
        while todo:
            item = todo.pop()
            if item is None:
                continue
            if isinstance(item, tuple | list):
                todo.extend(item)
                continue
            if not isinstance(item, ast.Node):
                raise _refuse("unexpected element in the expression", repr(item))
            todo.extend(self.children(item))

    def children(self, node: ast.Node) -> list[object]:  # one branch per allowed node
        if isinstance(node, ast.ColumnRef):
            return self.column(node)
        if isinstance(node, ast.A_Const):
            return []
        if isinstance(node, ast.TypeCast):
            self.type_name(node, node.typeName)
            return [node.arg]
        if isinstance(node, ast.A_Expr):
            if node.kind not in _ALLOWED_A_EXPR:
                raise _refuse("this operator form is not allowed", _render(node))
            name = _names(node.name)
            if name is None or len(name) != 1:
                raise _refuse("qualified operators are not allowed", _render(node))
            return [node.lexpr, node.rexpr]
        if isinstance(node, ast.BoolExpr):
            return [node.args]
        if isinstance(node, ast.NullTest | ast.BooleanTest):
            return [node.arg]
        if isinstance(node, ast.CaseExpr):
            return [node.arg, node.args, node.defresult]
        if isinstance(node, ast.CaseWhen):
            return [node.expr, node.result]
        if isinstance(node, ast.CoalesceExpr | ast.MinMaxExpr):
            return [node.args]
        if isinstance(node, ast.A_ArrayExpr):
            return [node.elements]
        if isinstance(node, ast.SQLValueFunction):
            return []
        if isinstance(node, ast.FuncCall):
            return self.function(node)
        if isinstance(node, ast.NamedArgExpr):
            return [node.arg]
        if isinstance(node, ast.SubLink):
            sub = node.subselect
            raise _refuse("subqueries are not allowed",
                          f"({_render(sub)})" if isinstance(sub, ast.Node) else _render(node))
        if isinstance(node, ast.ParamRef):
            raise _refuse("parameters are not allowed", _render(node))
        kind = _NODE_NAMES.get(type(node).__name__, type(node).__name__)
        raise _refuse(f"{kind} is not allowed in a filter", _render(node))

    def column(self, node: ast.ColumnRef) -> list[object]:
        fields = node.fields or ()
        if any(isinstance(field, ast.A_Star) for field in fields):
            raise _refuse("'*' is not allowed", _render(node))
        name = _names(fields)
        if name is None or len(name) != 1:
            raise _refuse("only the table's own columns, unqualified, are allowed", _render(node))
        if name[0] not in self.allowed_columns:
            raise _refuse(f'unknown column "{name[0]}"')
        self.columns.add(name[0])
        return []

    def type_name(self, cast: ast.TypeCast, type_name: ast.TypeName | None) -> None:
        if (type_name is None or type_name.setof or type_name.pct_type or _names(type_name.names) is None
                or not all(isinstance(mod, ast.A_Const) for mod in type_name.typmods or ())):
            raise _refuse("this type is not allowed in a cast", _render(cast))

    def function(self, node: ast.FuncCall) -> list[object]:
        name = _names(node.funcname)
        if name is None or not 1 <= len(name) <= 2:
            raise _refuse("function names may have a schema, nothing more", _render(node))
        qualified = ".".join(name).lower()
        if (node.agg_star or node.agg_distinct or node.agg_order or node.agg_filter is not None
                or node.agg_within_group or node.over is not None
                or (name[-1].lower() in _AGGREGATES and (len(name) == 1 or name[0].lower() == "pg_catalog"))):
            raise _refuse("aggregates and window functions are not allowed", _render(node))
        self.functions.add(qualified)
        return [node.args]


def parse_filter(text: str, columns: Collection[str]) -> Filter:
    """Validate ``text`` as a filter on a table with ``columns``; no database is needed.

    Raises :class:`UsageError` naming the first problem found."""
    if not text.strip():
        raise _refuse("the filter is empty")
    try:
        _check_tokens(text)
        where = _where_clause(text)
        checker = _Checker(columns)
        checker.walk(where)
        sql = f"({RawStream()(where)})"
    except RecursionError:
        raise _refuse("the expression is nested too deeply") from None
    return Filter(text=text, sql=sql, columns=frozenset(checker.columns),
                  functions=frozenset(checker.functions))


_CANDIDATES = """
SELECT p.provolatile, p.prokind, p.proretset
  FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
 WHERE p.proname = %(name)s
   AND CASE WHEN %(schema)s::text IS NULL THEN n.nspname = ANY (pg_catalog.current_schemas(true))
            ELSE n.nspname = %(schema)s::text END
"""


def check_volatility(conn: Connection, flt: Filter) -> None:
    """Refuse a filter that calls a function unknown to the database, volatile (for any candidate of
    that name the search path or pg_catalog shows), not a plain function (aggregate, window
    function, procedure) or set-returning (``generate_series()``, ``unnest()``: a WHERE clause
    cannot hold one, and the server would say so only once the run is under way). Immutable and
    stable functions pass: ``now()`` is stable."""
    for function in sorted(flt.functions):
        schema, _, name = function.rpartition(".")
        rows = conn.execute(_CANDIDATES, {"name": name, "schema": schema or None}).fetchall()
        if not rows:
            raise _refuse("unknown function", f"{function}()")
        if any(row[1] != "f" for row in rows):
            raise _refuse("aggregates, window functions and procedures are not allowed", f"{function}()")
        if any(row[0] == "v" for row in rows):
            raise _refuse("volatile functions are not allowed", f"{function}()")
        if any(row[2] for row in rows):
            raise _refuse("set-returning functions are not allowed", f"{function}()")
