"""What the new table takes over from the old at the swap, besides its rows and indexes:
owner, grants (table and column), the application's triggers and their enabled state, row
security and its policies, the table's comment, statistics targets, replica identity, and its
sequences (owned ones change owner; an identity's position is carried). Called inside the swap's
transaction, after the renames: ``old`` is the table swapped out, ``new`` the one now in place.
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
    for step in (_owner, _grants, _triggers, _row_security, _comment, _statistics):
        step(conn, old, new, ident)
    _sequences(conn, old, new, ident, prefix)
    _replica_identity(conn, old, ident, indexes)


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
        conn.execute(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(
            sql.SQL(sequence), sql.Identifier(f"{prefix}_seq_{number}")))
        conn.execute(sql.SQL("ALTER SEQUENCE {} RENAME TO {}").format(sql.SQL(fresh), sql.Identifier(name)))


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
