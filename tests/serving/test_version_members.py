"""/version's ``members`` (an ensemble's, from the version tag ``ensemble.members`` register
sets) and ``compact_of`` (a compact model's parent version, tag ``compact.parent_version``).

The registered ensemble and compact model are served end to end in
tests/stages/register/test_ensemble_register.py and test_compact.py; here, what ``describe``
makes of the tags, including a tag it cannot read.
"""

from __future__ import annotations

import json

import pytest

from serving.model import COMPACT_PARENT_TAG, MEMBERS_TAG, LoadedModel
from serving.payloads import ColumnSpec, InputSpec
from stages.register.compact import PARENT_TAG

MEMBERS = [
    {"name": "train", "source": "train", "family": "mlp", "sha256": "a" * 64},
    {"name": "gbdt", "source": "family:gbdt", "family": "gbdt", "sha256": "b" * 64},
]


def loaded(tags: dict[str, str]) -> LoadedModel:
    return LoadedModel(
        uri="models:/clf/3",
        variant="pyfunc",
        spec=InputSpec((ColumnSpec("x", "float"),)),
        output_columns=("prediction",),
        predictor=lambda frame: frame,
        name="clf",
        version="3",
        tags=tags,
    )


def test_the_tag_names_are_the_ones_register_sets() -> None:
    assert PARENT_TAG == COMPACT_PARENT_TAG == "compact.parent_version"
    assert MEMBERS_TAG == "ensemble.members"


def test_version_lists_an_ensembles_members_and_a_compacts_parent() -> None:
    ensemble = loaded({MEMBERS_TAG: json.dumps(MEMBERS), "ensemble.method": "caruana"})
    compact = loaded({COMPACT_PARENT_TAG: "2", "compact.method": "quantize"})
    single = loaded({"git.commit": "0123abc"})

    assert ensemble.describe()["members"] == MEMBERS
    assert ensemble.describe()["compact_of"] is None
    assert compact.describe()["compact_of"] == "2" and compact.describe()["members"] is None
    assert (single.describe()["members"], single.describe()["compact_of"]) == (None, None)
    assert ensemble.describe()["tags"]["ensemble.method"] == "caruana"  # the tags as before


@pytest.mark.parametrize("raw", ["not json [", '{"name": "train"}'])
def test_an_unreadable_members_tag_shows_none_not_an_error(raw: str) -> None:
    described = loaded({MEMBERS_TAG: raw}).describe()

    assert described["members"] is None
    assert described["tags"][MEMBERS_TAG] == raw  # still there, as written
