"""What the new table takes over from the old at the swap, besides its rows and indexes:
owner, grants (table and column), the application's triggers and their enabled state, row
security and its policies, the table's comment and those of its indexes, constraints, triggers
and policies, statistics targets (of columns and of index columns), column options
(``n_distinct``...), TOAST options (``toast.*``), the CLUSTER mark, extended statistics' names,
replica identity, and its sequences (owned ones change owner; an identity's position, grants and
comment are carried). Called inside the swap's transaction, after the renames: ``old`` is the table swapped
out, ``new`` the one now in place. (The tablespaces are the old ones' from the creation on:
:func:`engine.compact.copy.in_tablespace`. Security labels are not carried: no label provider
to prove it with; a table that has one is refused.)
"""

from __future__ import annotations

from psycopg import sql

from engine.compact.state import TRIGGER
from engine.db import Connection, one_row

PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER",
                        "MAINTAIN"})
ENABLED = {"D": "DISABLE TRIGGER", "R": "ENABLE REPLICA TRIGGER", "A": "ENABLE ALWAYS TRIGGER"}
COMMANDS = {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}


def carry_all(conn: Connection, old: int, new: int, ident: sql.Composable, prefix: str,
              indexes: dict[str, str]) -> None:
    """``indexes``: each index of the old table (as named now) to its twin on the new one;
    ``prefix`` names what the old table's sequences become."""
    for step in (_owner, _grants, _triggers, _row_security, _comment, _statistics, _column_options,
                 _toast_options):
        step(conn, old, new, ident)
    _sequences(conn, old, new, ident, prefix)
    _replica_identity(conn, old, ident, indexes)
    _clustered(conn, old, ident, indexes)
    schema = sql.SQL(one_row(conn.execute(  # regnamespace text: quoted as needed
        "SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = %s", (new,)))[0])
    _index_statistics(conn, old, schema, indexes)
    _extended_statistics(conn, old, new, prefix)
    _object_comments(conn, old, ident, schema, indexes)


def _role(name: str | None) -> sql.Composable:
    return sql.SQL("PUBLIC") if name is None else sql.Identifier(name)


def _owner(conn: Connection, old: int, new: int, ident: sql.Composable) -> None:
    owner = one_row(conn.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s", (old,)))[0]
    conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(ident, sql.Identifier(owner)))


def _grants(conn: Connection, old: int, new: int, ident: sql.Composable) -> None:
    """Each privilege of the table and of its columns, to the same grantee, with its grant option."""
    rows = conn.execute(
        "SELECT NULL::name, a.privilege_type, r.rolname, a.is_grantable FROM pg_class c,"
        " aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee WHERE c.oid = %(old)s"
        " UNION ALL SELECT att.attname, a.privilege_type, r.rolname, a.is_grantable FROM pg_attribute att,"
        " aclexplode(att.attacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee"
        " WHERE att.attrelid = %(old)s AND att.attnum > 0 AND NOT att.attisdropped", {"old": old}).fetchall()
    for column, privilege, grantee, grantable in rows:
        if privilege not in PRIVILEGES:
            continue
        columns = sql.SQL(" ({})").format(sql.Identifier(column)) if column else sql.SQL("")
        conn.execute(sql.SQL("GRANT {privilege}{columns} ON {t} TO {grantee}{option}").format(
            privilege=sql.SQL(privilege), columns=columns, t=ident, grantee=_role(grantee),
            option=sql.SQL(" WITH GRANT OPTION" if grantable else "")))


def _triggers(conn: Connection, old: int, new: int, ident: sql.Composable) -> None:
    """The application's triggers, from the server's own text with the table's name replaced
    (``pg_get_triggerdef`` always qualifies it), each enabled as it was; not the capture's, nor a
    leaf's clones of its parent's (the attach clones them again)."""
    rows = conn.execute(
        "SELECT tg.tgname, tg.tgenabled, pg_get_triggerdef(tg.oid),"
        " format(' ON %%I.%%I ', n.nspname, c.relname), format(' ON %%I.%%I ', nn.nspname, cn.relname)"
        " FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace,"
        " pg_class cn JOIN pg_namespace nn ON nn.oid = cn.relnamespace"
        " WHERE tg.tgrelid = %s AND cn.oid = %s AND NOT tg.tgisinternal AND tg.tgname <> %s"
        " AND tg.tgparentid = 0 ORDER BY tg.oid",
        (old, new, TRIGGER)).fetchall()
    for name, enabled, definition, old_on, new_on in rows:
        conn.execute(sql.SQL(definition.replace(old_on, new_on, 1)))  # the server's text of it
        if enabled in ENABLED:
            conn.execute(sql.SQL("ALTER TABLE {} {} {}").format(ident, sql.SQL(ENABLED[enabled]),
                                                                 sql.Identifier(name)))


def _row_security(conn: Connection, old: int, new: int, ident: sql.Composable) -> None:
    enabled, forced = one_row(conn.execute(
        "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = %s", (old,)))
    if enabled:
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(ident))
    if forced:
        conn.execute(sql.SQL("ALTER TABLE {} FORCE ROW LEVEL SECURITY").format(ident))
    rows = conn.execute(
        "SELECT polname, polpermissive, polcmd, pg_get_expr(polqual, polrelid),"
        " pg_get_expr(polwithcheck, polrelid),"
        " ARRAY(SELECT rolname FROM pg_roles WHERE oid = ANY(polroles)), 0 = ANY(polroles)"
        " FROM pg_policy WHERE polrelid = %s ORDER BY oid", (old,)).fetchall()
    for name, permissive, command, using, check, roles, public in rows:
        grantees = [_role(None)] if public else [_role(role) for role in roles]
        conn.execute(sql.SQL(
            "CREATE POLICY {name} ON {t} AS {kind} FOR {cmd} TO {roles}{using}{check}").format(
            name=sql.Identifier(name), t=ident, kind=sql.SQL("PERMISSIVE" if permissive else "RESTRICTIVE"),
            cmd=sql.SQL(COMMANDS[command]), roles=sql.SQL(", ").join(grantees),
            using=sql.SQL(" USING ({})").format(sql.SQL(using)) if using else sql.SQL(""),
            check=sql.SQL(" WITH CHECK ({})").format(sql.SQL(check)) if check else sql.SQL("")))


def _comment(conn: Connection, old: int, new: int, ident: sql.Composable) -> None:
    comment = one_row(conn.execute("SELECT obj_description(%s, 'pg_class')", (old,)))[0]
    if comment is not None:
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(ident, sql.Literal(comment)))


def _statistics(conn: Connection, old: int, new: int, ident: sql.Composable) -> None:
    for column, target in conn.execute(
            "SELECT attname, attstattarget FROM pg_attribute WHERE attrelid = %s AND attnum > 0"
            " AND NOT attisdropped AND coalesce(attstattarget, -1) >= 0", (old,)).fetchall():
        conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET STATISTICS {}").format(
            ident, sql.Identifier(column), sql.Literal(int(target))))


def _sequences(conn: Connection, old: int, new: int, ident: sql.Composable, prefix: str) -> None:
    """A sequence the old table owns (``serial``) is owned by the new one's column from now on
    (else dropping the old table would drop it); an identity's sequence of the new table starts
    where the old one's stands, and takes its name."""
    owned = conn.execute(
        "SELECT s.oid::regclass::text, s.relname, a.attname, d.deptype FROM pg_depend d"
        " JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'"
        " JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid"
        " WHERE d.classid = 'pg_class'::regclass AND d.refobjid = %s AND d.deptype IN ('a', 'i')"
        " ORDER BY s.oid", (old,)).fetchall()
    for number, (sequence, name, column, kind) in enumerate(owned):
        if kind == "a":
            conn.execute(sql.SQL("ALTER SEQUENCE {} OWNED BY {}.{}").format(
                sql.SQL(sequence), ident, sql.Identifier(column)))  # regclass text: quoted as needed
            continue
        fresh = one_row(conn.execute(sql.SQL(
            "SELECT pg_get_serial_sequence({t}, {c}), setval(pg_get_serial_sequence({t}, {c}), last_value,"
            " is_called) FROM {s}").format(t=sql.Literal(ident.as_string(conn)), c=sql.Literal(column),
                                            s=sql.SQL(sequence))))[0]
        _sequence_grants(conn, sequence, fresh)
        conn.execute(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(
            sql.SQL(sequence), sql.Identifier(f"{prefix}_seq_{number}")))
        conn.execute(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(sql.SQL(fresh), sql.Identifier(name)))


def _sequence_grants(conn: Connection, sequence: str, fresh: str) -> None:
    """The identity sequence's grants and comment (``LIKE`` made a bare one): ``sequence`` the
    old one, ``fresh`` the new table's (regclass text both)."""
    for privilege, grantee, grantable in conn.execute(
            "SELECT a.privilege_type, r.rolname, a.is_grantable FROM pg_class c, aclexplode(c.relacl) a"
            " LEFT JOIN pg_roles r ON r.oid = a.grantee WHERE c.oid = %s::regclass", (sequence,)).fetchall():
        conn.execute(sql.SQL("GRANT {} ON SEQUENCE {} TO {}{}").format(
            sql.SQL(privilege), sql.SQL(fresh), _role(grantee),
            sql.SQL(" WITH GRANT OPTION" if grantable else "")))
    comment = one_row(conn.execute("SELECT obj_description(%s::regclass, 'pg_class')", (sequence,)))[0]
    if comment is not None:
        conn.execute(sql.SQL("COMMENT ON SEQUENCE {} IS {}").format(sql.SQL(fresh), sql.Literal(comment)))


def _replica_identity(conn: Connection, old: int, ident: sql.Composable, indexes: dict[str, str]) -> None:
    kind, index = one_row(conn.execute(
        "SELECT relreplident, (SELECT ic.relname FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid"
        " WHERE x.indrelid = c.oid AND x.indisreplident) FROM pg_class c WHERE oid = %s", (old,)))
    if kind == "n":
        conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY NOTHING").format(ident))
    elif kind == "f":
        conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(ident))
    elif kind == "i" and index in indexes:
        conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(
            ident, sql.Identifier(indexes[index])))


def sequences_back(conn: Connection, new: int, old_ident: sql.Composable) -> list[tuple[str, str]]:
    """A swap undone, before the new table is dropped: the sequences it was given are the old
    one's again (an owned one would go with it) and an identity's sequence of the old table
    goes on where the new one's stands (the application inserted meanwhile); returns, for each
    of those, the old sequence (regclass text) and the name to give it back once the new one's
    is dropped."""
    owned = conn.execute(
        "SELECT s.oid::regclass::text, s.relname, a.attname, d.deptype FROM pg_depend d"
        " JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'"
        " JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid"
        " WHERE d.classid = 'pg_class'::regclass AND d.refobjid = %s AND d.deptype IN ('a', 'i')"
        " ORDER BY s.oid", (new,)).fetchall()
    renames = []
    for sequence, name, column, kind in owned:
        if kind == "a":
            conn.execute(sql.SQL("ALTER SEQUENCE {} OWNED BY {}.{}").format(
                sql.SQL(sequence), old_ident, sql.Identifier(column)))
            continue
        mine = one_row(conn.execute(sql.SQL(
            "SELECT pg_get_serial_sequence({t}, {c}), setval(pg_get_serial_sequence({t}, {c}), last_value,"
            " is_called) FROM {s}").format(t=sql.Literal(old_ident.as_string(conn)), c=sql.Literal(column),
                                            s=sql.SQL(sequence))))[0]
        renames.append((mine, name))
    return renames


def _column_options(conn: Connection, old: int, new: int, ident: sql.Composable) -> None:
    """Per-column planner options (``n_distinct``, ``n_distinct_inherited``): those only (a server
    may stamp options of its own on every column it creates)."""
    for column, name, value in conn.execute(
            "SELECT attname, option_name, option_value FROM pg_attribute, pg_options_to_table(attoptions)"
            " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped"
            " AND option_name IN ('n_distinct', 'n_distinct_inherited') ORDER BY attnum", (old,)).fetchall():
        conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET ({} = {})").format(
            ident, sql.Identifier(column), sql.Identifier(name), sql.Literal(value)))


def _toast_options(conn: Connection, old: int, new: int, ident: sql.Composable) -> None:
    """The TOAST table's options (``toast.autovacuum_enabled``...): the copy took the heap's only."""
    for name, value in conn.execute(
            "SELECT option_name, option_value FROM pg_class c JOIN pg_class t ON t.oid = c.reltoastrelid,"
            " pg_options_to_table(t.reloptions) WHERE c.oid = %s", (old,)).fetchall():
        conn.execute(sql.SQL("ALTER TABLE {} SET ({} = {})").format(
            ident, sql.SQL("toast.{}").format(sql.Identifier(name)), sql.Literal(value)))


def _clustered(conn: Connection, old: int, ident: sql.Composable, indexes: dict[str, str]) -> None:
    """The index ``CLUSTER`` without a name would use."""
    for (index,) in conn.execute("SELECT ic.relname FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid"
                                 " WHERE x.indrelid = %s AND x.indisclustered", (old,)).fetchall():
        if index in indexes:
            conn.execute(sql.SQL("ALTER TABLE {} CLUSTER ON {}").format(
            ident, sql.Identifier(indexes[index])))


def _index_statistics(conn: Connection, old: int, schema: sql.Composable, indexes: dict[str, str]) -> None:
    """Statistics targets set on an expression index's columns (by position)."""
    for index, number, target in conn.execute(
            "SELECT ic.relname, a.attnum, a.attstattarget FROM pg_index x"
            " JOIN pg_class ic ON ic.oid = x.indexrelid JOIN pg_attribute a ON a.attrelid = ic.oid"
            " WHERE x.indrelid = %s AND coalesce(a.attstattarget, -1) >= 0 ORDER BY 1, 2", (old,)).fetchall():
        if index in indexes:
            conn.execute(sql.SQL("ALTER INDEX {}.{} ALTER COLUMN {} SET STATISTICS {}").format(
                schema, sql.Identifier(indexes[index]), sql.Literal(int(number)), sql.Literal(int(target))))


STATISTICS_OBJECTS = """
SELECT s.oid, s.stxname, pg_get_statisticsobjdef_columns(s.oid), s.stxkind::text,
       coalesce(s.stxstattarget, -1), n.nspname
FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace
WHERE s.stxrelid = %s ORDER BY s.oid
"""


def _extended_statistics(conn: Connection, old: int, new: int, prefix: str) -> None:
    """The new table's extended statistics (made by ``LIKE`` with their comments, named after
    it, in its schema) take the old ones' names and schemas, once those are renamed away, and
    their statistics targets; matched by definition."""
    theirs = {(row[2], row[3]): row for row in conn.execute(STATISTICS_OBJECTS, (new,)).fetchall()}
    mine = conn.execute(STATISTICS_OBJECTS, (old,)).fetchall()
    for number, (_oid, name, columns, kinds, target, namespace) in enumerate(mine):
        twin = theirs.get((columns, kinds))
        if twin is None:
            continue
        conn.execute(sql.SQL("ALTER STATISTICS {} RENAME TO {}").format(
            sql.Identifier(namespace, name), sql.Identifier(f"{prefix}_stat_{number}")))
        conn.execute(sql.SQL("ALTER STATISTICS {} RENAME TO {}").format(
            sql.Identifier(twin[5], twin[1]), sql.Identifier(name)))
        if twin[5] != namespace:
            conn.execute(sql.SQL("ALTER STATISTICS {} SET SCHEMA {}").format(
                sql.Identifier(twin[5], name), sql.Identifier(namespace)))
        if target >= 0:
            conn.execute(sql.SQL("ALTER STATISTICS {} SET STATISTICS {}").format(
                sql.Identifier(namespace, name), sql.Literal(int(target))))


COMMENTED = """
SELECT 'INDEX', ic.relname, d.description FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid
  JOIN pg_description d ON d.objoid = ic.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
  WHERE x.indrelid = %(old)s
UNION ALL SELECT 'CONSTRAINT', co.conname, d.description FROM pg_constraint co
  JOIN pg_description d ON d.objoid = co.oid AND d.classoid = 'pg_constraint'::regclass
  WHERE co.conrelid = %(old)s AND co.contype IN ('p', 'u', 'f') AND co.conparentid = 0
UNION ALL SELECT 'TRIGGER', tg.tgname, d.description FROM pg_trigger tg
  JOIN pg_description d ON d.objoid = tg.oid AND d.classoid = 'pg_trigger'::regclass
  WHERE tg.tgrelid = %(old)s AND NOT tg.tgisinternal AND tg.tgparentid = 0
UNION ALL SELECT 'POLICY', p.polname, d.description FROM pg_policy p
  JOIN pg_description d ON d.objoid = p.oid AND d.classoid = 'pg_policy'::regclass
  WHERE p.polrelid = %(old)s
"""


def _object_comments(conn: Connection, old: int, ident: sql.Composable, schema: sql.Composable,
                     indexes: dict[str, str]) -> None:
    """Comments on the table's indexes, the constraints made of them and its foreign keys, its
    triggers and policies (the copy carried the columns', CHECKs' and extended statistics'). An
    index's (and its constraint's) name is its twin's; the others' names are the same."""
    for kind, name, comment in conn.execute(COMMENTED, {"old": old}).fetchall():
        twin = indexes[name] if name in indexes else str(name)
        if kind == "INDEX" and name in indexes:
            target = sql.SQL("INDEX {}.{}").format(schema, sql.Identifier(twin))
        elif kind in ("CONSTRAINT", "TRIGGER", "POLICY"):
            target = sql.SQL("{} {} ON {}").format(sql.SQL(kind), sql.Identifier(twin), ident)
        else:
            continue
        conn.execute(sql.SQL("COMMENT ON {} IS {}").format(target, sql.Literal(comment)))
