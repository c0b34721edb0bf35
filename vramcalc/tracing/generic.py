"""The trace of an architecture vramcalc has no formulas for: whatever ``AutoModelForCausalLM.from_config`` builds
from the config.json itself (issue 13 item 3).

The model is the one transformers builds from the config dict (meta, then fake CPU tensors, as ``build.py`` does for
every family), trained by the same HF step (``step.StepTracer``) under the same tracker. Every tensor term is traced;
nothing comes from a formula. The parameter counts in ``details`` are those of the built model (``sum(p.numel())``
over unique parameters). ``runtime_overhead`` and ``allocator_slack`` are modelled as in every trace.

The engine takes a ``ModelSpec`` (progress bar, ``resolve_setup``'s option checks, the runtime terms); a family with
no formulas has none, so a Llama-shaped *stand-in* with the built model's hidden size, layer count and vocabulary
carries those. No figure of the stand-in reaches the output: tensor terms are traced, and the parameter counts,
trainable count and LoRA target modules are read from the built model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import VramcalcError
from ..model import ModelSpec
from ..options import Attention, Method, Sharding, Stack
from ..training_setup import ResolvedSetup, resolve_setup

_LORA_METHODS = (Method.LORA, Method.QLORA)


def no_formulas_note(family: str, params: int) -> str:
    """The line every output of such a trace carries."""
    return (f"vramcalc has no formulas for {family!r}: every tensor term is traced from the {params:,}-parameter model "
            "transformers builds from this config (runtime_overhead and allocator_slack are modelled, as in every "
            "trace)")


def hf_config_from_dict(config: dict, family: str):
    """transformers' config object for ``config`` (its own class and defaults: ``AutoConfig.for_model``)."""
    from transformers import AutoConfig

    from .build import _quiet

    fields = {key: value for key, value in config.items()
              if key not in ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version")}
    fields.update(use_cache=False)
    try:
        with _quiet():
            return AutoConfig.for_model(family, **fields)
    except (KeyError, ValueError) as err:  # a model_type transformers does not know (remote code on the Hub)
        raise VramcalcError(f"unsupported architecture {family!r}: vramcalc has no formulas for it and transformers "
                            f"has no class for it ({str(err).splitlines()[0]})") from None


def meta_model(hf_config, family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` on the meta device (no memory, no init kernels)."""
    from transformers import AutoModelForCausalLM

    from .build import _quiet

    try:
        with _quiet(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except Exception as err:  # transformers raises many types for configs it cannot build
        raise VramcalcError(f"transformers cannot build a causal LM from this {family!r} config: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def unique_parameters(model: nn.Module) -> list:
    """Each parameter once (a tied lm_head and embedding are one tensor), as ``model.parameters()`` yields them."""
    return list({id(p): p for p in model.parameters()}.values())


def parameter_count(model: nn.Module) -> int:
    """``sum(p.numel())`` over the model's unique parameters: the exact inventory of the built model."""
    return sum(p.numel() for p in unique_parameters(model))


def parameter_inventory(model: nn.Module) -> dict:
    """Parameter name, the decoder layer index written ``*`` -> its elements over all layers, each unique parameter
    once (``named_parameters`` drops a tied lm_head), in the model's order; the values sum to ``parameter_count``."""
    import re

    out: dict = {}
    for name, param in model.named_parameters():
        key = re.sub(r"\.\d+\.", ".*.", name)
        out[key] = out.get(key, 0) + param.numel()
    return out


def linear_module_names(model: nn.Module) -> tuple[str, ...]:
    """The leaf names peft's ``all-linear`` targets: every ``nn.Linear`` and transformers ``Conv1D`` (GPT-2's) but the
    output embedding (peft ``tuners/tuners_utils.py`` ``_maybe_include_all_linear_layers``, peft 0.21.2)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = [name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, Conv1D)) and module is not head]
    return tuple(dict.fromkeys(names))


def lora_modules(model: nn.Module, family: str, targets: tuple[str, ...]) -> tuple[str, ...]:
    """peft target_modules for ``--lora-targets``: ``qv`` is peft's default for the model_type
    (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``), ``all-linear`` every Linear/Conv1D but the head, a list
    names leaf modules of the built model."""
    linears = linear_module_names(model)
    if targets == ("qv",):
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        if family not in DEFAULTS:
            raise VramcalcError(f"peft has no default LoRA targets for {family!r}: give --lora-targets all-linear or "
                                f"a comma list of its linear layers: {', '.join(linears)}")
        return tuple(DEFAULTS[family])
    if targets == ("all-linear",):
        return linears
    known = set(linears) | {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [name for name in targets if name not in known]
    if unknown:
        raise VramcalcError(f"LoRA target {unknown[0]!r} is not a module of this {family!r} model; its linear layers: "
                            f"{', '.join(linears)}")
    return tuple(targets)


def stand_in_spec(model: nn.Module, hf_config, name: str) -> ModelSpec:
    """A Llama-shaped ModelSpec with the built model's hidden size, decoder layer count and vocabulary, for the
    engine's bookkeeping (see the module docstring); its own parameter formulas are never reported."""
    from ..hf_config import spec_from_config
    from .step import decoder_layers

    embedding = model.get_input_embeddings()
    hidden, vocab = embedding.embedding_dim, embedding.num_embeddings
    heads = getattr(hf_config, "num_attention_heads", None)
    heads = heads if isinstance(heads, int) and heads > 0 and hidden % heads == 0 else 1
    config = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 4 * hidden,
              "num_hidden_layers": len(decoder_layers(model)), "num_attention_heads": heads,
              "num_key_value_heads": heads, "head_dim": hidden // heads, "vocab_size": vocab,
              "max_position_embeddings": 2**30, "tie_word_embeddings": False}
    return spec_from_config(config, name=name)


def _check_traceable(resolved: ResolvedSetup) -> None:
    """One GPU, the plain HF step: data/tensor parallel engines and stacks read the family's layout."""
    setup = resolved.setup
    if setup.num_gpus > 1 or setup.sharding is not Sharding.NONE or getattr(setup, "tp", 1) > 1:
        raise VramcalcError("an architecture with no formulas is traced on one GPU: leave out --num-gpus, --sharding "
                            "and --tp")
    if setup.stack is not Stack.HF or setup.task.value != "sft":
        raise VramcalcError("an architecture with no formulas is traced with the transformers step only (--stack hf, "
                            "--task sft)")
    if setup.method not in (Method.FULL, *_LORA_METHODS):
        raise VramcalcError(f"an architecture with no formulas is traced for --method full, lora or qlora, not "
                            f"{setup.method.value}")


def trace_any(config: dict, family: str, name: str, *, gpu=None, progress: bool | None = None, **options):
    """``trace()`` of a config.json whose model_type has no formulas: the model ``AutoModelForCausalLM.from_config``
    builds, every tensor term traced, the parameter inventory counted on the built model."""
    from .build import build_model
    from .engine import run_trace

    hf_config = hf_config_from_dict(config, family)
    model = meta_model(hf_config, family)
    params = parameter_count(model)
    spec = stand_in_spec(model, hf_config, name)
    targets = options.pop("lora_targets", None)
    resolved = resolve_setup(spec, **options)
    _check_traceable(resolved)
    if resolved.setup.method in _LORA_METHODS:
        words = _target_names(targets)
        modules = lora_modules(model, family, words)
        setup = dataclasses.replace(resolved.setup, lora_targets=words)
        defaulted = tuple(name for name in resolved.defaulted if name != "lora_targets" or targets is None)
        resolved = dataclasses.replace(resolved, setup=setup, lora_modules=modules, defaulted=defaulted)
    notes = [no_formulas_note(family, params)]
    if resolved.attn_used is not Attention.EAGER and not getattr(model, "_supports_sdpa", False):
        # transformers refuses sdpa for such a class (modeling_utils.py ``_sdpa_can_dispatch``); from_config without
        # attn_implementation picks eager for it, as a user's training script would get
        notes.append(f"{type(model).__name__} has no SDPA attention in transformers: traced with eager attention")
        resolved = dataclasses.replace(resolved, attn_used=Attention.EAGER)
    resolved = dataclasses.replace(resolved, warnings=(*resolved.warnings, *notes))
    trainable: list[int] = []

    def builder(_spec, setup, fake_mode):
        built = build_model(_spec, setup, fake_mode, config=hf_config)
        trainable.append(sum(p.numel() for p in unique_parameters(built) if p.requires_grad))
        return built

    result = run_trace(spec, resolved, progress=progress, builder=builder)
    details = {"params": params, "active_params": params, "trainable_params": trainable[-1], "model_type": family,
               "formulas": "none", "traced_terms": "weights, gradients, optimizer_states, activations, logits, "
               "temporaries", "modelled_terms": "runtime_overhead, allocator_slack",
               "param_inventory": parameter_inventory(model), "trace_seconds": round(result.seconds, 3), "trace_peak_rss_bytes": result.peak_rss_bytes}
    return _breakdown(spec, resolved, result, gpu, details)


def _breakdown(spec: ModelSpec, resolved: ResolvedSetup, result, gpu, details: dict):
    """The traced tensor terms plus the runtime terms ``estimator.assemble_measured`` adds to every trace (one GPU,
    no engine: ``runtime_overhead_bytes(profile, gpu, 1, paged)``, ``allocator_slack_bytes(profile, peak)``).
    assemble_measured itself is not called: its other details (trainable count, step time) read the family's
    formulas, which the stand-in spec does not have."""
    import functools

    from ..breakdown import MemoryBreakdown
    from ..catalogue import get_gpu
    from ..setup_inputs import setup_inputs
    from ..options import Term
    from ..profiles import runtime_profile
    from ..terms import runtime

    device = get_gpu(gpu) if gpu is not None else None
    profile = runtime_profile(device, resolved.setup.cuda_context_mib)
    terms = {term: int(result.terms.get(term, 0)) for term in Term if term.is_tensor}
    peak_tensor = sum(terms.values())
    terms[Term.RUNTIME_OVERHEAD] = runtime.runtime_overhead_bytes(profile, device, 1, result.paged_bytes)
    terms[Term.ALLOCATOR_SLACK] = runtime.allocator_slack_bytes(profile, peak_tensor)
    details = {**details, "paged_optimizer_bytes": result.paged_bytes, "runtime_profile": profile.source}
    inputs = functools.partial(setup_inputs, spec, resolved, device)
    return MemoryBreakdown(spec.name, terms, result.phase, inputs, "trace", device, resolved.warnings, details)


def _target_names(targets) -> tuple[str, ...]:
    """``--lora-targets`` as words: ("qv",), ("all-linear",) or module names."""
    if targets is None:
        return ("qv",)
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = tuple(name.strip() for name in names if name and name.strip())
    if not names:
        raise VramcalcError("LoRA targets are empty; give qv, all-linear or a comma list of module names")
    if len(names) == 1 and names[0].lower() in ("qv", "all-linear"):
        return (names[0].lower(),)
    return names
