"""``--compile`` on a trace: each decoder layer through AOTAutograd with torch.compile's min-cut partitioner.

torch.compile changes memory through what AOTAutograd keeps for backward: it traces the layer's forward and backward
into one joint graph and ``min_cut_rematerialization_partition`` (``torch/_functorch/partitioners.py``) chooses the
forward values the backward graph receives (a min cut weighted by tensor size, recomputing cheap pointwise ops in
backward and never the matmuls). Inductor's code generation fuses kernels but does not change that set, so the
trace runs the real partitioner with inductor's own settings (its decomposition table,
``torch/_inductor/decomposition.py::select_decomp_table``, and ``compiler="inductor"``, as ``compile_fx`` passes them)
and executes the two graphs op by op (``make_boxed_func``): no C++ or Triton compiler is needed, and the graphs run
on the trace's fake tensors under the allocation tracker. One layer at a time, as torchtune
(``training.compile_model``: ``layer.compile()``) and torchtitan (``apply_compile``: per TransformerBlock) compile.

What the op-by-op execution does not reproduce: inductor's fused kernels allocate fewer forward transients (the
peak of a training step is where saved tensors are, so this moves the forward peak only).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten


def _boxed(graph_module, example_inputs):
    """The fw/bw "compiler": run the partitioned graph as it is, in the boxed calling convention that releases each
    input after its last use, as inductor's generated ``call(args)`` does (``args.clear()``, then ``del`` after a
    buffer's last use) and torch's own op-by-op backend does (``torch/_dynamo/backends/debugging.py::boxed_nop``:
    ``_BoxedCodeGen``, "used boxed call to discard inputs when they are no longer needed"). AOTAutograd hands the
    backward its saved tensors in a list it no longer holds (``runtime_wrappers.py``: ``ctx.maybe_clear_saved_tensors``
    then ``steal_args=True``), so a saved tensor dies at its last use inside the layer's backward graph: the MLP's
    recomputed outputs before the attention's backward. (``functorch.compile.make_boxed_func`` calls ``f(*args)``,
    whose argument tuple holds every input until the graph returns.)"""
    from torch.fx.graph import _BoxedCodeGen

    graph_module.graph.set_codegen(_BoxedCodeGen())
    graph_module.recompile()
    forward = graph_module.forward

    def run(args):
        return forward(args)

    run._boxed_call = True
    return run


def _compiler_options() -> dict:
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    return dict(fw_compiler=_boxed, bw_compiler=_boxed, decompositions=select_decomp_table(),
                partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"))


def _signature(leaves) -> tuple:
    """What a compiled graph is specialised on: each tensor's shape, dtype and requires_grad; other values as is."""
    return tuple((tuple(leaf.shape), leaf.dtype, leaf.requires_grad) if isinstance(leaf, torch.Tensor)
                 else ("const", repr(leaf)) for leaf in leaves)


@contextlib.contextmanager
def _quantized_constants_allowed():
    """AOTAutograd asserts that no fake parameter is a constant of the graph (``_dynamo/utils.py``
    ``assert_no_fake_params_or_buffers``, "worth having in case tracing introduced a fake tensor"); on a trace
    every weight is fake, and the quantized ones are constants on purpose."""
    import torch._dynamo.utils as dynamo_utils

    original = dynamo_utils.assert_no_fake_params_or_buffers
    dynamo_utils.assert_no_fake_params_or_buffers = lambda graph_module: None
    try:
        yield
    finally:
        dynamo_utils.assert_no_fake_params_or_buffers = original


def _quantized(param: torch.Tensor) -> bool:
    """A bitsandbytes Params4bit (``quant_state``) or Int8Params (``CB``/``SCB``)."""
    return getattr(param, "quant_state", None) is not None or hasattr(param, "SCB") or "bitsandbytes" in type(
        param).__module__


def _graph_tensors(layer: nn.Module) -> dict:
    """The layer's parameters and buffers by name: dynamo lifts both to graph inputs. A buffer left a constant of the
    graph (torchtune's RoPE ``cache`` inside each layer's attention) is deep-copied with the backward graph module
    (``runtime_wrappers.py`` ``get_or_compile``: ``copy.deepcopy(bw_module)``), which on a fake tensor reads its data
    pointer ("undefined behavior"): a corrupted heap at the trace's exit."""
    return {**dict(layer.named_buffers()), **dict(layer.named_parameters())}


def _structure(layer: nn.Module, names: list) -> tuple:
    """What a graph traced on ``layer`` depends on besides its inputs: the layer's class, its parameters and buffers
    and its attention kind (Gemma-2, Mistral-style sliding windows); a layer with quantized constants gets its own
    graph."""
    params = _graph_tensors(layer)
    attention = getattr(layer, "self_attn", None)
    kind = (getattr(layer, "attention_type", None), getattr(attention, "sliding_window", None),
            getattr(attention, "is_sliding", None))
    own = id(layer) if len(names) < len(params) else None
    return (type(layer).__name__, kind, own,
            tuple((name, tuple(params[name].shape), params[name].dtype, params[name].requires_grad) for name in names))


def _same(tensor):
    return tensor


def _private_copy(tensor: torch.Tensor) -> torch.Tensor:
    copy = tensor.detach().clone()
    return copy.requires_grad_(tensor.requires_grad) if tensor.is_floating_point() else copy


def compile_layer(layer: nn.Module, shared: dict | None = None) -> None:
    """Compile the layer's forward with AOTAutograd (one graph per input signature).

    ``shared``: a cache of graphs across the layers of a model: layers of one structure (the same parameter names,
    shapes and dtypes, the same attention kind) and without quantized constants share a graph, their parameters
    being its inputs, so a 80-layer model is traced and partitioned once per kind of layer, as dynamo reuses one
    compiled code object for every instance of a layer class.

    Parameters and buffers are graph inputs (the trainable ones' gradients are graph outputs); bitsandbytes'
    quantized weights are constants of the graph. The first call traces and partitions with every dispatch mode
    paused, on copies of its inputs (the tracker counts the step, not the tracing). Under checkpointing the compiled forward is what the
    checkpoint runs (and recomputes): transformers checkpoints inside the layer's ``forward``
    (``GradientCheckpointingLayer``), so the layer's ``_gradient_checkpointing_func`` gets the compiled forward, as
    torchtune compiles a layer after wrapping it for activation checkpointing.

    The graph is the layer's ``forward`` on its reparametrized module, not its ``__call__``: the layer's own module
    hooks run around the compiled call, as torch.compile leaves them outside an ``OptimizedModule``'s graph, so an
    FSDP2 unit (torchtitan's ``fully_shard`` on each compiled TransformerBlock) unshards and reshards eagerly and the
    graph gets the unsharded parameters (with ``functional_call`` the pre-forward hook ran inside the traced graph,
    and its in-place all-gather copy-out failed AOTAutograd's functionalization: --compile under FSDP could not be
    traced before session 35)."""
    from torch._functorch.aot_autograd import aot_function
    from torch.nn.utils.stateless import _reparametrize_module
    from torch.utils._python_dispatch import _disable_current_modes

    compiled: dict = shared if shared is not None else {}
    # plain parameters are graph inputs, as dynamo lifts them; bitsandbytes' quantized ones (Params4bit, Int8Params
    # carry their quantization state as attributes) stay on the module, constants of the graph
    names = [name for name, param in _graph_tensors(layer).items() if not _quantized(param)]
    checkpointing = getattr(layer, "gradient_checkpointing", False)
    structure = _structure(layer, names)

    def plain(*args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        # dynamo guards on the grad mode (its global state guard): reentrant checkpointing runs the forward under
        # no_grad and recomputes it with grad enabled, two graphs (aot_function alone would keep the first)
        key = (structure, spec, _signature(leaves), torch.is_grad_enabled())
        params = _graph_tensors(layer)
        if key not in compiled:
            constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]  # no tensor kept

            def graph(trainable, *tensors):
                values = list(constants)
                for i, tensor in zip(tensor_at, tensors):
                    values[i] = tensor
                call_args, call_kwargs = tree_unflatten(values, spec)
                with _reparametrize_module(layer, dict(zip(names, trainable)), tie_weights=False, strict=False):
                    return layer.forward(*call_args, **call_kwargs)

            with _disable_current_modes(), _quantized_constants_allowed(), _uncompiled(layer):
                function = aot_function(graph, **_compiler_options())
                # aot_function traces on its first call and keeps references to that call's inputs: trace it on
                # private copies, untracked, so the step's own tensors are not pinned by the compiler
                copies = [_private_copy(leaves[i]) for i in tensor_at]
                with torch.autograd.graph.saved_tensors_hooks(_same, _same):  # not a checkpoint's saved tensor
                    function([params[name] for name in names], *copies)
                compiled[key] = function
        return compiled[key]([params[name] for name in names], *[leaves[i] for i in tensor_at])

    if checkpointing:
        checkpoint_function = layer._gradient_checkpointing_func

        def checkpointed(function, *args, **kwargs):
            # transformers passes partial(forward, layer, **kwargs): run the compiled forward with those kwargs
            return checkpoint_function(functools.partial(plain, **function.keywords), *args, **kwargs)

        layer._gradient_checkpointing_func = checkpointed
    else:
        layer.forward = plain


def _fused(graph_module, example_inputs):
    """A graph run as inductor runs a fused reduction/pointwise graph: one kernel that allocates its outputs only.
    The graph executes with every dispatch mode paused (the tracker sees none of its op-by-op intermediates, which
    inductor keeps in registers), then each new output is allocated under the tracker (``empty_like``: values do
    not matter on fake tensors); an output that is one of the inputs (a saved input) is passed through. The inputs
    are released after the outputs exist: inductor's wrapper allocates a kernel's output buffers before the launch
    and frees an input after its last use (``del``); it writes an output into an input's buffer only for a donated
    buffer (``codegen/wrapper.py::can_reuse``), and AOTAutograd donates no saved tensor that aliases a forward input
    or output (``_aot_autograd/graph_compile.py::collect_fw_donated_buffer_idxs``), as the loss's logits do."""
    from functorch.compile import make_boxed_func
    from torch.utils._python_dispatch import _disable_current_modes

    run = make_boxed_func(graph_module.forward)

    def fused(args):
        inputs = {id(arg) for arg in args if isinstance(arg, torch.Tensor)}
        with _disable_current_modes():
            outputs = run(list(args))
        outputs = [out if not isinstance(out, torch.Tensor) or id(out) in inputs else torch.empty_like(out)
                   for out in outputs]
        args.clear()  # the boxed calling convention: the callee releases its inputs, here after the kernel
        return outputs

    fused._boxed_call = True
    return fused


def compile_loss(model: nn.Module) -> None:
    """The model's loss function (transformers ``ForCausalLMLoss``: ``logits.float()``, shifted labels,
    ``cross_entropy``) through AOTAutograd, as torch.compile compiles it inside the model's forward (Trainer's
    ``torch_compile`` compiles the whole forward, the loss included). One graph per logits shape; traced on private
    copies with every dispatch mode paused, like ``compile_layer``. Its partition keeps the 16-bit logits and two fp32
    values per row for backward, not the fp32 log_softmax (``terms/logits.py``); each of its two graphs runs as one
    fused kernel (``_fused``), as inductor generates a cross-entropy's forward and backward (``compiled_function``)."""
    model.loss_function = compiled_function(model.loss_function)


def compiled_function(function):
    """``torch.compile(function)`` for a loss called outside any model (torchtune's ``training.compile_loss``: a
    ``CEWithChunkedOutputLoss``'s ``compute_cross_entropy``, or a whole ``CrossEntropyLoss``): AOTAutograd with
    inductor's decompositions and partitioner, one graph per signature of its tensor arguments (the others are
    constants of the graph), traced on private copies with every dispatch mode paused, each of its two graphs run as
    one fused kernel (``_fused``); ``compile_loss`` compiles transformers' loss with it."""
    from torch._functorch.aot_autograd import aot_function
    from torch.utils._python_dispatch import _disable_current_modes

    graphs: dict = {}

    def compiled(*args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        key = (spec, _signature(leaves))
        if key not in graphs:
            constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]

            def graph(*tensors):
                values = list(constants)
                for i, tensor in zip(tensor_at, tensors):
                    values[i] = tensor
                call_args, call_kwargs = tree_unflatten(values, spec)
                return function(*call_args, **call_kwargs)

            with _disable_current_modes():
                traced = aot_function(graph, **{**_compiler_options(), "fw_compiler": _fused, "bw_compiler": _fused})
                with torch.autograd.graph.saved_tensors_hooks(_same, _same):
                    traced(*[_private_copy(leaves[i]) for i in tensor_at])
            graphs[key] = traced
        return graphs[key](*[leaves[i] for i in tensor_at])

    return compiled


@contextlib.contextmanager
def _uncompiled(layer: nn.Module):
    """While the graph is traced, the layer's own forward runs without checkpointing (the compiled forward is what
    the checkpoint runs) and without the instance ``forward`` that calls the compiled graph."""
    checkpointing = getattr(layer, "gradient_checkpointing", False)
    instance_forward = layer.__dict__.pop("forward", None)
    layer.gradient_checkpointing = False
    try:
        yield
    finally:
        layer.gradient_checkpointing = checkpointing
        if instance_forward is not None:
            layer.forward = instance_forward
