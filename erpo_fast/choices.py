"""Every enumerated setting's allowed values, declared once (no torch import, so config.py can use them).

config.py offers them as the knobs' choices; algorithms.py, the kernels and models.py validate against them.
"""

ADVANTAGE_METHODS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")  # one registered estimator each (algorithms.py)
KL_KINDS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")
IS_LEVELS = ("token", "sequence")
IS_MASK_LEVELS = ("token", "sequence")
LOSS_TYPES = ("ppo", "cispo")
LOGPROB_TEMPERATURES = ("row", "one")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ENGINES = ("native", "vllm")
LORA_SYNC_MODES = ("auto", "merged", "adapters")
TASKS = ("arithmetic", "digits")  # built-in tasks: each a module erpo_fast/tasks/<name>.py (the Task protocol)
LR_SCHEDULES = ("constant", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "loop")
CPU_HEAP_MODES = ("auto", "release", "reuse")  # erpo_fast/cpu_heap.py
