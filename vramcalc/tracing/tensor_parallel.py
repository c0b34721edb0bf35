"""One rank of a tensor-parallel job, traced through transformers' own ``tp_plan="auto"`` path on a fake process group.

``from_pretrained(..., tp_plan="auto")`` (transformers 5.25.0) builds the model on meta, then
``PreTrainedModel.maybe_distribute_model`` (distributed/mixin.py:304-343) resolves the family's plan
(``_resolve_parallel_plans``: ``base_model_tp_plan`` + ``embed_tokens: embedding_rowwise`` + the causal LM's ``lm_head``
entry, expanded per layer) and ``apply_tensor_parallelism`` (distributed/tensor_parallel.py:751-781) turns every
planned parameter into a DTensor placeholder (``distribute_tensor(meta, mesh, [Shard(d)], src_data_rank=None)``) and
installs each style's forward. The trace calls the same two functions on the meta model, with the mesh
``initialize_distributed_mesh`` (distributed/utils.py:313-346) builds on the fake group (``tracing/distributed.py``
``process_group``: a ``FakeProcessGroup`` of ``--num-gpus`` ranks whose collectives complete at once and move no
data), before peft and before the tensors are materialised, as ``from_pretrained`` orders it. The step then runs on
the DTensors as a real rank would: local shards in the matmuls, the all-reduces' and all-gather's outputs allocated.

One departure: peft 0.21.2 builds the LoRA ``lora_A`` of a rowwise (o_proj, down_proj) layer with the *local*
``in_features`` (tuners_utils.py:186: ``out_features, in_features = module.weight.to_local().shape``) and shards it as
a rowwise DTensor whose global width is the base layer's, while transformers' ``RowwiseParallel`` reads the module's
``in_features`` as the global width of its input (tensor_parallel.py:324-326): the first forward fails with a shape
error. ``fix_rowwise_lora_width`` sets those modules' ``in_features`` to their weight's global width, as the fixed stack
would compute; the memory is that of the intended computation.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import VramcalcError


def distribute(model: nn.Module, tp: int) -> nn.Module:
    """transformers' ``tp_plan="auto"`` on a meta-built model: DTensor parameters and TP forwards."""
    from transformers.distributed.configuration_utils import DistributedConfig
    from transformers.distributed.utils import initialize_distributed_mesh

    config = DistributedConfig(tp_size=tp)
    try:
        _, mesh_manager = initialize_distributed_mesh(config)
    except RuntimeError as err:  # the world size is not tp (a data-parallel dimension is not traced)
        raise VramcalcError(f"tensor parallelism cannot be traced here: {err}".splitlines()[0]) from None
    return type(model).maybe_distribute_model(model, config, mesh_manager)


def fix_rowwise_lora_width(model: nn.Module) -> int:
    """Give every rowwise-sharded LoRA ``lora_A`` its global input width (module docstring); returns how many."""
    from torch.distributed.tensor import DTensor

    fixed = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (".lora_A." in f".{name}." and isinstance(module, nn.Linear) and isinstance(weight, DTensor)
                and weight.shape[1] != module.in_features):
            module.in_features = weight.shape[1]
            fixed += 1
    return fixed


def split_dtensor_groups(groups: list[dict]) -> list[dict]:
    """Each optimizer group split by device mesh, DTensor parameters apart from plain ones, as Trainer does when they
    mix (transformers 5.25.0 trainer.py:1302-1313, ``has_mixed_dtensor``): peft makes only the sharded LoRA factor a
    DTensor (lora_B of a colwise layer, lora_A of a rowwise one), and torch's fused and foreach AdamW refuse a mixed
    list ("got mixed torch.Tensor and DTensor")."""
    from torch.distributed.tensor import DTensor

    out = []
    for group in groups:
        for wanted in (True, False):
            params = [p for p in group["params"] if isinstance(p, DTensor) is wanted]
            if params:
                out.append({**group, "params": params})
    return out


def check_traceable(spec, resolved) -> None:
    """The tensor-parallel setups the trace runs: one tensor-parallel group (no data-parallel dimension), untied
    embeddings (``apply_tensor_parallelism`` looks ``lm_head.weight`` up in ``named_parameters()``, which lists a tied
    weight once, under the embedding: a KeyError on the meta-built model, tensor_parallel.py:771-774)."""
    setup = resolved.setup
    if spec.tie_word_embeddings:
        raise VramcalcError(f"--tp on {spec.name} (tied embeddings) is estimated, not traced: transformers' "
                            "apply_tensor_parallelism does not find the tied lm_head.weight on a model built from "
                            "its config")
    if setup.num_gpus != setup.tp:
        raise VramcalcError(f"--tp {setup.tp} with {setup.num_gpus // setup.tp} data-parallel ranks is estimated, "
                            f"not traced: the trace runs one tensor-parallel group (--num-gpus {setup.tp})")
    if setup.tp_plan.value == "torchtitan" and setup.precision.value == "fp8":
        raise VramcalcError("--tp-plan torchtitan with --precision fp8 is estimated, not traced (torchao's Float8 "
                            "parallel styles are not applied by the trace)")


# -- torchtitan's plan (--tp-plan torchtitan) ----------------------------------------------------------------------
def distribute_torchtitan(model: nn.Module, tp: int) -> nn.Module:
    """torchtitan 9dec370's ``apply_tp`` (``parallelisms/parallelize_llama.py``) on the meta-built transformers model,
    with torch's own parallel styles on the tp mesh of the fake group, module for module: ``tok_embeddings`` ->
    ``embed_tokens`` (``RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))``), the final ``norm``
    (``SequenceParallel``), ``output`` -> ``lm_head`` (``ColwiseParallel(input_layouts=Shard(1),
    output_layouts=Shard(-1), use_local_output=False)``: loss parallel), and in every block ``attention_norm`` ->
    ``input_layernorm`` and ``ffn_norm`` -> ``post_attention_layernorm`` (``SequenceParallel``), ``attention`` ->
    ``self_attn`` and ``feed_forward`` -> ``mlp`` (``PrepareModuleInput``: ``Shard(1)`` all-gathered to
    ``Replicate``; transformers passes the attention's input as the keyword ``hidden_states``), ``wq``/``wk``/``wv``
    -> ``q_proj``/``k_proj``/``v_proj`` and ``w1``/``w3`` -> ``gate_proj``/``up_proj`` (``ColwiseParallel``),
    ``wo`` -> ``o_proj`` and ``w2`` -> ``down_proj`` (``RowwiseParallel(output_layouts=Shard(1))``: reduce-scattered
    onto the sequence). The loss runs under ``loss_parallel()`` (``torchtitan_loss_parallel``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # the mesh's rank table is a real tensor
        mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
    base = model.model
    parallelize_module(base, mesh, {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
    })
    parallelize_module(model, mesh, {
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    for layer in base.layers:
        parallelize_module(layer, mesh, {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
    return model


def sequence_parallel_tracer(base):
    """``base`` (a ``StepTracer`` class) run as torchtitan runs ``distribute_torchtitan``'s model: every micro-batch,
    forward and backward, inside torch's ``loss_parallel()`` (torchtitan ``utils.get_train_context``:
    ``loss_parallel_enabled`` is on with TP unless ``training.disable_loss_parallel``), so the cross-entropy on the
    ``Shard(-1)`` logits runs DTensor's loss-parallel handlers (``tensor/parallel/loss.py``). torchtitan's model
    attends with ``F.scaled_dot_product_attention(..., is_causal=True)`` and no mask and takes its rotary table for
    the whole sequence; transformers' model derives its mask and positions from the embedding output, which is the
    rank's [b, s/T, h] shard here: the tracer passes the sequence's position ids and drops the mask for
    ``is_causal=True`` (accelerate's ``_attach_context_parallel_hooks``, the same substitution)."""

    class SequenceParallelTracer(base):
        def run(self, steps: int = 2, progress=None) -> None:
            from accelerate.big_modeling import _attach_context_parallel_hooks

            _attach_context_parallel_hooks(self.model)
            outer = self.accumulation
            self.accumulation = lambda last: _loss_parallel(outer(last))
            super().run(steps, progress)

        def _loss(self, input_ids, position_ids=None):
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1])[None]
            return super()._loss(input_ids, position_ids)

    SequenceParallelTracer.__name__ = f"SequenceParallel{base.__name__}"
    return SequenceParallelTracer


@contextlib.contextmanager
def _loss_parallel(synchronised):
    from torch.distributed.tensor.parallel import loss_parallel

    with synchronised, loss_parallel():
        yield
