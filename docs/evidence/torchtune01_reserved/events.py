"""Record the device allocation/free sequence of torchtune 0.1.1's QLoRA model build + load_state_dict (Llama-2-7B,
llama2/7B_qlora_single_device) with torchao 0.1's own NF4 code on fake tensors (vramcalc AllocationTracker, 512-B
rounding off), for ``alloc.py`` to replay through the caching allocator. Evidence for docs/stacks-research.md
(torchtune-037), not part of vramcalc.

What runs, in torchtune 0.1.1's order (wheel from PyPI, unpacked, never installed):
- ``lora_llama2`` (``models/llama2/_component_builders.py:197-245``) builds ONE decoder layer: each LoRALinear makes a
  bf16 ``nn.Linear`` on the GPU and ``to_nf4``s it (``modules/peft/lora.py:87-94``), then tok_embeddings and output;
- ``TransformerDecoder`` deep-copies that layer ``num_layers`` times (``modules/transformer.py:81-93,137``):
  ``Parameter.__deepcopy__`` clones each NF4 weight through torchtune's ``aten.clone`` override,
  ``to_nf4(get_original_weight())`` (``utils/_register_nf4_dispatch_ops.py:11-19``);
- ``load_state_dict`` re-quantizes every checkpoint tensor on the GPU, ``to_nf4(src.to(dest.device))`` (:22-42),
  the source fp16 (Llama-2-7b-hf ``.bin``); unquantized tensors are cast on the host and copied in place.
``--lora``: llama2/7B_lora_single_device instead (bf16 base; adapters modelled on all seven Linears, a few MB).

Usage: python events.py TORCHAO_0_1_NF4TENSOR_PY [num_layers] > writes events.json next to it."""
import importlib.util, sys, json, copy
import torch
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[3]))
from torch._subclasses.fake_tensor import FakeTensorMode
from vramcalc.tracing.tracker import AllocationTracker
spec = importlib.util.spec_from_file_location('nf401', sys.argv[1])
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)

EVENTS = []
tr = AllocationTracker(round_to=1)
orig_add, orig_free = tr._add, tr._free
ids = {}
COUNTER = [0]
def add(storage, *a, **k):
    rec = orig_add(storage, *a, **k)
    key = id(rec); ids[key] = COUNTER[0]; COUNTER[0] += 1
    EVENTS.append(("a", ids[key], rec.nbytes))
    return rec
def free(record):
    EVENTS.append(("f", ids.get(id(record), -1), record.nbytes))
    return orig_free(record)
tr._add, tr._free = add, free

h, I, V, L, r = 4096, 11008, 32000, int(sys.argv[2]) if len(sys.argv) > 2 else 32, 8
QUANTIZE = "--lora" not in sys.argv  # --lora: llama2/7B_lora_single_device (bf16 base, no NF4), same order
bf = torch.bfloat16
def nf4_clone(t):  # torchtune 0.1.1 _register_nf4_dispatch_ops.clone
    return m.to_nf4(t.get_original_weight())
def requantize(shape):  # torchtune 0.1.1 inplace_copy: to_nf4(src.to(device)); src fp16 from the HF .bin
    src = torch.empty(shape, dtype=torch.float16)
    ref = m.to_nf4(src)
    del src
    return ref
fake = FakeTensorMode(allow_non_fake_inputs=True)
with fake, tr:
    def linear(o, i):
        w = torch.empty(o, i, dtype=bf)  # nn.Linear under set_default_dtype(bf16), device cuda
        if not QUANTIZE:
            return w
        q = m.to_nf4(w); del w
        return q
    shapes = [(h, h)] * 4 + [(I, h), (h, I), (I, h)]
    def lora(o, i):
        return [torch.empty(r, i, dtype=bf), torch.empty(o, r, dtype=bf)]
    layer = []
    for o, i in shapes:
        layer.append(linear(o, i)); layer += lora(o, i)
    layer += [torch.empty(h, dtype=bf), torch.empty(h, dtype=bf)]
    emb = torch.empty(V, h, dtype=bf)
    out = torch.empty(V, h, dtype=bf)
    layers = []
    for _ in range(L):  # _get_clones: copy.deepcopy -> Parameter.__deepcopy__ -> clone
        copy_ = []
        for t in layer:
            copy_.append(nf4_clone(t) if isinstance(t, m.NF4Tensor) else torch.empty_like(t))
        layers.append(copy_)
    del layer, copy_
    EVENTS.append(("mark", "built", 0))
    norm = torch.empty(h, dtype=bf)
    # load_state_dict in module order: tok_embeddings, layers (attn q,k,v,o, mlp w1,w2,w3, norms), norm, output
    # unquantized tensors: param.copy_(fp16 CPU tensor) casts on the source side (ATen copy_kernel_cuda converts
    # src.to(dst dtype) before the host-to-device copy): no device temporary
    for li in range(L):
        for j, (o, i) in enumerate(shapes):
            idx = [k for k, t in enumerate(layers[li]) if isinstance(t, m.NF4Tensor)][j] if QUANTIZE else None
            if QUANTIZE:
                ref = requantize((o, i))
                layers[li][idx] = ref; del ref
            else:  # param.copy_(fp16 CPU tensor): cast on the host, copied in place (no device temporary)
                pass
    EVENTS.append(("mark", "loaded", 0))
json.dump(EVENTS, open(__import__('pathlib').Path(__file__).with_name('events.json'), 'w'))
print(len(EVENTS), "events; live", tr.live_bytes / 1e9, "GB")
