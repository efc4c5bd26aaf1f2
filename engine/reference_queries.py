"""The SQL of the foreign keys onto the table: a child row that references a row, and, when the
table references itself, the garbage subtrees a DELETE takes whole.

Kept apart from :mod:`engine.queries`, which embeds these in its statements (the garbage that may
go, the DELETE of a range, the match of its child rows): the recursive subtree statement and the
rules of a key onto the table itself (which actions are allowed, how deep an unindexed key is
followed) are a concept of their own.
"""

from __future__ import annotations

from psycopg import sql

from engine.db import table_ident
from engine.errors import UsageError
from engine.references import SAFE_SELF_ACTIONS, Reference
from engine.target import Target


def referenced(target: Target, ref: Reference, outer: str | None = None,
               child_test: sql.Composable | None = None) -> sql.Composed:
    """``EXISTS`` a child row of ``ref`` pointing at the outer row of the target (named ``outer``
    when the outer query gives it an alias), and passing ``child_test`` when given (its columns,
    unqualified, are the child's)."""
    parent_table = (outer,) if outer else _qualified(target)
    pairs = sql.SQL(" AND ").join([
        *(sql.SQL("{} = {}").format(sql.Identifier("msggc_child", child),
                                    sql.Identifier(*parent_table, parent))
          for child, parent in zip(ref.child_columns, ref.parent_columns, strict=True)),
        *([child_test] if child_test is not None else [])])
    return sql.SQL("EXISTS (SELECT 1 FROM {child} AS msggc_child WHERE {pairs})").format(
        child=table_ident(ref.child), pairs=pairs)


def _qualified(target: Target) -> tuple[str, ...]:
    spec = target.spec
    return (spec.schema, spec.name) if spec.schema else (spec.name,)


def held_by(target: Target, refs: tuple[Reference, ...], outer: str | None = None) -> sql.Composable:
    """The row is referenced by a child row of one of ``refs`` (FALSE when there are none)."""
    return sql.SQL(" OR ").join([sql.SQL("FALSE"), *(referenced(target, ref, outer) for ref in refs)])


UNINDEXED_DEPTH = 32
"""How deep below a batch's range a subtree is followed when the key onto the table itself has no
index (see :func:`garbage_subtrees`): each level may read the whole table, so deeper threads
are left, counted, for a later run (measured on a 20,000-reply chain: 100 levels made a batch of
6 keys take 228 ms, and the sizer's batches shrank toward nothing)."""

CHANGE = {"cascade": "delete", "set null": "set to NULL the key of",
          "set default": "set to default the key of"}
"""What a self-referencing key's action would do to the rows that reference a deleted one."""


def refuse_unsafe_self_references(target: Target) -> None:
    """A key of the table onto itself whose action changes rows of the table: see
    :data:`engine.references.SAFE_SELF_ACTIONS`."""
    for ref in target.references:
        if ref.self_referencing and ref.action not in SAFE_SELF_ACTIONS:
            raise UsageError(
                f"foreign key {ref.name} of {target.spec.qualified} onto itself is ON DELETE"
                f" {ref.action.upper()}: deleting a garbage row would {CHANGE[ref.action]} rows of the"
                " table that reference it, which may not be garbage; msggc refuses such a table (under"
                " NO ACTION or RESTRICT a run keeps the referenced garbage rows and counts them)")


def garbage_subtrees(target: Target, refs: tuple[Reference, ...], holding: tuple[Reference, ...],
                     garbage: sql.Composable, range_: sql.Composable) -> sql.Composed:
    """The addresses (ctid) of the rows a DELETE of the range takes when the table references
    itself: each garbage row of the range with every row that descends from it, when all of
    them are garbage of this table (or leaf) that no other key holds. A row one of whose
    descendants stays (not garbage, in another leaf, held) stays too, and so does every row on
    the way up to it. Descendants outside the range go with their ancestor in the same
    statement, so that NO ACTION and RESTRICT are satisfied at its end; the walk finds them
    gone when it reaches them. Followed downward through the garbage rows only, from the
    range's: the children of a row are found through the referencing columns (an index on
    them makes each step a lookup); then upward from the rows that stay, by the referenced
    key (unique, so indexed), as far as the rows found on the way down.

    Without such an index PostgreSQL reads the whole table for each row deleted, so the rows
    are followed down at most :data:`UNINDEXED_DEPTH` levels below the range (each row at
    the least depth it is found at): a row with a descendant beyond stays, like one with a
    descendant that stays, counted, for a run that reaches the lower part first. A fully
    processed chain of 20,000 replies otherwise made one statement of 20,000 table reads that
    no batch size could keep under statement_timeout, and every run failed.

    ``refs`` are the table's keys onto itself, ``holding`` the keys of other tables that keep
    their referenced garbage rows."""
    columns = list(dict.fromkeys(c for ref in refs for c in (*ref.parent_columns, *ref.child_columns)))
    slot = {c: f"msggc_c{i}" for i, c in enumerate(columns)}

    def carried(alias: str | None, slots: bool = False) -> sql.Composable:
        """The columns of a row (or their slots in the CTEs), as ``alias`` names them."""
        names = [slot[c] if slots else c for c in columns]
        return sql.SQL(", ").join(sql.Identifier(alias, n) if alias else sql.Identifier(n) for n in names)

    def edges(child: str, parent: str, child_slots: bool, parent_slots: bool = True) -> sql.Composable:
        """``child`` references ``parent`` through one of the keys (each a row of the table,
        or of a CTE where its columns are in their slots)."""
        return sql.SQL(" OR ").join(sql.SQL("({})").format(sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier(child, slot[c] if child_slots else c),
                                      sql.Identifier(parent, slot[p] if parent_slots else p))
            for c, p in zip(ref.child_columns, ref.parent_columns, strict=True))) for ref in refs)

    capped = not all(ref.indexed for ref in refs)
    cap = sql.Literal(UNINDEXED_DEPTH)
    none = sql.SQL("")
    return sql.SQL(
        "WITH RECURSIVE msggc_down (msggc_rel, msggc_tid, msggc_ok, {slots}{depth}) AS ("
        " SELECT tableoid, ctid, (NOT ({held_root})) IS TRUE, {own}{root_depth} FROM {t}"
        " WHERE {range} AND {garbage}"
        " UNION"
        " SELECT msggc_k.tableoid, msggc_k.ctid,"
        " (msggc_k.tableoid = {oid}::oid AND {garbage} AND NOT ({held_k})) IS TRUE, {k}{child_depth}"
        " FROM {tree} AS msggc_k JOIN msggc_down AS msggc_d ON {down} WHERE msggc_d.msggc_ok{deeper}),"
        " msggc_up (msggc_rel, msggc_tid, {slots}) AS ("
        " SELECT msggc_rel, msggc_tid, {slots} FROM msggc_down WHERE NOT msggc_ok{unexplored}"
        " UNION"
        " SELECT msggc_p.tableoid, msggc_p.ctid, {p}"
        " FROM msggc_up AS msggc_u JOIN {tree} AS msggc_p ON {up}"
        " WHERE (msggc_p.tableoid, msggc_p.ctid) IN"
        " (SELECT msggc_rel, msggc_tid FROM msggc_down WHERE msggc_ok{explored}))"
        " SELECT msggc_tid FROM msggc_down WHERE msggc_ok AND msggc_rel = {oid}::oid{explored}"
        " EXCEPT SELECT msggc_tid FROM msggc_up WHERE msggc_rel = {oid}::oid"
    ).format(
        slots=carried(None, slots=True), held_root=held_by(target, holding), own=carried(None),
        t=table_ident(target.spec), range=range_, garbage=garbage, oid=sql.Literal(target.oid),
        held_k=held_by(target, holding, "msggc_k"), k=carried("msggc_k"), tree=table_ident(refs[0].child),
        down=edges("msggc_k", "msggc_d", child_slots=False), p=carried("msggc_p"),
        up=edges("msggc_u", "msggc_p", child_slots=True, parent_slots=False),
        depth=sql.SQL(", msggc_depth") if capped else none,
        root_depth=sql.SQL(", 0") if capped else none,
        child_depth=sql.SQL(", msggc_d.msggc_depth + 1") if capped else none,
        deeper=sql.SQL(" AND msggc_d.msggc_depth <= {}").format(cap) if capped else none,
        explored=sql.SQL(" AND msggc_depth <= {}").format(cap) if capped else none,
        unexplored=sql.SQL(
            " OR (msggc_depth > {cap} AND (msggc_rel, msggc_tid) NOT IN"
            " (SELECT msggc_rel, msggc_tid FROM msggc_down WHERE msggc_depth <= {cap}))"
        ).format(cap=cap) if capped else none)
