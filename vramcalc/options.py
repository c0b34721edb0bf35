"""The words a training setup is made of. Each is a ``str`` enum, so it round-trips through CLI flags and CSV cells."""

from __future__ import annotations

from enum import Enum

from .errors import VramcalcError, short_repr
from .units import DType


class Choice(str, Enum):
    """A setup word; ``parse`` turns user text into a member or a one-line error listing the choices."""

    # members are singletons: hash by identity, in C (Enum's own hash(name) is a Python call, and the estimate
    # hashes setup words and terms dozens of times). A member still equals only itself among members.
    __hash__ = object.__hash__

    @classmethod
    def parse(cls, value: object, option: str) -> "Choice":
        if isinstance(value, cls):
            return value
        huge = isinstance(value, int) and value.bit_length() > 64  # str() of a 5000-digit int raises
        text = None if huge else str(value).strip().lower().replace("_", "-")
        for member in cls:
            if text == member.value:
                return member
        choices = ", ".join(member.value for member in cls)
        raise VramcalcError(f"unknown {option} {short_repr(value)}; choose one of: {choices}")

    def __str__(self) -> str:
        return self.value


class Method(Choice):
    """full, lora, qlora (LoRA on an NF4 base), prompt (peft prompt tuning), and every other peft method by peft's
    own name in lower case with hyphens; their facts (config class, options, what trains) are in
    ``vramcalc/peft_methods.py``, one row per member below."""

    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"
    PROMPT = "prompt"
    DORA = "dora"
    ADALORA = "adalora"
    IA3 = "ia3"
    VERA = "vera"
    LOHA = "loha"
    LOKR = "lokr"
    OFT = "oft"
    LN_TUNING = "ln-tuning"
    PREFIX = "prefix"
    P_TUNING = "p-tuning"
    ADAPTION_PROMPT = "adaption-prompt"
    HRA = "hra"
    FOURIERFT = "fourierft"
    MISS = "miss"
    RANDLORA = "randlora"
    C3A = "c3a"
    VBLORA = "vblora"
    HIRA = "hira"
    PVERA = "pvera"
    ROAD = "road"
    DELORA = "delora"
    GRALORA = "gralora"
    GLORA = "glora"
    TINYLORA = "tinylora"
    LILY = "lily"
    PSOFT = "psoft"
    SUPERTUNING = "supertuning"
    PEANUT = "peanut"
    DEFT = "deft"
    BEFT = "beft"
    OSF = "osf"
    CARTRIDGE = "cartridge"

    @property
    def uses_lora(self) -> bool:
        """LoRA adapters A and B on the target Linears: lora, qlora and dora (peft ``LoraConfig(use_dora=True)``)."""
        return self in (Method.LORA, Method.QLORA, Method.DORA)

    @property
    def peft_facts(self):
        """The ``peft_methods.PeftMethodFacts`` row of a peft method other than lora/qlora/prompt (else None)."""
        from .peft_methods import peft_method

        return peft_method(self.value)

    @property
    def prepends_tokens(self) -> bool:
        """The method prepends virtual tokens to the input embeddings (the sequence grows by them): prompt tuning
        and p-tuning (peft ``PeftModelForCausalLM.forward``: ``torch.cat((prompts, inputs_embeds), dim=1)``)."""
        return self in (Method.PROMPT, Method.P_TUNING)


class Precision(Choice):
    """What a practitioner means by the word (DESIGN.md "Precision words").

    fp32        everything fp32.
    mixed-bf16  fp32 weights, grads and optimizer states; bf16 autocast compute (accelerate native AMP).
    mixed-fp16  the same with fp16 autocast (and a GradScaler, whose state is a few scalars).
    bf16        the model loaded in bf16 (transformers v5 ``dtype="auto"``); grads and states in the parameter
                dtype; Trainer ``bf16=True`` autocast on top, which matters only for tensors kept in fp32.
    fp16        the same in fp16.
    bf16-true   the model in bf16 and no autocast (Lightning Fabric's ``precision="bf16-true"``, litgpt's configs;
                torchtune's ``dtype: bf16`` recipes never enter ``torch.autocast``): every op computes in its inputs'
                dtype. It differs from ``bf16`` only where a tensor is fp32: autocast returns fp32 from LayerNorm and
                casts fp32 inputs and adapters per matmul, and accelerate copies the logits to fp32.
    fp16-true   the same in fp16 (Lightning's "16-true"; what DeepSpeed's fp16 engine computes, accelerate leaving
                autocast off under DeepSpeed: ``distributed.compute_setup``).
    fp8         torchao's float8 training, default "tensorwise" recipe (``convert_to_float8_training`` with
                ``Float8LinearConfig()``: dynamic scaling, one fp32 scale per tensor, e4m3 input and weight,
                e5m2 grad_output), eager, on every decoder nn.Linear with both dims multiples of 16; lm_head,
                experts and routers stay bf16. Weights, grads and states stay bf16 and the saved activations are
                the bf16 ones (``matmul_with_hp_or_float8_args`` saves the high-precision input and weight); what
                differs from bf16 is the transient fp8 casts in each Linear's backward (``terms/float8.py``).
                Full fine-tuning only (a frozen base would save its Linears' inputs too; refused).
    For QLoRA the word names the dtype of what stays unquantized: ``bf16`` as loaded, ``mixed-bf16``/``mixed-fp16``
    after ``peft.prepare_model_for_kbit_training`` (fp32 embeddings, norms and lm_head) with 16-bit autocast.
    """

    FP32 = "fp32"
    MIXED_BF16 = "mixed-bf16"
    MIXED_FP16 = "mixed-fp16"
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"
    BF16_TRUE = "bf16-true"
    FP16_TRUE = "fp16-true"

    @property
    def param_dtype(self) -> DType:
        """Dtype of the stored parameters (and so of gradients and torch optimizer states)."""
        return {
            Precision.FP32: DType.FP32,
            Precision.MIXED_BF16: DType.FP32,
            Precision.MIXED_FP16: DType.FP32,
            Precision.BF16: DType.BF16,
            Precision.FP16: DType.FP16,
            Precision.FP8: DType.BF16,
            Precision.BF16_TRUE: DType.BF16,
            Precision.FP16_TRUE: DType.FP16,
        }[self]

    @property
    def compute_dtype(self) -> DType:
        """Dtype of activations between layers."""
        return {
            Precision.FP32: DType.FP32,
            Precision.MIXED_BF16: DType.BF16,
            Precision.MIXED_FP16: DType.FP16,
            Precision.BF16: DType.BF16,
            Precision.FP16: DType.FP16,
            Precision.FP8: DType.BF16,
            Precision.BF16_TRUE: DType.BF16,
            Precision.FP16_TRUE: DType.FP16,
        }[self]

    @property
    def autocast(self) -> bool:
        """Whether the step runs under 16-bit ``torch.autocast``: every word but ``fp32``, ``bf16-true`` and
        ``fp16-true``."""
        return self not in (Precision.FP32, Precision.BF16_TRUE, Precision.FP16_TRUE)

    @property
    def is_mixed(self) -> bool:
        """fp32 parameters under 16-bit autocast."""
        return self in (Precision.MIXED_BF16, Precision.MIXED_FP16)


class Optimizer(Choice):
    ADAMW = "adamw"  # torch AdamW(fused=True): HF Trainer's default optim "adamw_torch_fused" (torch >= 2.8)
    ADAMW_FOREACH = "adamw-foreach"  # torch AdamW with the foreach implementation ("adamw_torch")
    ADAMW_8BIT = "adamw-8bit"  # bitsandbytes AdamW8bit ("adamw_bnb_8bit")
    PAGED_ADAMW = "paged-adamw"  # bitsandbytes PagedAdamW32bit ("paged_adamw_32bit")
    PAGED_ADAMW_8BIT = "paged-adamw-8bit"  # bitsandbytes PagedAdamW8bit ("paged_adamw_8bit")
    SGD = "sgd"
    SGD_MOMENTUM = "sgd-momentum"
    ADAFACTOR = "adafactor"  # transformers.optimization.Adafactor ("adafactor"), beta1=None
    # torchao's low-bit AdamW (torchao/optim/adam.py, torchao 0.18; torchao.prototype.low_bit_optim before 0.10):
    # blockwise-quantized states as tensor subclasses, the step a torch.compile'd ``single_param_adam`` per parameter
    ADAMW_8BIT_TORCHAO = "adamw-8bit-torchao"  # torchao.optim.AdamW8bit (Trainer "adamw_torch_8bit")
    ADAMW_4BIT_TORCHAO = "adamw-4bit-torchao"  # torchao.optim.AdamW4bit (Trainer "adamw_torch_4bit")
    ADAMW_FP8_TORCHAO = "adamw-fp8-torchao"  # torchao.optim.AdamWFp8

    @property
    def is_paged(self) -> bool:
        return self in (Optimizer.PAGED_ADAMW, Optimizer.PAGED_ADAMW_8BIT)

    @property
    def is_bnb(self) -> bool:
        return self in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW, Optimizer.PAGED_ADAMW_8BIT)

    @property
    def is_8bit(self) -> bool:
        """bitsandbytes' 8-bit states (torchao's low-bit optimizers are ``is_torchao``)."""
        return self in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT)

    @property
    def is_torchao(self) -> bool:
        return self in (Optimizer.ADAMW_8BIT_TORCHAO, Optimizer.ADAMW_4BIT_TORCHAO, Optimizer.ADAMW_FP8_TORCHAO)


class Attention(Choice):
    SDPA = "sdpa"  # torch scaled_dot_product_attention (transformers default)
    FLASH = "flash"  # flash_attention_2
    EAGER = "eager"  # matmul + softmax in Python


class Loss(Choice):
    HF = "hf"  # transformers ForCausalLMLoss: full fp32 logits
    # transformers 4.46-4.49's ForCausalLMLoss: the fp32 logits shifted into a contiguous copy (4.50 pads the labels)
    HF_SHIFTED = "hf-shifted"
    # transformers 4.31-4.45's causal-LM forward: ``logits = logits.float()`` (the 16-bit logits die at the cast, the
    # fp32 ones are returned), then the loss shifts a contiguous fp32 copy for a plain CrossEntropyLoss
    HF_FP32_LOGITS = "hf-fp32-logits"
    CHUNKED = "chunked"  # cross-entropy over chunks of tokens, recomputing each chunk's logits in backward
    FUSED = "fused"  # a fused linear-cross-entropy kernel (Liger / Apple cut-cross-entropy): no [T, V] tensor
    TORCHTUNE = "torchtune"  # CEWithChunkedOutputLoss as torchtune's recipes call it: the 8 chunks of logits alive
    LITGPT = "litgpt"  # litgpt chunked_cross_entropy on Fabric's fp32 logits, which fit() keeps through backward
    TRL = "trl"  # TRL SFTTrainer's fused lm_head: [4096, 32768] log-prob tiles, no [T, V] logits (terms/trl_loss.py)
    # torchtune recipes of April-July 2024 (before #1235): the model's fp32 logits shifted into a contiguous fp32 copy
    # for a plain CrossEntropyLoss, the copy left bound to ``logits`` through backward, the step and the next forward
    TORCHTUNE_2024 = "torchtune-2024"
    # transformers' loss in a custom loop that keeps ``outputs`` (``outputs = model(**batch); loss = outputs.loss;
    # accelerator.backward(loss)``: transformers' examples/pytorch/*_no_trainer.py) until the next model call returns
    HF_LOOP = "hf-loop"
    # a cross-entropy on lm_head's output as it comes, with no fp32 upcast (a trainer's own compute_loss on
    # ``outputs.logits``, a custom loop's ``F.cross_entropy``; Qwen v1's own loss): the shifted copy and log_softmax
    # in the logits' dtype, in fp32 under autocast (CUDA autocast's fp32 list has log_softmax and cross_entropy)
    MODEL_DTYPE = "model-dtype"
    # Unsloth 2024.1-2024.11.7's ``CausalLM_fast_forward``: lm_head's 16-bit [T, V] logits, which its Triton
    # ``Fast_CrossEntropyLoss`` saves (with a [T] fp32 logsumexp) and overwrites with their gradient in backward
    # (``unsloth/kernels/cross_entropy_loss.py`` 2024.10.7:262-347); 2024.11.8 took cut-cross-entropy (``fused``)
    UNSLOTH_2024 = "unsloth-2024"

    @property
    def held_by_loop(self) -> bool:
        """The training loop keeps the loss's [T, V] input bound until its next model call returns (litgpt's
        ``fit``; torchtune's recipes until ``del logits``, #1046 and #1235; a custom loop's ``outputs``): the next
        forward runs beside it."""
        return self in (Loss.LITGPT, Loss.TORCHTUNE_2024, Loss.HF_LOOP)

    @property
    def in_model(self) -> bool:
        """The model computes this loss itself from its [T, V] logits (transformers' ``model.loss_function``;
        Unsloth's ``CausalLM_fast_forward`` calls ``fast_cross_entropy_loss``)."""
        return self in (Loss.HF, Loss.HF_SHIFTED, Loss.HF_FP32_LOGITS, Loss.HF_LOOP, Loss.MODEL_DTYPE,
                        Loss.UNSLOTH_2024)


class Sharding(Choice):
    """How data-parallel ranks hold the model states (Rajbhandari et al. 2020, "ZeRO"; memory-math.md section 7).

    ddp    torch DistributedDataParallel: everything replicated, plus the reducer's gradient buckets.
    zero1  DeepSpeed ZeRO stage 1: optimizer states (and fp32 master weights) partitioned.
    zero2  stage 2: also gradients.
    zero3  stage 3: also parameters, gathered one module at a time.
    fsdp   torch FSDP2 (``fully_shard``) through accelerate; ``FsdpShard`` says full-shard or shard-grad-op.
    """

    NONE = "none"
    DDP = "ddp"
    ZERO1 = "zero1"
    ZERO2 = "zero2"
    ZERO3 = "zero3"
    FSDP = "fsdp"

    @property
    def shards_optimizer(self) -> bool:
        return self in (Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3, Sharding.FSDP)

    @property
    def shards_gradients(self) -> bool:
        return self in (Sharding.ZERO2, Sharding.ZERO3, Sharding.FSDP)

    @property
    def is_deepspeed(self) -> bool:
        return self in (Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3)


class FsdpShard(Choice):
    """FSDP's sharding strategy (accelerate ``fsdp_reshard_after_forward``; FSDP1's ``ShardingStrategy``)."""

    FULL_SHARD = "full-shard"  # reshard_after_forward=True: parameters gathered per unit in forward and again in backward
    SHARD_GRAD_OP = "shard-grad-op"  # reshard_after_forward=False: gathered parameters stay from forward to backward


class Offload(Choice):
    """What moves to host memory (DeepSpeed ``offload_optimizer`` / ``offload_param``; FSDP2 ``CPUOffloadPolicy``)."""

    NONE = "none"
    OPTIMIZER = "optimizer"  # optimizer states, fp32 master weights and the step (DeepSpeed ZeRO-Offload, CPU Adam)
    PARAMS = "params"  # also the parameters (and gradients) at rest: ZeRO-3 offload_param, FSDP2 CPUOffloadPolicy


class Quant(Choice):
    """The quantized base of ``--method qlora``: bitsandbytes 4-bit (``load_in_4bit``) or LLM.int8 (``load_in_8bit``),
    or a GPTQ int4 checkpoint (``GPTQConfig(bits=4, disable_exllama=True)``: auto-gptq's QuantLinear)."""

    NF4 = "nf4"
    FP4 = "fp4"
    INT8 = "int8"  # bitsandbytes Linear8bitLt (LLM.int8, Dettmers et al. 2022): int8 weights plus per-row scales
    INT4_GPTQ = "int4-gptq"  # a GPTQ checkpoint through auto-gptq's QuantLinear (terms/gptq.py)
    NONE = "none"  # a 16-bit base: what a peft method (dora, ia3, ...) gets without --quant (not for qlora)

    @property
    def bits(self) -> int:
        return 8 if self is Quant.INT8 else 4


class QuantStateDtype(Choice):
    """The dtype ``dequantize_4bit`` returns: the quant state's, i.e. the dtype the weight had when it was quantized
    (``bitsandbytes/functional.py::dequantize_4bit`` allocates ``quant_state.dtype``); ``MatMul4Bit`` then casts it to
    the input's dtype (``.to(A.dtype)``), a second copy when the two differ. ``auto``: the dtype the model was loaded
    in (transformers quantizes the checkpoint's own tensors); Lightning's bitsandbytes plugin quantizes an fp16 copy
    (``lightning/fabric/plugins/precision/bitsandbytes.py``: ``.to(device="cuda", dtype=torch.half)``)."""

    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class QuantStorage(Choice):
    """The dtype bitsandbytes packs 4-bit codes into (``bnb_4bit_quant_storage``; ``Params4bit.quant_storage``).

    bitsandbytes 0.50.2 ``_ops.py:235`` (``quantize_4bit``'s fake kernel; ``backends/default/ops.py:257`` views the
    packed bytes as that dtype): a weight of n elements is stored as ``[(n + 1) // (2·itemsize), 1]`` of the storage
    dtype, the same n/2 bytes either way. What differs is FSDP: accelerate 1.16 ``utils/fsdp_utils.py:772-847``
    leaves every frozen non-floating ``Params4bit`` out of ``fully_shard`` (``ignored_params``: whole on every rank),
    while a floating storage is sharded like any frozen parameter ("set bnb_4bit_quant_storage to a floating dtype
    (e.g. bf16)" to shard 4-bit weights). The quantization state (absmax, nested absmax, codes, offset) is a
    ``Linear4bit.quant_state`` attribute, not a parameter: FSDP never shards it and every rank keeps it whole
    (``bitsandbytes/nn/modules.py:487`` ``fix_4bit_weight_quant_state_from_module`` re-attaches it to the gathered
    weight: "the quant state got lost when the parameter got converted. This happens for example for fsdp").
    transformers then sets FSDP's mixed-precision policy to the storage dtype (transformers 5.25.0
    ``distributed/fsdp.py:280-286``), so the packed codes are gathered as they are, never cast."""

    UINT8 = "uint8"  # bitsandbytes' and transformers' default (BitsAndBytesConfig bnb_4bit_quant_storage=None -> uint8)
    BF16 = "bf16"  # FSDP-QLoRA (bitsandbytes docs/source/fsdp_qlora.md; peft docs/source/accelerate/fsdp.md)


class GptqKernel(Choice):
    """Which QuantLinear runs a GPTQ base (``--quant int4-gptq``; ``terms/gptq.py``).

    cuda-old   auto-gptq's ``qlinear_cuda_old`` (``qlinear_cuda`` with ``--gptq-desc-act``), what transformers +
               optimum load with ``GPTQConfig(disable_exllama=True)`` (QwenLM/Qwen ``finetune.py``'s Q-LoRA): its
               torch path dequantizes in int32/int8 steps and ``torch.matmul`` saves the dequantized weight.
    triton-v2  the ``tritonv2`` QuantLinear of gptqmodel / auto-gptq, the only kernel fms-acceleration's
               ``accelerated-peft-autogptq`` plugin accepts (fms-acceleration@24bdadb
               ``plugins/accelerated-peft/src/fms_acceleration_peft/framework_plugin_autogptq.py:53-55``
               ``_check_config_equal(key="peft.quantization.auto_gptq.kernel", value="triton_v2")``): a Triton kernel
               dequantizes to an fp16 [in, out] weight for one matmul and frees it; its autograd function saves only
               the packed buffers and dequantizes again in backward (``gptqmodel/nn_modules/triton_utils/
               dequant.py:103-161``)."""

    CUDA_OLD = "cuda-old"
    TRITON_V2 = "triton-v2"


class DeviceMap(Choice):
    """Model parallelism without data parallelism: ``from_pretrained(device_map=...)`` (``terms/device_map.py``).

    none   the whole model on each GPU.
    auto   accelerate's balanced map: the decoder layers in order across ``--num-gpus`` GPUs, one GPU computing at
           a time (a naive pipeline)."""

    NONE = "none"
    AUTO = "auto"


class PipelineSchedule(Choice):
    """torch.distributed.pipelining's schedule for ``--pp`` (torchtitan ``experimental.pipeline_parallel_schedule``,
    default "1F1B", config_manager.py@9dec370:318-329; ``terms/pipeline_parallel.py``).

    1f1b              ``Schedule1F1B``: one stage per rank; stage i runs min(M, P - i) forwards before its first
                      backward, then one backward and one forward in turn.
    interleaved-1f1b  ``ScheduleInterleaved1F1B``: two stages per rank (torchtitan's default split for a looped
                      schedule, pipelining_utils.py@9dec370:20-31), rank r holding stages r and r + P.
    gpipe             ``ScheduleGPipe``: one stage per rank; every microbatch's forward, then every backward.
    """

    ONE_F_ONE_B = "1f1b"
    INTERLEAVED_1F1B = "interleaved-1f1b"
    GPIPE = "gpipe"

    @property
    def stages_per_rank(self) -> int:
        return 2 if self is PipelineSchedule.INTERLEAVED_1F1B else 1


class TpPlan(Choice):
    """Which tensor-parallel plan ``--tp`` runs (``terms/tensor_parallel.py``).

    hf          transformers' ``tp_plan="auto"`` (the family's ``base_model_tp_plan``): colwise q/k/v and MLP input
                projections, rowwise o and MLP output projection, all-reduced to a replicated [b, s, h] residual
                stream; lm_head's output all-gathered to the full vocabulary before the loss.
    torchtitan  torchtitan's ``apply_tp`` (``parallelisms/parallelize_llama.py`` @9dec370): the same colwise/rowwise
                split with Megatron-style sequence parallelism (the norms ``SequenceParallel``, the residual stream
                and the embedding's output ``Shard(1)``: [b, s/T, h] per rank, all-gathered before each attention,
                MLP and the output projection, reduce-scattered after them) and loss parallelism (the output layer's
                logits stay ``Shard(-1)``, [b, s, V/T] per rank, under ``loss_parallel()``)."""

    HF = "hf"
    TORCHTITAN = "torchtitan"


class Stack(Choice):
    """The training stack whose defaults a setup starts from (``vramcalc/stacks.py`` lists what each one sets)."""

    HF = "hf"  # transformers Trainer + peft (vramcalc's historic defaults)
    TRL = "trl"
    AXOLOTL = "axolotl"
    LLAMA_FACTORY = "llama-factory"
    UNSLOTH = "unsloth"
    TORCHTUNE = "torchtune"
    LITGPT = "litgpt"


class Task(Choice):
    """What the step trains (issue 15; ``terms/tasks.py``). ``sft`` is vramcalc's supervised step; the preference
    tasks follow TRL 1.16's DPOTrainer: ``dpo`` and ``ipo`` (a DPOConfig ``loss_type``) with a reference model,
    ``simpo``, ``orpo`` and ``cpo`` reference-free (the same concatenated chosen+rejected forward); ``kto`` follows
    KTOTrainer (b unpaired rows and their KL batch); ``grpo`` follows GRPOTrainer; ``reward`` follows
    RewardTrainer (a sequence classifier: ``model.reward_spec``); ``distill`` follows GKDTrainer (a teacher beside the
    student, off-policy); ``classify`` is transformers' Trainer on ``AutoModelForSequenceClassification`` of an
    encoder family (BERT, whose only task it is: ``terms/encoder.py``), the model's own cross-entropy on
    [b, num_labels] logits."""

    SFT = "sft"
    DPO = "dpo"
    IPO = "ipo"
    SIMPO = "simpo"
    ORPO = "orpo"
    CPO = "cpo"
    KTO = "kto"
    REWARD = "reward"
    GRPO = "grpo"
    DISTILL = "distill"
    CLASSIFY = "classify"

    @property
    def is_preference(self) -> bool:
        """Chosen and rejected completions of a prompt concatenated in one forward of 2·b rows."""
        return self in (Task.DPO, Task.IPO, Task.SIMPO, Task.ORPO, Task.CPO)

    @property
    def reference_free(self) -> bool:
        return self in (Task.SIMPO, Task.ORPO, Task.CPO)

    @property
    def uses_fused_head(self) -> bool:
        """Scored by TRL's fused lm_head (DPOTrainer and GRPOTrainer 1.16 always add it)."""
        return self.is_preference or self in (Task.KTO, Task.GRPO)


class RolloutEngine(Choice):
    """What generates GRPO's completions (TRL 1.16 ``GRPOConfig.use_vllm``, ``vllm_mode="colocate"``)."""

    HF = "hf"  # transformers ``generate`` on the policy (use_vllm=False, the default)
    VLLM = "vllm"  # a vLLM engine in the training process, reserving a fraction of the GPU (modelled)


class RefModel(Choice):
    """Where a preference task's reference log-probs come from (TRL 1.16 ``dpo_trainer.py:908-929,1318-1338``)."""

    COPY = "copy"  # a frozen second model, loaded like the policy (same dtype and quantization)
    ADAPTER = "adapter"  # the policy with its peft adapter disabled (``use_adapter(model, None)``): LoRA/QLoRA only
    PRECOMPUTED = "precomputed"  # ``precompute_ref_log_probs=True``: two floats per pair in the batch
    NONE = "none"  # reference-free losses (SimPO, ORPO, CPO)


class GradCkpt(Choice):
    """Activation checkpointing. ``full``: each decoder layer keeps only its input and recomputes the rest in backward
    (transformers ``gradient_checkpointing_enable``, non-reentrant in v5). ``selective``: torch's op-level policy
    (``torch.utils.checkpoint.create_selective_checkpoint_contexts``, as torchtitan's "op" mode and Megatron's
    selective recompute use it): matmul outputs are saved, the other ops are recomputed. ``selective-op``:
    torchtitan's op-level policy itself (``torchtitan/distributed/activation_checkpoint.py`` ``_op_sac_save_list``
    with ``mm_count % 2``, copied by torchtune and NeMo Automodel): of each checkpointed layer's ``aten.mm`` calls,
    counted in call order, the odd ones (1st, 3rd, ...) are saved and the even ones recomputed, the attention
    kernels' outputs are saved, and every other op (``addmm`` of a biased Linear, ``bmm``, bitsandbytes'
    ``gemm_4bit``, ``_grouped_mm``) is recomputed. ``reentrant``: full
    checkpointing as transformers 4.x ran it (``use_reentrant=True``, its default since 4.35 and torch's before):
    the checkpointed forward runs without grad, so it builds no autograd node at all, and what an op keeps as a
    ctx attribute rather than through ``save_for_backward`` (bitsandbytes' ``MatMul4Bit`` up to 0.43,
    ``MatMul8bitLt``: ``terms/quantized.py``) is not kept from forward either; otherwise as ``full``.
    ``wrapper``: full non-reentrant checkpointing of each decoder layer applied from outside the model, by torch's
    ``checkpoint_wrapper`` (``apply_activation_checkpointing``, ``CheckpointImpl.NO_REENTRANT``: llama-recipes'
    ``fsdp_activation_checkpointing``, accelerate's FSDP plugin ``activation_checkpointing``), with transformers'
    own gradient checkpointing off, so the model runs with its config's ``use_cache`` (True for most models) and
    its KV cache (``activations.checkpointed_kv_cache``); the layers save what ``full`` saves.
    ``bool(GradCkpt.NONE)`` is False, so ``if setup.grad_ckpt:`` reads "some checkpointing"."""

    NONE = "none"
    FULL = "full"
    SELECTIVE = "selective"
    SELECTIVE_OP = "selective-op"
    REENTRANT = "reentrant"
    WRAPPER = "wrapper"

    def __bool__(self) -> bool:
        return self is not GradCkpt.NONE

    @property
    def caches_ops(self) -> bool:
        """Selective checkpointing of either policy: a layer keeps its input and a cache of chosen ops' outputs."""
        return self in (GradCkpt.SELECTIVE, GradCkpt.SELECTIVE_OP)

    @property
    def recompute(self) -> "GradCkpt":
        """What backward recomputes (the step-time model's word): reentrant checkpointing and torch's
        ``checkpoint_wrapper`` recompute as full does."""
        return GradCkpt.FULL if self in (GradCkpt.REENTRANT, GradCkpt.WRAPPER) else self

    @classmethod
    def parse(cls, value: object, option: str) -> "GradCkpt":
        if isinstance(value, bool):  # the historic on/off option: True is full checkpointing
            return cls.FULL if value else cls.NONE
        text = str(value).strip().lower() if isinstance(value, str) else None
        if text in ("true", "on", "yes", "1"):
            return cls.FULL
        if text in ("false", "off", "no", "0"):
            return cls.NONE
        return super().parse(value, option)


class Kernels(Choice):
    """Replacement kernels for the decoder's small ops. ``liger``: Liger-Kernel's RMSNorm, SwiGLU and RoPE
    (``liger_kernel/ops/rms_norm.py``, ``swiglu.py``, ``rope.py``), which save less for backward than the eager ops.
    ``unsloth``: Unsloth's decoder layer (``unsloth/models/llama.py`` ``LlamaDecoderLayer_fast_forward``): its
    ``Fast_RMS_Layernorm`` and in-place RoPE, and where LoRA covers a whole group with dropout 0 and no bias its
    manual-autograd ``LoRA_QKV``, ``LoRA_W`` and ``LoRA_MLP`` (``unsloth/kernels/fast_lora.py``). Triton only
    (estimate only on a CPU machine)."""

    NONE = "none"
    LIGER = "liger"
    UNSLOTH = "unsloth"

    @property
    def saves_norm_input(self) -> bool:
        """The RMSNorm is one Triton function that saves its input as is and a [T] fp32 rstd (Liger
        ``ops/rms_norm.py``; Unsloth ``kernels/rms_layernorm.py`` ``ctx.save_for_backward(X, W, r)``)."""
        return self in (Kernels.LIGER, Kernels.UNSLOTH)


class Interconnect(Choice):
    """The link a data-parallel ring runs on: inside a node ``nvlink`` (NVLink through NVSwitch; AMD: Infinity
    Fabric) or ``pcie``; between nodes ``infiniband`` or ``ethernet``. Not given: the GPU's own link from
    data/gpu_links.csv (NVLink where the GPU has it, else PCIe) and InfiniBand once the job spans nodes
    (``cost.link_plan`` says what each means in GB/s and where that comes from)."""

    NVLINK = "nvlink"
    PCIE = "pcie"
    INFINIBAND = "infiniband"
    ETHERNET = "ethernet"

    @property
    def between_nodes(self) -> bool:
        return self in (Interconnect.INFINIBAND, Interconnect.ETHERNET)


class LoadPath(Choice):
    """How the weights reach the GPU before training (the ``load`` phase).

    per-tensor   transformers v5 loads (and quantizes) the checkpoint one tensor at a time.
    per-layer    the stack builds each layer in 16 bits on the GPU and quantizes it at once (torchtune's LoRALinear
                 with ``quantize_base``, Lightning's bitsandbytes plugin).
    whole-model  the whole 16-bit model sits on the GPU, then it is quantized (``model.cuda()`` before quantizing).
    requantize   the quantized model is built, then ``load_state_dict`` moves each 16-bit checkpoint tensor to the GPU
                 and quantizes it again beside the whole model (torchtune 0.1.x with torchao 0.1, until 2024-08).
    """

    PER_TENSOR = "per-tensor"
    PER_LAYER = "per-layer"
    WHOLE_MODEL = "whole-model"
    REQUANTIZE = "requantize"


class AdapterDtype(Choice):
    FP32 = "fp32"  # peft default: get_peft_model(autocast_adapter_dtype=True) upcasts adapters to fp32
    BF16 = "bf16"


class ComputeDtype(Choice):
    """bitsandbytes ``bnb_4bit_compute_dtype``: the dtype 4-bit weights are dequantized to."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def dtype(self) -> DType:
        return DType(self.value)


class Vision(Choice):
    """What trains in a vision-language model's vision tower and projector (``--vision``; ``terms/vision.py``)."""

    FROZEN = "frozen"  # no parameter of the tower or projector trains; no adapter there
    LORA = "lora"  # the LoRA target names also match the tower's Linears (peft suffix matching)
    FULL = "full"  # every tower and projector parameter trains


class Term(str, Enum):
    """The named parts of a breakdown. The first six are tensors (what max_memory_allocated sees)."""

    __hash__ = object.__hash__  # identity, in C (see ``Choice``)

    WEIGHTS = "weights"
    GRADIENTS = "gradients"
    OPTIMIZER_STATES = "optimizer_states"
    ACTIVATIONS = "activations"
    LOGITS = "logits"
    TEMPORARIES = "temporaries"
    RUNTIME_OVERHEAD = "runtime_overhead"
    ALLOCATOR_SLACK = "allocator_slack"

    @property
    def is_tensor(self) -> bool:
        return self not in (Term.RUNTIME_OVERHEAD, Term.ALLOCATOR_SLACK)

    def __str__(self) -> str:
        return self.value


class Phase(str, Enum):
    """Moments of a training step at which the live set is assembled."""

    __hash__ = object.__hash__  # identity, in C (see ``Choice``)

    LOAD = "load"  # the weights reaching the GPU, before the first step
    FORWARD = "forward"
    # a later micro-batch's forward beside what the training loop still holds of the one before (litgpt's ``fit``)
    NEXT_FORWARD = "next-forward"
    BACKWARD_START = "backward-start"
    BACKWARD = "backward"
    BACKWARD_END = "backward-end"
    OPTIMIZER_STEP = "optimizer-step"
    REFERENCE_FORWARD = "reference-forward"  # a preference task's no-grad reference forward (``terms/tasks.py``)
    GENERATION = "generation"  # GRPO's rollout: the policy's ``generate`` and its KV cache (``terms/tasks.py``)

    def __str__(self) -> str:
        return self.value
