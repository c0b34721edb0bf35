"""Other stacks traced with their own code on fake tensors: torchtune (``torchtune.trace_torchtune``) and litgpt
(``litgpt.trace_litgpt``); each returns the same ``MemoryBreakdown`` as ``vramcalc.trace``."""
