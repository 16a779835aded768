import openai
import pytest

from tests.conftest import TINY


def test_list_models_shows_models_on_disk(tiny_client):
    models = tiny_client.models.list().data
    assert [m.id for m in models] == [TINY]
    assert models[0].object == "model"
    assert models[0].owned_by and models[0].created > 0


def test_retrieve_one_model(tiny_client):
    assert tiny_client.models.retrieve(TINY).id == TINY


def test_unknown_model_is_404(tiny_client):
    with pytest.raises(openai.NotFoundError) as err:
        tiny_client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found"
