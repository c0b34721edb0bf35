"""``--device-map auto``: the model split layer by layer across ``num_gpus`` GPUs, no data parallelism.

``from_pretrained(device_map="auto")`` in transformers 5.25.0 computes the map with its own copies of accelerate's
functions (``transformers/integrations/accelerate.py``; accelerate 1.16.0 ``utils/modeling.py`` has the originals):

1. ``_get_device_map`` (accelerate.py:340-378): ``no_split_module_classes = model._no_split_modules`` (the family's
   decoder layer class, e.g. ``LlamaDecoderLayer``, modeling_llama.py:323), then
   ``get_balanced_memory`` and ``infer_auto_device_map``; a quantizer first shrinks every budget to 90 %
   (``Bnb4BitHfQuantizer.adjust_max_memory``, quantizer_bnb_4bit.py:89-92).
2. ``get_balanced_memory`` (accelerate.py:242-337): module sizes count parameters and buffers as loaded
   (``compute_module_sizes``, accelerate.py:144-192: the tied ``lm_head.weight`` is not counted; a 4-bit weight
   counts 0.5 byte per element, ``quantized_element_size``), then every GPU but the last gets
   ``per_gpu = total // n + int(1.25 · max(largest decoder layer, largest leaf module))`` (the largest leaf is
   usually the embedding); the last GPU keeps its whole memory "just in case the buffer is not enough".
3. ``infer_auto_device_map`` (accelerate.py:644-949): walks the top-level children in order (``model`` then
   ``lm_head``), splitting any module that does not fit the current device into its children (never a decoder
   layer), and moves to the next device when a module does not fit. On GPU 0 (a "main device") the budget is
   reduced by the largest layer still to place (``get_max_layer_size``, accelerate 1.16.0 utils/modeling.py:729-765),
   the room to bring back an offloaded layer. A module tied to another (the embedding and a tied lm_head) is placed
   together with it: a tied lm_head goes to GPU 0 with the embedding (``get_module_size_with_ties``,
   accelerate.py:62-92), so the logits and the loss are computed on GPU 0.

``place`` transcribes that walk over a tree of module sizes built from vramcalc's parameter inventory
(``module_tree``); ``tests/test_device_map.py`` checks it against transformers' own ``_get_device_map`` on meta
models. Without a named GPU every budget is unlimited, so the balanced share alone decides (with a GPU too small for
its share, the real map caps it at the GPU's memory: the estimate then does not fit anyway).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import VramcalcError
from ..model import ModelSpec, ParamKind
from ..options import Method, Precision, Quant

UNLIMITED_BYTES = float("inf")
BALANCE_BUFFER_FACTOR = 1.25  # transformers/integrations/accelerate.py:321 ``buffer = int(1.25 * max(...))``
QUANTIZER_MEMORY_FRACTION = 0.90  # quantizer_bnb_4bit.py:91 / quantizer_bnb_8bit.py ``adjust_max_memory``
QUANTIZED_ELEMENT_BYTES = {Quant.NF4: 0.5, Quant.FP4: 0.5, Quant.INT8: 1.0}  # ``quantized_element_size``


@dataclass(frozen=True)
class ModuleNode:
    """One nn.Module as the device-map walk sees it: its own tensors' bytes (``(name, bytes)``, parameters first,
    then buffers), its children in ``named_children`` order, and whether it may be split (a decoder layer may not)."""

    name: str
    tensors: tuple[tuple[str, float], ...] = ()
    children: tuple["ModuleNode", ...] = ()
    no_split: bool = False


def _bytes_per_element(precision: Precision, keep_fp32: bool) -> int:
    return 4 if keep_fp32 else precision.param_dtype.bytes


def module_tree(spec: ModelSpec, precision: Precision, quant: Quant | None = None) -> ModuleNode:
    """``XForCausalLM`` as a tree: ``model`` (``embed_tokens``, ``layers.<i>``, ``norm``, ``rotary_emb``) then
    ``lm_head`` (size 0 when tied: ``compute_module_sizes`` skips tied keys). Each decoder layer is one no-split node
    of its inventory's bytes as loaded (``quant``: its nn.Linear weights at the quantizer's element size, biases as
    loaded); ``rotary_emb`` holds ``inv_freq`` and ``original_inv_freq`` (fp32, d_rope/2 each,
    modeling_llama.py:85-88)."""
    quantized = QUANTIZED_ELEMENT_BYTES.get(quant) if quant is not None else None
    layer = {"dense": 0.0, "moe": 0.0}
    outer: dict[str, list] = {"embed_tokens": [], "norm": [], "lm_head": []}
    for t in spec.inventory.tensors:
        size = t.numel * _bytes_per_element(precision, t.keep_fp32)
        if quantized is not None and t.kind is ParamKind.LINEAR and t.name.endswith(".weight"):
            size = t.numel * quantized
        if t.scope == "model":
            module = {ParamKind.EMBEDDING: "embed_tokens", ParamKind.LM_HEAD: "lm_head"}.get(t.kind, "norm")
            outer[module].append((t.name.rsplit(".", 1)[-1], size))
            continue
        per_layer = t.count // {"layer": spec.num_layers, "dense": spec.num_dense_layers,
                                "moe": spec.num_moe_layers}[t.scope]
        for kind in (("dense", "moe") if t.scope == "layer" else (t.scope,)):
            layer[kind] += size * per_layer
    layers = tuple(ModuleNode(f"model.layers.{i}", (("", layer["moe" if spec.is_moe_layer(i) else "dense"]),),
                              no_split=True) for i in range(spec.num_layers))
    rope = spec.rope_dim // 2 * 4
    model = ModuleNode("model", children=(
        ModuleNode("model.embed_tokens", tuple(("model.embed_tokens." + n, s) for n, s in outer["embed_tokens"])),
        ModuleNode("model.layers", children=layers),
        ModuleNode("model.norm", tuple(("model.norm." + n, s) for n, s in outer["norm"])),
        ModuleNode("model.rotary_emb", (("model.rotary_emb.inv_freq", rope),
                                        ("model.rotary_emb.original_inv_freq", rope))),
    ))
    head = ModuleNode("lm_head", tuple(("lm_head." + n, s) for n, s in outer["lm_head"]))
    return ModuleNode("", children=(model, head))


def _sizes(root: ModuleNode) -> dict[str, float]:
    """``compute_module_sizes(model, only_modules=False)``: every module's and tensor's bytes, by name."""
    sizes: dict[str, float] = {}

    def walk(node: ModuleNode) -> float:
        total = 0.0
        for name, size in node.tensors:
            if name:  # a decoder layer carries its total under its own name
                sizes[name] = size
            total += size
        total += sum(walk(child) for child in node.children)
        sizes[node.name] = total
        return total

    walk(root)
    return sizes


def _leaf_modules(root: ModuleNode) -> list[ModuleNode]:
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.tensors and node.tensors[0][0]:
            out.append(node)
        stack.extend(node.children)
    return out


def _max_layer(items: list, sizes: dict) -> tuple[float, list[str]]:
    """accelerate 1.16.0 ``get_max_layer_size`` (utils/modeling.py:729-765) over the items still to place: a
    tensor, a module without children or a no-split module counts whole; any other module by its children."""
    best, names = 0.0, []
    todo = list(items)
    while todo:
        name, node = todo.pop(0)
        if not isinstance(node, ModuleNode) or not node.children or node.no_split:
            size = sizes[name]
            if size > best:
                best, names = size, [name]
            elif size == best:
                names.append(name)
        else:
            todo = [(child.name, child) for child in node.children] + todo
    return best, names


@functools.lru_cache(maxsize=512)
def balanced_budgets(root: ModuleNode, num_gpus: int, gpu_bytes: float = UNLIMITED_BYTES,
                     quantized: bool = False) -> tuple[float, ...]:
    """``get_balanced_memory`` (transformers accelerate.py:242-337) for ``num_gpus`` GPUs of ``gpu_bytes`` each:
    ``total // n + int(1.25 · max(largest no-split module, largest leaf))`` for every GPU but the last, which keeps
    ``gpu_bytes``; then a quantizer's ``adjust_max_memory`` (90 % of every budget)."""
    sizes = _sizes(root)
    total = sizes[""]
    layers = [node for node in _walk(root) if node.no_split]
    biggest_layer = max((sizes[node.name] for node in layers), default=0.0)
    biggest_leaf = max((sizes[node.name] for node in _leaf_modules(root)), default=0.0)
    per_gpu = total // num_gpus + int(BALANCE_BUFFER_FACTOR * max(biggest_layer, biggest_leaf))
    budgets = [min(per_gpu, gpu_bytes)] * (num_gpus - 1) + [gpu_bytes]
    if quantized:
        budgets = [budget * QUANTIZER_MEMORY_FRACTION for budget in budgets]
    return tuple(budgets)


def _walk(root: ModuleNode):
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)


@functools.lru_cache(maxsize=512)
def place(root: ModuleNode, budgets: tuple[float, ...], tied: tuple[str, ...] = ()) -> dict[str, int | str]:
    """``infer_auto_device_map`` (transformers accelerate.py:644-949) with ``clean_result=False``: module name ->
    GPU index (or "cpu" past the GPUs' budgets: offloaded, which vramcalc does not model). ``tied``: one group of
    tied parameter names (``["lm_head.weight", "model.embed_tokens.weight"]``), placed together."""
    sizes = _sizes(root)
    devices: list[int | str] = list(range(len(budgets))) + ["cpu"]
    used = {device: 0.0 for device in devices}
    todo: list = [(child.name, child) for child in root.children]
    device_map: dict[str, int | str] = {}
    current = 0
    max_size, max_names = _max_layer(todo, sizes)
    while todo:
        name, node = todo.pop(0)
        max_names = [n for n in max_names if n != name and not n.startswith(name + ".")]
        if not max_names:
            max_size, max_names = _max_layer([item for item in todo if isinstance(item[1], ModuleNode)], sizes)
        size = sizes[name]
        # the tied parameters outside this module whose group has one inside it
        outside = [p for p in tied if not (name + ".") in (p + ".")] if any(
            (name + ".") in (p + ".") for p in tied) else []
        device = devices[current]
        if device == "cpu":
            device_map[name] = "cpu"
            continue
        budget = budgets[device] - (max_size if device == 0 else 0)  # GPU 0 keeps room for the largest layer
        with_ties, tied_names = size, []
        for param in outside:
            holder = next(n for n, _ in todo if param.startswith(n + "."))
            if holder not in tied_names:
                tied_names.append(holder)
                with_ties += sizes[holder]
        if used[device] + with_ties <= budget:
            used[device] += with_ties
            device_map[name] = device
            for holder in tied_names:
                todo = [item for item in todo if item[0] != holder]
                device_map[holder] = device
            continue
        splittable = isinstance(node, ModuleNode) and node.children and not node.no_split
        if splittable:
            todo = [(n, s) for n, s in node.tensors if n] + [(c.name, c) for c in node.children] + todo
            max_size, max_names = _max_layer([item for item in todo if isinstance(item[1], ModuleNode)], sizes)
            continue
        used[device] += max_size if device == 0 else 0
        current += 1
        todo.insert(0, (name, node))
    return device_map


def tied_group(spec: ModelSpec) -> tuple[str, ...]:
    """transformers' tied group for a tied lm_head (``all_tied_weights_keys``), sorted as accelerate.py:615-619."""
    return ("lm_head.weight", "model.embed_tokens.weight") if spec.tie_word_embeddings else ()


@dataclass(frozen=True)
class Placement:
    """Where ``device_map="auto"`` puts each part: the GPU of the embedding, of each decoder layer, of the final
    norm, of the rotary tables and of lm_head."""

    num_gpus: int
    embed: int
    layers: tuple[int, ...]
    norm: int
    rotary: int
    head: int

    def layers_on(self, gpu: int) -> tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.layers) if g == gpu)

    def gpus_used(self) -> tuple[int, ...]:
        return tuple(sorted({self.embed, self.norm, self.rotary, self.head, *self.layers}))


def _device_of(device_map: dict, name: str):
    while name not in device_map:
        if "." not in name:
            return device_map.get("")
        name = name.rsplit(".", 1)[0]
    return device_map[name]


@functools.lru_cache(maxsize=512)
def placement(spec: ModelSpec, precision: Precision, quant: Quant | None, num_gpus: int,
              gpu_bytes: float = UNLIMITED_BYTES) -> Placement:
    """The device map of ``spec`` on ``num_gpus`` GPUs of ``gpu_bytes`` each, by part; an error when a part would
    be offloaded to the CPU (the GPUs' budgets cannot hold the model: not modelled)."""
    root = module_tree(spec, precision, quant)
    budgets = balanced_budgets(root, num_gpus, gpu_bytes, quant is not None)
    device_map = place(root, budgets, tied_group(spec))
    parts = {"embed": "model.embed_tokens", "norm": "model.norm", "rotary": "model.rotary_emb", "head": "lm_head"}
    where = {key: _device_of(device_map, name) for key, name in parts.items()}
    layers = tuple(_device_of(device_map, f"model.layers.{i}") for i in range(spec.num_layers))
    if any(not isinstance(g, int) for g in (*where.values(), *layers)):
        raise VramcalcError(f"--device-map auto would offload part of {spec.name} to the CPU: its weights do not fit "
                            f"{num_gpus} GPUs; vramcalc does not model offloaded layers (use more or larger GPUs)")
    return Placement(num_gpus, where["embed"], layers, where["norm"], where["rotary"], where["head"])


def method_quant(method: Method, quant: Quant) -> Quant | None:
    """The quantizer ``from_pretrained`` runs with (qlora's bitsandbytes one), or None for a 16-bit base."""
    return quant if method is Method.QLORA else None


def gpu_tensors(spec: ModelSpec, tensors, where: Placement, gpu: int) -> tuple:
    """The stored tensors on ``gpu``: the embedding (and prompt or embedding adapters) where ``embed_tokens`` is,
    lm_head and its adapters where ``lm_head`` is, the final norm where ``norm`` is, and each decoder tensor once
    per layer of its kind placed there."""
    from dataclasses import replace

    layers = where.layers_on(gpu)
    counts = {"layer": len(layers), "dense": sum(not spec.is_moe_layer(i) for i in layers),
              "moe": sum(spec.is_moe_layer(i) for i in layers)}
    totals = {"layer": spec.num_layers, "dense": spec.num_dense_layers, "moe": spec.num_moe_layers}
    out = []
    for t in tensors:
        if t.scope == "model":
            if t.kind == ParamKind.LM_HEAD.value or t.name.startswith("lm_head"):
                owner = where.head
            elif t.kind == ParamKind.NORM.value:
                owner = where.norm
            else:  # the embedding, its adapters, a prompt encoder: on the first GPU the input reaches
                owner = where.embed
            if owner == gpu:
                out.append(t)
        elif counts[t.scope]:
            out.append(replace(t, count=t.count // totals[t.scope] * counts[t.scope]))
    return tuple(out)


@dataclass(frozen=True)
class GpuPeak:
    """One GPU's largest moment under ``--device-map auto``: its terms (bytes) and the phase."""

    gpu: int
    layers: tuple[int, ...]
    phase: str
    terms: tuple  # (Term, bytes) of the tensor terms
    transfer_bytes: int  # of which activations: copies the hooks made of tensors from another GPU (rotary tables)

    @property
    def tensor_bytes(self) -> int:
        return sum(value for _, value in self.terms)


def transfer_copies_bytes(rope_per_position: int, positions, layers_elsewhere: int, checkpointed: bool):
    """Rotary cos/sin copies a layer keeps on its GPU when ``rotary_emb`` sits on another one.

    accelerate's ``AlignDevicesHook.pre_forward`` (accelerate 1.16.0 ``hooks.py``) sends every argument of a
    layer's forward to the layer's GPU: the ``position_embeddings`` (cos, sin) made once by ``rotary_emb`` are
    copied anew for each layer on another GPU, and the RoPE products save the copies for backward
    (``apply_rotary_pos_emb``: ``q * cos``, ``rotate_half(q) * sin``). Under checkpointing the copy is made inside
    the checkpointed forward (the hook wraps ``forward``; ``GradientCheckpointingLayer`` checkpoints ``__call__``),
    so nothing stays. Bytes = layers elsewhere · s · (cos + sin bytes per position: [1, s, d_rope] tables,
    ``activations.shared_saved``)."""
    if checkpointed:
        return 0
    return layers_elsewhere * positions * rope_per_position


def pipeline_boundaries(where: Placement) -> int:
    """How many times the hidden state changes GPU on its way embed_tokens -> layers -> norm -> lm_head."""
    chain = (where.embed, *where.layers, where.norm, where.head)
    return sum(a != b for a, b in zip(chain, chain[1:]))
