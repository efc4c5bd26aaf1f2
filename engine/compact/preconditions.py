"""What a rename cannot carry safely: refused before anything changes, with the reason.

A compaction swaps names: whatever holds on to the old table by oid (a view, a rule, a foreign
key onto it, a publication, an inheritance link, a function taking its row type) would keep the
old table, emptied of nothing but no longer written. Such tables are refused in one line; so is a
table without a key (the catch-up matches rows by it) and one the role does not own.
"""

from __future__ import annotations

import os
import shutil

from engine.compact import leaf
from engine.db import Connection, one_row
from engine.errors import UsageError
from engine.target import Target


class CompactRefused(UsageError):
    """The table cannot be compacted: nothing was changed; the walk can still collect it."""


def refusals(conn: Connection, target: Target) -> list[str]:
    """Every reason the table cannot be compacted (empty: it can)."""
    oid = target.oid
    reasons = []
    if target.leaves:
        reasons.append("a partitioned table (compact its leaves one by one: --table LEAF)")
    reasons.extend(leaf.refusals(conn, oid))
    if not target.key:
        reasons.append("no key (a primary key or --key naming a unique index):"
                       " the catch-up matches rows by it")
    elif not _key_not_null(conn, oid, target.key):
        reasons.append(f"its key ({', '.join(target.key)}) allows NULL: the catch-up matches rows by it")
    if not _owned(conn, oid):
        reasons.append("the role does not own it (or may not create tables in its schema)")
    for label, query in _DEPENDENTS:
        found = [name for (name,) in conn.execute(query, {"oid": oid})]
        if found:
            reasons.append(f"{label}: {', '.join(found[:3])}{' ...' if len(found) > 3 else ''}")
    return reasons


def require(conn: Connection, target: Target) -> None:
    """Raise :class:`CompactRefused` naming every reason, in one line."""
    reasons = refusals(conn, target)
    if reasons:
        raise CompactRefused(f"cannot compact {target.qualified}: {'; '.join(reasons)}")


def _key_not_null(conn: Connection, oid: int, key: tuple[str, ...]) -> bool:
    return bool(one_row(conn.execute(
        "SELECT bool_and(attnotnull) FROM pg_attribute WHERE attrelid = %s AND attname = ANY(%s)",
        (oid, list(key))))[0])


def _owned(conn: Connection, oid: int) -> bool:
    """The swap creates a table beside it and hands it to the owner: membership in the owner's
    role and CREATE on the schema are what that needs."""
    return bool(one_row(conn.execute(
        "SELECT pg_has_role(relowner, 'MEMBER') AND has_schema_privilege(relnamespace, 'CREATE')"
        " FROM pg_class WHERE oid = %s", (oid,)))[0])


_DEPENDENTS = (
    ("views, materialized views or rules depend on it",
     "SELECT DISTINCT pg_describe_object(d.classid, d.objid, 0) FROM pg_depend d"
     " WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass"
     " AND d.refobjid = %(oid)s AND d.deptype = 'n' ORDER BY 1"),
    ("foreign keys point at it",
     "SELECT format('%%s on %%s', conname, conrelid::regclass) FROM pg_constraint"
     " WHERE contype = 'f' AND confrelid = %(oid)s ORDER BY 1"),
    ("it is published",
     "SELECT DISTINCT t.pubname::text FROM pg_publication_tables t, pg_class c, pg_namespace n"
     " WHERE c.oid = %(oid)s AND n.oid = c.relnamespace AND t.schemaname = n.nspname"
     " AND t.tablename = c.relname ORDER BY 1"),
    ("it takes part in inheritance",
     "SELECT format('%%s inherits %%s', inhrelid::regclass, inhparent::regclass) FROM pg_inherits i"
     " JOIN pg_class ch ON ch.oid = i.inhrelid"
     " WHERE %(oid)s IN (inhrelid, inhparent) AND NOT ch.relispartition ORDER BY 1"),
    ("constraints a swap cannot rebuild (exclusion, deferrable)",
     "SELECT conname::text FROM pg_constraint WHERE conrelid = %(oid)s"
     " AND (contype = 'x' OR (contype IN ('p', 'u') AND condeferrable)) ORDER BY 1"),
    ("security labels (a swap does not carry them)",
     "SELECT DISTINCT format('%%s by %%s', coalesce(a.attname::text, 'the table'), s.provider)"
     " FROM pg_seclabel s"
     " LEFT JOIN pg_attribute a ON a.attrelid = s.objoid AND a.attnum = s.objsubid AND s.objsubid > 0"
     " WHERE s.classoid = 'pg_class'::regclass AND s.objoid = %(oid)s ORDER BY 1"),
    ("objects depend on it or on its row type",
     "SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) FROM pg_depend d, pg_class c"
     " WHERE c.oid = %(oid)s AND d.deptype = 'n'"
     " AND ((d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid)"
     "   OR (d.refclassid = 'pg_type'::regclass AND d.refobjid = c.reltype))"
     " AND d.classid NOT IN ('pg_rewrite'::regclass, 'pg_constraint'::regclass)"
     " AND NOT EXISTS (SELECT FROM pg_attrdef a WHERE d.classid = 'pg_attrdef'::regclass"
     "   AND a.oid = d.objid AND a.adrelid = c.oid)"  # the table's own defaults, policies, triggers
     " AND NOT EXISTS (SELECT FROM pg_policy p WHERE d.classid = 'pg_policy'::regclass"
     "   AND p.oid = d.objid AND p.polrelid = c.oid)"
     " AND NOT EXISTS (SELECT FROM pg_trigger t WHERE d.classid = 'pg_trigger'::regclass"
     "   AND t.oid = d.objid AND t.tgrelid = c.oid) ORDER BY 1"),
)


def disk_room(conn: Connection, needed: int) -> tuple[bool | None, str]:
    """Whether the disk holding the database has room for ``needed`` bytes (with 20% to spare),
    and the line that says so; None when it cannot be told: only a server on this machine
    whose data directory this process may read says."""
    row = conn.execute("SELECT current_setting('data_directory', true)").fetchone()
    directory = row[0] if row else None
    if not directory or not os.path.isdir(directory):
        return None, f"free disk unknown (the server does not say); the copy needs about {needed // 2**20} MB"
    free = shutil.disk_usage(directory).free
    return free >= needed * 1.2, (f"free disk {free // 2**20} MB in {directory}, the copy needs about"
                                  f" {needed // 2**20} MB (with 20% to spare)")


def free_disk(conn: Connection, needed: int) -> str:
    """:func:`disk_room`'s line, or :class:`CompactRefused` when there is not enough."""
    room, line = disk_room(conn, needed)
    if room is False:
        raise CompactRefused(f"not enough free disk for the copy: {line}")
    return line
