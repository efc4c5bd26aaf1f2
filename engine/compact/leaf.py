"""A leaf partition compacted: the new table is detached from nothing and attached in the old
leaf's place, in the swap's transaction (``DETACH`` the old, ``ATTACH`` the new with its bound).

The new table carries a ``CHECK`` constraint made of the leaf's partition constraint (as the
server prints it) from its creation, so the copy checks each row as it lands and the attach needs
no scan; it is dropped once attached. A parent with a default partition is refused: the attach
would read the default partition under the lock. The parent's indexes, triggers and foreign keys
come back by the attach itself (its indexes match the parent's, its clones are made again).
"""

from __future__ import annotations

from psycopg import sql

from engine.compact.state import Compaction
from engine.db import Connection, table_ident


def parent_of(conn: Connection, oid: int) -> tuple[str, str, str] | None:
    """(schema, name, bound) of the leaf's parent, or None for a table that is no partition."""
    row = conn.execute(
        "SELECT pn.nspname, p.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_class c"
        " JOIN pg_inherits i ON i.inhrelid = c.oid JOIN pg_class p ON p.oid = i.inhparent"
        " JOIN pg_namespace pn ON pn.oid = p.relnamespace WHERE c.oid = %s AND c.relispartition",
        (oid,)).fetchone()
    return (row[0], row[1], row[2]) if row else None


_REFUSALS = (
    ("its parent has a default partition (the attach would read it under the lock)",
     "SELECT d.oid::regclass::text FROM pg_inherits i JOIN pg_inherits s ON s.inhparent = i.inhparent"
     " JOIN pg_class d ON d.oid = s.inhrelid WHERE i.inhrelid = %(oid)s"
     " AND pg_get_expr(d.relpartbound, d.oid) = 'DEFAULT'"),
    ("the role does not own its parent",
     "SELECT p.oid::regclass::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent"
     " WHERE i.inhrelid = %(oid)s AND NOT pg_has_role(p.relowner, 'MEMBER')"),
    ("foreign keys point at its parent",
     "SELECT format('%%s on %%s', conname, conrelid::regclass)"
     " FROM pg_constraint, pg_partition_ancestors(%(oid)s) a"
     " WHERE contype = 'f' AND confrelid = a.relid AND conparentid = 0"),
    ("its parent is published",
     "SELECT DISTINCT t.pubname::text FROM pg_partition_ancestors(%(oid)s) a"
     " JOIN pg_class c ON c.oid = a.relid"
     " JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_publication_tables t"
     " ON t.schemaname = n.nspname AND t.tablename = c.relname"),
)


def refusals(conn: Connection, oid: int) -> list[str]:
    """What a leaf's detach and attach cannot carry (empty: nothing)."""
    reasons = []
    for label, query in _REFUSALS:
        found = [name for (name,) in conn.execute(query, {"oid": oid})]
        if found:
            reasons.append(f"{label}: {', '.join(found[:3])}")
    return reasons


def bound_name(c: Compaction) -> str:
    return f"msggc_bound_{c.run_id}"


def add_bound_check(conn: Connection, c: Compaction, oid: int) -> None:
    """The leaf's partition constraint on the new table, before any row lands in it."""
    definition = conn.execute("SELECT pg_get_partition_constraintdef(%s)", (oid,)).fetchone()
    if definition and definition[0]:
        conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({})").format(
            table_ident(c.new), sql.Identifier(bound_name(c)), sql.SQL(definition[0])))  # the server's text


def detach(conn: Connection, c: Compaction) -> None:
    """Inside the swap, its locks taken: the old leaf out of the parent."""
    assert c.parent is not None
    conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(
        sql.Identifier(*c.parent), table_ident(c.table)))


def attach(conn: Connection, c: Compaction) -> None:
    """Inside the swap, the new table renamed: attached with the old leaf's bound, no scan."""
    assert c.parent is not None and c.bound is not None
    conn.execute(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} {}").format(
        sql.Identifier(*c.parent), table_ident(c.table), sql.SQL(c.bound)))  # the bound from the catalog
    conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
        table_ident(c.table), sql.Identifier(bound_name(c))))


def bound_on_old(conn: Connection, c: Compaction) -> None:
    """A leaf's swap to be undone: the old table takes the leaf's partition constraint as a
    CHECK (validated now, outside the parent's lock: nobody reads the old table), so that its
    attach again does not scan; the attach drops it as it drops the new one's."""
    old = table_ident(c.old).as_string(conn)
    if conn.execute("SELECT FROM pg_constraint WHERE conrelid = to_regclass(%s) AND conname = %s",
                    (old, bound_name(c))).fetchone():
        return
    definition = conn.execute("SELECT pg_get_partition_constraintdef(to_regclass(%s))",
                              (table_ident(c.table).as_string(conn),)).fetchone()
    if definition and definition[0]:
        conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({})").format(
            table_ident(c.old), sql.Identifier(bound_name(c)), sql.SQL(definition[0])))  # the server's text
