"""Llama-3.2-Vision (``mllama``, issue 13 item 4): the parameter inventory, tiles, and what the images cost."""

import pytest

import vramcalc
from vramcalc.errors import VramcalcError
from vramcalc.hf_config import spec_from_config
from tests.tiny_mllama import LLAMA_32_11B_VISION, TINY_MLLAMA


def _spec(config=TINY_MLLAMA):
    return spec_from_config(config, name="tiny-mllama")


@pytest.mark.parametrize("config", [TINY_MLLAMA, LLAMA_32_11B_VISION], ids=["tiny", "11b"])
def test_mllama_parameter_count_equals_the_meta_built_model(config):
    pytest.importorskip("transformers")
    from tests.tiny_vlms import meta_vlm_param_count

    assert _spec(config).params == meta_vlm_param_count(config)


def test_the_language_model_is_read_as_llama_without_its_cross_attention_layers():
    spec = _spec(LLAMA_32_11B_VISION)
    assert spec.family == "llama" and spec.num_layers == 40 - 8 and not spec.tie_word_embeddings
    assert spec.vision.cross_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    # 1601 patches and the class token per 560-px tile of 14-px patches (MllamaVisionModel.num_patches)
    assert spec.vision.patches == 40 * 40 + 1 and spec.vision.padded_patches == 1608


def test_every_image_is_padded_to_max_num_tiles_whatever_its_size():
    vision = _spec(LLAMA_32_11B_VISION).vision
    # pad_batches_and_tiles: pixel_values is [b, images, max_image_tiles, ...]; the aspect-ratio mask says which hold
    # the image: a square image that fits one 560-px tile uses 1, a larger one the 2 x 2 canvas
    assert vision.tiles(100) == vision.tiles(2000) == vision.tiles() == 4
    assert vision.valid_tiles(560) == 1 and vision.valid_tiles(561) == 4 and vision.valid_tiles(5000) == 4


def test_image_size_changes_no_estimate():
    spec = _spec()
    small = vramcalc.estimate(spec, method="lora", images=1, image_size=16, seq_len=128)
    large = vramcalc.estimate(spec, method="lora", images=1, image_size=4000, seq_len=128)
    assert small.peak_tensor_bytes == large.peak_tensor_bytes


def test_image_tokens_do_not_apply_to_mllama():
    with pytest.raises(VramcalcError, match="cross-attention") as err:
        vramcalc.estimate(_spec(), images=1, image_tokens=64)
    assert "\n" not in str(err.value)


def test_images_cost_cross_attention_activations_even_with_a_frozen_tower():
    spec = _spec()
    text = vramcalc.estimate(spec, method="lora", seq_len=256)
    frozen = vramcalc.estimate(spec, method="lora", vision="frozen", images=2, seq_len=256)
    assert frozen.details["vision_activations_bytes"] == 0
    assert frozen.terms()["activations"] > text.terms()["activations"]


def test_checkpointing_makes_a_frozen_tower_save_for_its_input_gradient():
    # gradient_checkpointing_enable -> enable_input_require_grads hooks MllamaVisionModel.patch_embedding too
    spec = _spec()
    plain = vramcalc.estimate(spec, method="lora", vision="frozen", images=2, seq_len=256)
    ckpt = vramcalc.estimate(spec, method="lora", vision="frozen", images=2, seq_len=256, grad_ckpt=True)
    assert plain.details["vision_activations_bytes"] == 0 < ckpt.details["vision_activations_bytes"]


def test_training_the_tower_trains_its_parameters_only():
    spec = _spec()
    full = vramcalc.estimate(spec, method="full", images=1, seq_len=128)
    frozen = vramcalc.estimate(spec, method="full", vision="frozen", images=1, seq_len=128)
    assert full.details["trainable_params"] == spec.params
    assert frozen.details["trainable_params"] == spec.params - spec.vision.tower_params
