"""Vision-language models (issue 13 item 4): the tower's parameter inventory, image tokens, --vision, and the errors."""

import pytest

import vramcalc
from vramcalc.errors import VramcalcError
from vramcalc.hf_config import spec_from_config
from tests.tiny_vlms import TINY_VLM


def _spec(name: str):
    return spec_from_config(TINY_VLM[name], name=f"tiny-{name}")


@pytest.mark.parametrize("name", sorted(TINY_VLM))
def test_vlm_parameter_count_equals_the_meta_built_model(name):
    pytest.importorskip("transformers")
    from tests.tiny_vlms import meta_vlm_param_count

    assert _spec(name).params == meta_vlm_param_count(TINY_VLM[name])


def test_vlm_ties_lm_head_by_the_outer_config():
    # transformers 5.25 ties by the outer tie_word_embeddings (a meta-built SmolVLM ignores text_config's): the
    # idefics3 tiny config sets it, smolvlm's class default (False) and gemma3's (True) apply otherwise
    assert _spec("idefics3").tie_word_embeddings and not _spec("smolvlm").tie_word_embeddings
    assert _spec("gemma3").tie_word_embeddings


@pytest.mark.parametrize("name, tokens", [("smolvlm", 64 // 4), ("gemma3", 16)])
def test_image_tokens_per_tile_follow_the_config(name, tokens):
    # smolvlm: (64 / 8)^2 patches / scale_factor^2 (SmolVLMModel.image_seq_len); gemma3: mm_tokens_per_image
    assert _spec(name).vision.tokens_per_tile == tokens


def test_a_large_image_is_split_into_tiles_plus_a_global_view():
    vision = _spec("smolvlm").vision  # 64-pixel tiles
    assert vision.tiles(64) == 1 and vision.tiles(65) == 2 * 2 + 1 and vision.tiles(150) == 3 * 3 + 1
    assert _spec("gemma3").vision.tiles(1000) == 1  # Gemma-3 resizes every image to its tile


def test_image_tokens_are_part_of_the_sequence_not_added_to_it():
    spec = _spec("smolvlm")
    with_images = vramcalc.estimate(spec, method="lora", vision="frozen", images=2, seq_len=256)
    text = vramcalc.estimate(spec, method="lora", seq_len=256)
    assert with_images.details["image_tokens_per_sample"] == 32
    # a frozen tower saves nothing: the language model's activations are the text model's at the same seq_len, plus
    # the batch's fp32 pixel values: 2 tiles x 4 bytes x 3 channels x 64 x 64 pixels
    assert with_images.terms()["activations"] - text.terms()["activations"] == 2 * 4 * 3 * 64 * 64
    assert with_images.details["vision_activations_bytes"] == 0


@pytest.mark.parametrize("name", ["smolvlm", "gemma3"])
def test_training_the_tower_adds_its_saved_activations(name):
    spec = _spec(name)
    frozen = vramcalc.estimate(spec, method="full", vision="frozen", images=2, seq_len=256)
    full = vramcalc.estimate(spec, method="full", images=2, seq_len=256)
    lora = vramcalc.estimate(spec, method="lora", images=2, seq_len=256)
    assert full.details["vision_activations_bytes"] > lora.details["vision_activations_bytes"] > 0
    assert full.details["trainable_params"] == spec.params
    assert frozen.details["trainable_params"] == spec.params - spec.vision.params
    assert full.inputs["vision"] == "full" and lora.inputs["vision"] == "lora" and full.inputs["images"] == 2


@pytest.mark.parametrize("options, message", [
    (dict(images=1, seq_len=8), "shorter than the image tokens"),
    (dict(image_size=100), "need --images"),
    (dict(images=1, method="qlora"), "full or lora"),
    (dict(images=1, vision="lora"), "needs --method lora"),
    (dict(images=1, method="lora", vision="full"), "needs --method full"),
    (dict(images=1, image_size=64, image_tokens=16), "not both"),
    (dict(images=1, image_tokens=10), "not a multiple"),
    (dict(images=1, precision="mixed-bf16"), "not modelled yet"),
    (dict(images=-1), "number of images"),
])
def test_bad_image_options_give_one_line(options, message):
    with pytest.raises(VramcalcError, match=message) as err:
        vramcalc.estimate(_spec("smolvlm"), **options)
    assert "\n" not in str(err.value)


def test_images_on_a_text_only_model_is_an_error():
    with pytest.raises(VramcalcError, match="text-only"):
        vramcalc.estimate("llama-3.1-8b", images=1)


def test_text_only_estimates_ignore_the_image_options_left_at_their_defaults():
    b = vramcalc.estimate("llama-3.1-8b")
    assert b.inputs["images"] == 0 and b.inputs["vision"] is None and "image_tokens_per_sample" not in b.details
