"""What the compaction's dry run says about the space its drop gives back at once."""

from engine.compact.dryrun import _given_back


def test_a_dry_run_warns_that_a_gibibyte_or_more_goes_back_to_the_filesystem_at_once():
    assert _given_back(2**30 - 1) == ""
    said = _given_back(3 * 2**30)
    assert "3.0 GiB go back to the filesystem at once" in said and "--archive keeps the old table" in said
