"""Compaction (``--strategy compact``): keep the live rows in a new table and swap it in.

When most of a table is garbage the cheap thing to move is the live rows. The phases, each
recorded in the run's ``gc_runs`` row before (or in the transaction that) it changes the
application's table, so that the next run on the table, whatever its flags, finishes or undoes
a half-done one (:mod:`engine.compact.recover`):

``preconditions -> capture (trigger + log) -> copy (one snapshot) -> indexes -> catch-up rounds
-> swap (one short transaction under lock_timeout) -> verify and count -> drop or keep the old``.
"""
