"""The mutation table of tests/mutate.py stays applicable: every mutation still names exactly one line of the
library, every hint names a test file, the names are unique and the CI sample exists (running the mutations is
the script's job: ``python tests/mutate.py``)."""

from __future__ import annotations

from tests import mutate


def test_every_mutation_applies_to_exactly_one_line():
    assert mutate.check() == []
    assert len(mutate.MUTATIONS) >= 20


def test_check_reports_a_mutation_that_no_longer_applies():
    stale = mutate.Mutation("stale", "jaxnorm/_running.py", "no such line", "x", ("tests/test_core.py",))
    changes_nothing = mutate.Mutation("same", "jaxnorm/_running.py", "def update_running", "def update_running", ())
    problems = mutate.check([stale, changes_nothing, stale])
    assert any("occurs 0 times" in p for p in problems)
    assert any("changes nothing" in p for p in problems)
    assert any("duplicate mutation name 'stale'" in p for p in problems)
