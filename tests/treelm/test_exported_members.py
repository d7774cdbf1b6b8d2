"""The SDK's public surface is exactly what treelm/__init__.py exports."""

from __future__ import annotations

import treelm


def test_all_lists_exactly_the_public_names():
    public = {name for name in dir(treelm) if not name.startswith("_")}
    # Sub-modules are private (_client, _errors, ...): nothing else leaks.
    assert set(treelm.__all__) - {"__version__"} == public
    assert len(treelm.__all__) == len(set(treelm.__all__))
    assert treelm.__all__ == sorted(treelm.__all__)


def test_exported_members_are_documented_and_come_from_the_package():
    for name in treelm.__all__:
        if name == "__version__":
            continue
        member = getattr(treelm, name)
        assert member.__module__.startswith("treelm."), name
        assert (member.__doc__ or "").strip(), f"{name} has no docstring"


def test_error_tree_is_rooted_in_treelm_error():
    errors = [getattr(treelm, n) for n in treelm.__all__ if isinstance(getattr(treelm, n), type)]
    errors = [e for e in errors if issubclass(e, Exception)]
    assert {e.__name__ for e in errors} >= {
        "NodeNotFound",
        "PermissionDenied",
        "Unauthenticated",
        "InvalidRequest",
        "Overloaded",
        "DeadlineExceeded",
        "Unavailable",
        "Unimplemented",
        "ServerError",
    }
    assert all(issubclass(e, treelm.TreeLMError) for e in errors)
    # The module docstring draws the tree: every error is named in it.
    from treelm import _errors

    for e in errors:
        assert e.__name__ in _errors.__doc__
