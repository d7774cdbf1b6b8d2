import pytest

from hierarchy import InvalidNodePath, Level, NodeId, NodePath


def test_lineage_and_parent():
    p = NodePath("en/medical/radiology")
    assert [str(x) for x in p.lineage()] == ["en", "en/medical", "en/medical/radiology"]
    assert str(p.parent) == "en/medical"
    assert str(p.parent.parent.parent) == ""
    assert p.parent.parent.parent.is_root
    assert NodePath("en").is_ancestor_of(p)
    assert not NodePath("e").is_ancestor_of(p)  # prefix of a segment is not an ancestor
    assert NodePath.root().is_ancestor_of(p)


@pytest.mark.parametrize("bad", ["En", "en//medical", "en/", "/en", "en/med ical", "en/../x", "-en", "é"])
def test_bad_paths_rejected(bad):
    with pytest.raises(InvalidNodePath):
        NodePath(bad)


def test_node_id_roundtrip():
    nid = NodeId.parse("demo/en/medical")
    assert nid.tree == "demo" and str(nid.path) == "en/medical"
    assert str(nid) == "demo/en/medical"
    assert str(nid.parent.parent) == "demo" and nid.parent.parent.is_base
    with pytest.raises(InvalidNodePath):
        NodeId.parse("")
    with pytest.raises(InvalidNodePath):
        NodeId.parse("Demo/en")


def test_level_order_and_parse():
    assert Level.BASE.rank < Level.LANGUAGE.rank < Level.DOMAIN.rank < Level.SUBDOMAIN.rank
    assert Level.parse("Domain") is Level.DOMAIN
    with pytest.raises(ValueError, match="unknown level"):
        Level.parse("planet")
