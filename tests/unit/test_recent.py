"""Tests for worker.recent: the persistent set of recent messageIds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.recent import RecentIds


def test_added_leaves_the_older_view_as_it_was() -> None:
    """Adding to a view returns a new view; the old one still sees exactly its own ids."""
    one = RecentIds({}, 0).added("a", 10, 0, 100)
    two = one.added("b", 11, 0, 100)
    assert one == {"a": 10}
    assert two == {"a": 10, "b": 11}
    assert "b" not in one


def test_adding_to_an_older_view_copies_it() -> None:
    """A view put back (a rollback) can take other ids without changing the newer view."""
    base = RecentIds({}, 0).added("a", 10, 0, 100)
    newer = base.added("b", 11, 0, 100)
    other = base.added("c", 12, 0, 100)
    assert newer == {"a": 10, "b": 11}
    assert other == {"a": 10, "c": 12}


def test_cutoff_hides_old_ids_and_never_moves_back() -> None:
    """Ids older than the cutoff are hidden; a lower cutoff later does not bring them back."""
    ids = RecentIds({}, 0).added("a", 10, 0, 100).added("b", 20, 15, 100)
    assert ids == {"b": 20}
    assert "a" not in ids
    assert ids.added("c", 12, 0, 100) == {"b": 20}  # 12 < 15: the cutoff stays at 15


def test_id_back_after_leaving_the_window_is_added_again() -> None:
    """An id hidden by the cutoff and sent again with a newer time is visible again."""
    ids = RecentIds({}, 0).added("a", 10, 0, 100).added("b", 30, 25, 100).added("a", 31, 25, 100)
    assert ids == {"b": 30, "a": 31}


def test_record_keeps_hidden_ids_with_the_cutoff() -> None:
    """to_record returns hidden ids and the cutoff; restored hides them again."""
    ids = RecentIds({}, 0).added("a", 10, 0, 100).added("b", 20, 15, 100)
    assert ids.to_record() == ({"a": 10, "b": 20}, 15)
    assert RecentIds.restored({"a": 10, "b": 20}, 15) == {"b": 20}
    assert RecentIds({}, 0).added("a", 10, 0, 100).to_record() == ({"a": 10}, None)


def test_equals_a_plain_dict_and_keeps_insertion_order() -> None:
    """A RecentIds compares equal to a dict with the same items and iterates oldest first."""
    ids = RecentIds.of({"x": 1, "y": 2}).added("z", 3, 0, 100)
    assert ids == {"x": 1, "y": 2, "z": 3}
    assert ids == {"x": 1, "y": 2, "z": 3}
    assert list(ids) == ["x", "y", "z"]
    assert ids.as_dict() == {"x": 1, "y": 2, "z": 3}
    assert len(ids) == 3
    assert ids["y"] == 2


_OPS = st.lists(
    st.tuples(st.integers(0, 5), st.sampled_from("abcdefghij"), st.integers(0, 100)),
    max_size=60,
)


@given(_OPS, st.integers(0, 40))
def test_views_behave_as_values(ops: list[tuple[int, str, int]], window: int) -> None:
    """Any sequence of adds to any earlier view matches a copy-on-write dict model."""
    views = [RecentIds({}, 0)]
    models: list[tuple[dict[str, int], int]] = [({}, -(2**63))]
    for pick, mid, ms in ops:
        index = pick % len(views)
        view, (model, cutoff) = views[index], models[index]
        if mid in model:
            continue  # a duplicate: merge_call never adds it
        cutoff = max(cutoff, max([ms, *model.values()]) - window)
        new_model = {m: t for m, t in model.items() if t >= cutoff}
        if ms >= cutoff:
            new_model[mid] = ms
        views.append(view.added(mid, ms, max([ms, *model.values()]) - window, 10_000))
        models.append((new_model, cutoff))
    for view, (model, _) in zip(views, models, strict=True):
        assert view == model
        assert all(m in view for m in model)
        ids, since = view.to_record()
        assert RecentIds.restored(dict(ids), since) == model


def test_limit_keeps_the_newest_ids_by_event_time() -> None:
    """Past the limit the set keeps about ``limit`` ids, the newest by event time."""
    ids = RecentIds({}, 0)
    for n in range(200):
        ids = ids.added(f"m{n}", 1000 - n if n % 2 else 1000 + n, 0, 50)
    assert 50 <= len(ids) <= 50 + 50 // 4
    kept = sorted(ids.values())
    dropped = [
        ms for n in range(200) for ms in [1000 - n if n % 2 else 1000 + n] if f"m{n}" not in ids
    ]
    assert max(dropped) <= min(kept)
