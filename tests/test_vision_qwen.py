"""Qwen2.5-VL (issue 13 item 4): the tower's inventory, the image grid the processor makes, windows, and --vision."""

import pytest

import vramcalc
from vramcalc.errors import VramcalcError
from vramcalc.hf_config import spec_from_config
from vramcalc.vision_qwen import image_grid, smart_resize, tokens_per_image, window_lengths
from tests.tiny_vlms import TINY_VLM


def _spec(name: str = "qwen2_5_vl"):
    return spec_from_config(TINY_VLM[name], name=f"tiny-{name}")


def test_the_default_config_counts_what_transformers_builds():
    # Qwen2_5_VLConfig() with its class defaults (a 72B-shaped language model, a 3584-wide 32-block tower):
    # sum(p.numel()) of the meta-built Qwen2_5_VLForConditionalGeneration
    pytest.importorskip("transformers")
    from tests.tiny_vlms import meta_vlm_param_count

    config = {"model_type": "qwen2_5_vl"}
    assert spec_from_config(config).params == meta_vlm_param_count(config) == 75_789_228_800


def test_a_flat_hub_config_is_read_as_its_language_model_and_tower():
    spec = _spec("qwen2_5_vl-flat")  # text fields at the top level, as the Hub's config.json files
    assert (spec.family, spec.hidden_size, spec.num_layers, spec.vocab_size) == ("qwen2", 128, 2, 1024)
    assert spec.tie_word_embeddings and spec.vision.num_layers == 3 and spec.vision.full_attention_blocks == (2,)


@pytest.mark.parametrize("size", [28, 56, 100, 224, 448, 500, 1000, 1024, 2000, 4000])
def test_smart_resize_is_the_processors(size):
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference  # (PIL backend)

    assert smart_resize(size, size, 28) == reference(size, size, factor=28)
    assert transformers  # the processor's defaults: 56·56 .. 28·28·1280 pixels


def test_image_tokens_follow_the_grid():
    vision = _spec().vision
    assert tokens_per_image(vision, 448) == (448 // 14) ** 2 // 4 == 256
    assert tokens_per_image(vision, 4000) == 1225  # capped by max_pixels 28·28·1280: a 980 x 980 image, 35 x 35 tokens
    assert tokens_per_image(vision, image_tokens=48) == 48 and image_grid(vision, image_tokens=48) == (12, 16)
    assert tokens_per_image(vision) == 256  # no size given: the 448 px default


@pytest.mark.parametrize("grid", [(8, 8), (16, 16), (12, 20), (6, 10), (64, 36)])
def test_window_lengths_are_the_models(grid):
    pytest.importorskip("transformers")
    import torch
    from transformers.vision_utils import get_vision_window_index

    for vision in (_spec().vision, _spec("qwen2_5_vl-flat").vision):  # windows of 56 and of 112 pixels
        _, cu = get_vision_window_index(torch.tensor([[1, *grid]]), spatial_merge_size=2,
                                        window_size=vision.window_size, patch_size=14)
        assert list(window_lengths(vision, *grid)) == (cu[1:] - cu[:-1]).tolist()


def test_the_default_lora_targets_leave_the_tower_frozen():
    # q_proj/v_proj do not match the tower's fused attn.qkv (peft matches module-name suffixes): only all-linear or
    # the MLP names reach it
    spec = _spec()
    qv = vramcalc.estimate(spec, method="lora", images=1, image_size=224, seq_len=128)
    mlp = vramcalc.estimate(spec, method="lora", images=1, image_size=224, seq_len=128,
                            lora_targets="gate_proj,up_proj,down_proj")
    every = vramcalc.estimate(spec, method="lora", images=1, image_size=224, seq_len=128, lora_targets="all-linear")
    assert qv.details["vision_activations_bytes"] == 0
    assert every.details["vision_activations_bytes"] > mlp.details["vision_activations_bytes"] > 0


def test_training_the_tower_saves_more_than_adapting_it():
    spec = _spec()
    full = vramcalc.estimate(spec, images=2, image_size=224, seq_len=160)
    frozen = vramcalc.estimate(spec, images=2, image_size=224, seq_len=160, vision="frozen")
    lora = vramcalc.estimate(spec, method="lora", lora_targets="all-linear", images=2, image_size=224, seq_len=160)
    assert full.details["vision_activations_bytes"] > lora.details["vision_activations_bytes"] > 0
    assert frozen.details["vision_activations_bytes"] == 0
    assert full.details["image_tokens_per_sample"] == 2 * 64


def test_images_that_do_not_fit_the_sequence_are_refused():
    with pytest.raises(VramcalcError, match="shorter than the image tokens"):
        vramcalc.estimate(_spec(), images=2, image_size=448, seq_len=256)  # 2 x 256 tokens
