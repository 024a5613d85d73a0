"""A compiled MindSpore engine for the Qwen captioners (issue 23): vision tower, prefill and decode as graphs.

The eager path runs transformers' modelling code through mindnlp on MindSpore PyNative, which dispatches one
op at a time from Python; on these machines that, not the kernels, bounds generate. Here the same model is
written as plain MindSpore ``nn.Cell`` graphs (no mindnlp/mindtorch inside them), compiled once per shape
bucket, with a static KV cache updated in place. Host work (M-RoPE positions, masks' segment ids, the greedy
loop's stop bookkeeping) stays in numpy.

Modules: ``device`` (jit level, dtype, attention-op choice), ``checkpoint`` (safetensors straight into
Parameters), ``rope`` (host position ids), ``qwen2vl_vision`` / ``qwen2_5vl_vision`` / ``qwen2vl_text`` (the
cells), ``qwen2vl`` (the engine: buckets, sessions, greedy loop, and the captioner-facing ``generate``);
Qwen3-VL: ``qwen3vl_text`` / ``qwen3vl_vision`` (its cells, subclassing or reusing Qwen2-VL's) and ``qwen3vl``
(``CompiledQwen3VL``, the same engine with Qwen3-VL's hooks).
"""
