"""/version's ``members`` (an ensemble's, from the version tag ``ensemble.members`` register
sets) and ``compact_of`` (a compact model's parent version, tag ``compact.parent_version``).

The registered ensemble and compact model are served end to end in
tests/stages/register/test_ensemble_register.py and test_compact.py; here, what ``describe``
makes of the tags, including a tag it cannot read (or one register shortened), and what a
service following ``champion-compact`` does when register or a rollback deletes that alias
(the champion has no compact model): it keeps serving what it loaded and says why.
"""

from __future__ import annotations

import json

import mlflow
import pytest

from serving.model import (
    COMPACT_PARENT_TAG,
    MEMBERS_TAG,
    LoadedModel,
    ModelHolder,
    RegistryFollower,
)
from serving.payloads import ColumnSpec, InputSpec
from stages.register.compact_alias import PARENT_TAG
from stages.register.content import members_tags
from tests.serving.conftest import Registry

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


def test_a_shortened_members_tag_still_lists_every_member_by_name() -> None:
    many = [m | {"name": f"m{i}"} for i in range(60) for m in MEMBERS[:1]]
    tags = members_tags(many)

    described = loaded(tags).describe()

    assert [m["name"] for m in described["members"]] == [f"m{i}" for i in range(60)]
    assert "ensemble.members_note" in described["tags"]


def test_a_follower_keeps_serving_when_champion_compact_is_deleted(registry: Registry) -> None:
    alias = "champion-compact"
    registry.move_alias(2, alias)
    holder, errors = ModelHolder(), []
    follower = RegistryFollower(holder, registry.name, alias, on_error=errors.append)
    assert follower.check_once() is True and holder.current.version == "2"
    serving = holder.current

    mlflow.MlflowClient().delete_registered_model_alias(registry.name, alias)

    assert follower.check_once() is False  # no crash, nothing swapped
    assert holder.current is serving
    assert follower.unready == follower.last_error == errors[-1]
    assert follower.last_error.startswith(f"models:/{registry.name}@{alias} names no version now")
    assert follower.last_error.endswith(f"still serving v2 until {alias} is set again")
    assert serving.predict(registry.rows.head(2)).shape[0] == 2  # still answers
