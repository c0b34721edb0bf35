"""One rank of an expert-parallel group, traced through transformers' own expert plan on a fake process group.

The traced layouts (``parallel_degrees.check_expert_degree``): with ``--num-gpus E``, ``DistributedConfig(tp_size=E,
tp_plan={}, ep_size=E)``, the expert plan alone across the E ranks of one group that shares one batch (transformers
5.25.0 distributed/configuration_utils.py:40-43 and :156-170: what ``enable_expert_parallel`` means, spelled with
``ep_size``); with ``--num-gpus N`` > E and ``--sharding fsdp``, ``DistributedConfig(fsdp_size=N, ep_size=E)``, EP
across the FSDP ranks, every rank with a batch of its own (below). ``initialize_distributed_mesh`` (distributed/utils.py:313-346) builds the dense ``(pp, dp_replicate,
fsdp, tp)`` and expert ``(pp, dp_replicate, efsdp, ep)`` meshes on the fake group (``tracing/distributed.py``
``process_group``), then ``PreTrainedModel.maybe_distribute_model`` (distributed/mixin.py:304-343) resolves the
family's ``base_model_ep_plan`` (e.g. models/qwen3_moe/configuration_qwen3_moe.py:66-70: ``experts.gate_up_proj``
and ``experts.down_proj`` "grouped_gemm", ``experts`` "ep_dispatch_experts") and ``apply_expert_parallelism``
(distributed/expert_parallel.py:420-450) makes each expert tensor a ``Shard(0)`` DTensor of n/E experts
(``MoEParamShard.shard_param``, :96-114, which also sets ``experts.num_experts`` to n/E) and installs the dispatch
forward (``EpDispatchExpertsParallel.install_forward``, :386-412). The router (``mlp.gate``), attention, norms,
embedding and lm_head are in no plan: whole on every rank. As in ``from_pretrained``, this runs on the meta model
before peft and before the tensors are materialised.

In training the dispatch is ``AllToAllEP`` (``AutoEP``, :318-323): the E ranks take disjoint 1/E row slices of the
shared batch (:203-210), send each (token, expert) pair to its expert's rank with ``all_to_all_single_autograd``,
run their local experts on what they receive (top-1, unit weights), send the outputs back, weight and sum them per
token (:238-248) and all-gather the row slices (:249-259). One step of it cannot run on fake tensors: the split
sizes are read back to the host (``.tolist()`` of the exchanged counts, :225), and fake tensors hold no data. The
trace therefore runs ``UniformAllToAllEP``: ``AllToAllEP`` with the host read replaced by the counts of a uniform
routing (each rank sends (T/E)·K/E pairs to every rank and receives as many from each), every other line and
``_combine_tokens`` transformers' own. The routing itself (the router's top-k on fake scores) is not data either:
uniform routing is the assumption the estimate makes (terms/expert_parallel.py).

EP across FSDP ranks: ``maybe_distribute_model`` then runs ``apply_fully_sharded_data_parallelism``
(distributed/fsdp.py:176-238) on the same meta model, as ``from_pretrained`` does before loading: each experts module
(the ``ep_dispatch_experts`` entries) is ``fully_shard``-ed on the ``efsdp`` mesh (N/E ranks holding the same n/E
experts; its Shard(0) DTensors become (efsdp, ep) DTensors of ceil(n/E / efsdp) experts), then the fsdp plan's units
on the N-rank ``fsdp`` mesh: embedding and every decoder layer freed after forward, final norm and lm_head kept
(``base_model_fsdp_plan``, configuration_utils.py:398-402, and the model's ``_fsdp_plan``), and the root. No mixed-
precision policy (``fsdp_mixed_precision`` defaults to False) and no fp32 upcast: the units gather the loaded dtype.
peft then adds its adapters as plain tensors inside the FSDP units: whole on every rank, their gradients all-reduced
in place by Trainer's hook (trainer.py:2669-2697; in place, nothing to trace). Trainer wraps the model in nothing
else (trainer.py:467-469) and defers gradient reduction under accumulation with ``set_requires_gradient_sync(False)``
(:2655-2667): ``tracing/distributed.py`` ``sharded_at_load``. With ``tp_mesh`` of size 1 ``AllToAllEP`` takes no
row slice and gathers nothing back: the rank dispatches all T·K pairs of its own batch, and under uniform routing
receives as many.
"""

from __future__ import annotations

from ..errors import VramcalcError

UNIFORM = "vramcalc_uniform_all_to_all"


def _uniform_all_to_all():
    """``AllToAllEP`` whose split sizes are those of a uniform routing (module docstring)."""
    import torch
    from torch.distributed import all_to_all_single
    from torch.distributed._functional_collectives import all_to_all_single_autograd
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from transformers.distributed import expert_parallel as ep
    from transformers.distributed.parallel_utils import _WaitTensor

    class UniformAllToAllEP(ep.AllToAllEP):
        def _dispatch_tokens(self, hidden_states, top_k_index, top_k_weights):
            # expert_parallel.py:202-236, line for line, but for the split sizes (uniform_splits)
            num_tokens = hidden_states.size(0)
            if self.tp_mesh.size() > 1:
                hidden_states, top_k_index, top_k_weights = (
                    DTensor.from_local(t, self.tp_mesh, [Replicate()], run_check=False)
                    .redistribute(self.tp_mesh, [Shard(0)]).to_local()
                    for t in (hidden_states, top_k_index, top_k_weights))
            ep_group, ep_size = self.ep_mesh.get_group(), self.ep_mesh.size()
            num_top_k = top_k_index.size(-1)
            expert_ids = top_k_index.reshape(-1)
            order = torch.argsort(expert_ids)
            send_tokens = hidden_states[order // num_top_k]
            send_counts = torch.zeros(self.num_local_experts * ep_size, dtype=torch.long, device=hidden_states.device)
            send_counts = send_counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
            send_counts = send_counts.view(ep_size, self.num_local_experts)
            recv_counts = torch.empty_like(send_counts)
            all_to_all_single(recv_counts, send_counts, group=ep_group)
            send_sizes = recv_sizes = uniform_splits(expert_ids.numel(), ep_size)  # in place of .tolist() (:225)
            recv_tokens = all_to_all_single_autograd(send_tokens, recv_sizes, send_sizes, ep_group)
            recv_tokens = _WaitTensor.apply(recv_tokens)
            recv_expert_ids = torch.arange(self.num_local_experts, device=hidden_states.device).repeat(ep_size)
            recv_expert_ids = recv_expert_ids.repeat_interleave(recv_counts.reshape(-1), output_size=sum(recv_sizes))
            recv_expert_ids = recv_expert_ids.unsqueeze(-1)
            recv_weights = torch.ones_like(recv_expert_ids, dtype=recv_tokens.dtype)
            state = ep._AllToAllState(top_k_weights, order, send_sizes, recv_sizes, num_tokens)
            return recv_tokens, recv_expert_ids, recv_weights, state

    return UniformAllToAllEP


def uniform_splits(pairs: int, ranks: int) -> list[int]:
    """A uniform routing's all-to-all split sizes: ``pairs`` (token, expert) pairs spread evenly over the ranks
    (the remainder on the first ones)."""
    return [pairs // ranks + (1 if r < pairs % ranks else 0) for r in range(ranks)]


def distributed_config(ep: int, num_gpus: int):
    """transformers' ``DistributedConfig`` for ``--ep E`` on ``--num-gpus N`` (module docstring): one group sharing
    one batch when N = E, else EP across the N FSDP ranks (``fsdp_size=N, ep_size=E``: efsdp = N/E)."""
    from transformers.distributed.configuration_utils import DistributedConfig

    if num_gpus == ep:
        return DistributedConfig(tp_size=ep, tp_plan={}, ep_size=ep, ep_implementation=UNIFORM)
    return DistributedConfig(fsdp_size=num_gpus, ep_size=ep, ep_implementation=UNIFORM)


def distribute(model, ep: int, num_gpus: int | None = None):
    """transformers' expert plan on a meta-built model: ``Shard(0)`` expert DTensors and the dispatch forward; with
    N > E ranks also its FSDP2 (``apply_fully_sharded_data_parallelism``: dense units over N, experts over N/E)."""
    from transformers.distributed.expert_parallel import EPImplementationInterface
    from transformers.distributed.utils import initialize_distributed_mesh

    EPImplementationInterface.register(UNIFORM, _uniform_all_to_all())
    config = distributed_config(ep, num_gpus or ep)
    try:
        _, mesh_manager = initialize_distributed_mesh(config)
    except RuntimeError as err:
        raise VramcalcError(f"expert parallelism cannot be traced here: {err}".splitlines()[0]) from None
    return type(model).maybe_distribute_model(model, config, mesh_manager)


def check_traceable(spec, resolved) -> None:
    """The expert-parallel setups the trace runs: every one ``parallel_degrees.check_expert_degree`` lets through
    (one group, --num-gpus = --ep; or EP over FSDP ranks, --sharding fsdp)."""
    setup = resolved.setup
    if setup.num_gpus != setup.ep and setup.sharding.value != "fsdp":
        raise VramcalcError(f"--ep {setup.ep} on {setup.num_gpus} GPUs is traced over FSDP ranks only "
                            "(--sharding fsdp)")
