"""Record the device allocation/free sequence of torchtune 0.1.1's QLoRA model build + load_state_dict (Llama-2-7B,
llama2/7B_qlora_single_device) with torchao 0.1's own NF4 code on fake tensors (vramcalc AllocationTracker, 512-B
rounding off), for ``alloc.py`` (or ``vramcalc.tracing.caching_allocator.replay``) to replay. Evidence for
docs/stacks-research.md (torchtune-037) and the check of vramcalc's analytic sequence
(``vramcalc/terms/load_reserved.py``, tests/test_load_reserved.py); not part of vramcalc.

What runs, in torchtune 0.1.1's order (wheel from PyPI, unpacked, never installed):
- ``lora_llama2`` (``models/llama2/_component_builders.py:197-245``) builds ONE decoder layer: q, k, v, output_proj
  (each LoRALinear makes a bf16 ``nn.Linear`` on the GPU and ``to_nf4``s it, ``modules/peft/lora.py:87-94``, then
  lora_a and lora_b), the rotary embedding (``modules/position_embeddings.py:52-73``, its four lines copied below),
  w1, w2, w3, the two RMSNorm scales; then tok_embeddings, output and the final norm (an argument of
  ``TransformerDecoder``, built before its ``__init__``);
- ``TransformerDecoder`` deep-copies that layer ``num_layers`` times (``modules/transformer.py:81-93,137``) in
  module order (sa_norm, attn: q, k, v, output_proj, rope buffers; mlp_norm, mlp: w1, w2, w3):
  ``Parameter.__deepcopy__`` clones each NF4 weight through torchtune's ``aten.clone`` override,
  ``to_nf4(get_original_weight())`` (``utils/_register_nf4_dispatch_ops.py:11-19``); then the template dies;
- ``load_state_dict`` re-quantizes every checkpoint tensor on the GPU, ``to_nf4(src.to(dest.device))`` (:22-42),
  the source fp16 (Llama-2-7b-hf ``.bin``), and the old NF4 parts are replaced; unquantized tensors are cast on the
  host and copied in place (a blocking host-to-device ``copy_`` converts on the CPU, ATen ``Copy.cu``
  ``copy_kernel_cuda``): nothing on the device.
``--lora``: llama2/7B_lora_single_device instead (bf16 base; adapters modelled on all seven Linears, a few MB).
``--no-rope``: leave the rotary embeddings out (the first version of this script did; 32 layers: the same reserved).

Usage: python events.py TORCHAO_0_1_NF4TENSOR_PY [num_layers] [--lora] [--no-rope] > writes events.json next to it.
Importable: ``record(nf4tensor_py, ...)`` returns the events (tests/test_load_reserved.py)."""
import copy
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def load_nf4(path):
    """torchao 0.1's ``torchao/dtypes/nf4tensor.py``, imported by path (it needs only torch)."""
    spec = importlib.util.spec_from_file_location("nf4tensor_0_1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(nf4tensor_py, num_layers=32, quantize=True, rope=True, h=4096, I=11008, V=32000, r=8, heads=32,
           max_seq_len=4096):
    """[("a", id, nbytes) | ("f", id, nbytes) | ("mark", name, 0)] of the build and load, in program order."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramcalc.tracing.tracker import AllocationTracker

    m = load_nf4(nf4tensor_py)
    events, ids, counter = [], {}, [0]
    tr = AllocationTracker(round_to=1)
    orig_add, orig_free = tr._add, tr._free

    def add(storage, *a, **k):
        rec = orig_add(storage, *a, **k)
        ids[id(rec)] = counter[0]
        counter[0] += 1
        events.append(("a", ids[id(rec)], rec.nbytes))
        return rec

    def free(record_):
        events.append(("f", ids.get(id(record_), -1), record_.nbytes))
        return orig_free(record_)

    tr._add, tr._free = add, free
    bf = torch.bfloat16
    head_dim = h // heads

    def nf4_clone(t):  # torchtune 0.1.1 _register_nf4_dispatch_ops.clone
        return m.to_nf4(t.get_original_weight())

    def requantize(shape):  # torchtune 0.1.1 inplace_copy: to_nf4(src.to(device)); src fp16 from the HF .bin
        src = torch.empty(shape, dtype=torch.float16)
        ref = m.to_nf4(src)
        del src
        return ref

    def rope_buffers():  # torchtune 0.1.1 RotaryPositionalEmbeddings._rope_init / build_rope_cache (:52-73)
        theta = 1.0 / (10_000 ** (torch.arange(0, head_dim, 2)[: (head_dim // 2)].float() / head_dim))
        seq_idx = torch.arange(max_seq_len, dtype=theta.dtype, device=theta.device)
        idx_theta = torch.einsum("i, j -> ij", seq_idx, theta).float()
        cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)
        return [theta, cache]

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake, tr:
        def linear(o, i):
            w = torch.empty(o, i, dtype=bf)  # nn.Linear under set_default_dtype(bf16), device cuda
            if not quantize:
                return w
            q = m.to_nf4(w)
            del w
            return q

        def lora(o, i):
            return [torch.empty(r, i, dtype=bf), torch.empty(o, r, dtype=bf)]

        attention = [(h, h)] * 4
        mlp = [(I, h), (h, I), (I, h)]
        attn_part, mlp_part = [], []
        for o, i in attention:
            attn_part.append(linear(o, i))
            attn_part += lora(o, i)
        rope_part = rope_buffers() if rope else []
        for o, i in mlp:
            mlp_part.append(linear(o, i))
            mlp_part += lora(o, i)
        norms = [torch.empty(h, dtype=bf), torch.empty(h, dtype=bf)]  # sa_norm, mlp_norm
        emb = torch.empty(V, h, dtype=bf)
        out = torch.empty(V, h, dtype=bf)
        final_norm = torch.empty(h, dtype=bf)
        # _get_clones: copy.deepcopy -> Parameter.__deepcopy__ -> clone, in module order
        order = [norms[0]] + attn_part + rope_part + [norms[1]] + mlp_part
        layers = []
        for _ in range(num_layers):
            layers.append([nf4_clone(t) if isinstance(t, m.NF4Tensor) else copy.deepcopy(t) for t in order])
        del attn_part, mlp_part, rope_part, norms, order
        events.append(("mark", "built", 0))
        # load_state_dict in module order: tok_embeddings, layers (attn q,k,v,o, mlp w1,w2,w3, norms), norm, output
        shapes = attention + mlp
        for li in range(num_layers):
            nf4 = [k for k, t in enumerate(layers[li]) if isinstance(t, m.NF4Tensor)]
            for j, (o, i) in enumerate(shapes if quantize else ()):
                ref = requantize((o, i))
                layers[li][nf4[j]] = ref
                del ref
        events.append(("mark", "loaded", 0))
    return events


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    recorded = record(args[0], int(args[1]) if len(args) > 1 else 32, quantize="--lora" not in sys.argv,
                      rope="--no-rope" not in sys.argv)
    json.dump(recorded, open(Path(__file__).with_name("events.json"), "w"))
    print(len(recorded), "events")
