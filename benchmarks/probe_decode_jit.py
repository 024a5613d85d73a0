"""Probe: can MindSpore compile Qwen2-VL's decode step under mindnlp 0.5.1, and what does a token cost then?

    .venv/bin/python -m benchmarks.probe_decode_jit        # prints one JSON line per step, then a summary

On the shipped tiny Qwen2-VL (CPU): prefill one prepared video, then time single-token decode steps
(batch 1 and batch 32) eagerly with the dynamic cache and with a static cache; then try to compile one decode
step with ``mindspore.jit`` (AST and bytecode capture) and with ``torch.compile`` (mindtorch's), and record
exactly what each attempt raised. Each attempt runs in this process after the eager figures are taken, so
a failure cannot spoil them. Figures are for docs/BENCHMARKS.md (item 10).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STEPS = 16


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)  # noqa: T201


def main() -> int:
    import os

    os.chdir(tempfile.mkdtemp(prefix="probe-jit-"))  # MindSpore writes analyze_fail.ir under the cwd
    from captioning_core import runtime

    runtime.setup_device("CPU")
    runtime.import_mindnlp()
    import mindspore
    import numpy as np
    import torch  # mindtorch under mindnlp
    from transformers import DynamicCache, StaticCache

    from captioning_core.config import RunConfig
    from captioning_core.models.qwen2_vl import Qwen2VLCaptioner
    from testkit.clips import ClipSpec, ensure_clip
    from testkit.paths import TINY_QWEN2VL
    from testkit.profile import TINY

    clip = ensure_clip(ClipSpec("red", "left", "square", 320, 240, 25, 2.0, 25), tempfile.mkdtemp(prefix="probe-"))
    cfg = RunConfig(meta_path="unused.csv", model="qwen2vl", pretrained_model_name_or_path=str(TINY_QWEN2VL),
                    device_target="CPU", max_new_tokens=STEPS, model_options=TINY.model_options())
    cap = Qwen2VLCaptioner(cfg)
    cap.setup()
    model = cap.model
    item = cap.prepare(str(clip))
    emit(step="versions", mindspore=mindspore.__version__, torch_api=getattr(torch, "__version__", "?"))

    def inputs(batch: int) -> dict:
        arrays = cap.model_inputs([item] * batch)
        out = {k: torch.tensor(v) for k, v in arrays.items()}
        return out

    def decode_loop(batch: int, cache_kind: str, step_fn=None) -> tuple[float, list[int]]:
        """Prefill, then STEPS greedy single-token steps; seconds per step (steps 2..n) and row 0's tokens."""
        kw = inputs(batch)
        length = kw["input_ids"].shape[1]
        if cache_kind == "static":
            cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=length + STEPS + 1,
                                dtype=torch.float32)
        else:
            cache = DynamicCache()
        with torch.no_grad():
            out = model(**kw, past_key_values=cache, use_cache=True, cache_position=torch.arange(length))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            rope_deltas = out.rope_deltas
            mask = kw["attention_mask"]
            tokens, times = [int(token[0, 0])], []
            for step in range(STEPS - 1):
                mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype)], dim=1)
                position = torch.tensor([length + step])
                t = time.perf_counter()
                if step_fn is None:
                    logits = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True,
                                   cache_position=position, rope_deltas=rope_deltas).logits
                else:
                    logits = step_fn(token, mask, cache, position, rope_deltas)
                token = logits[:, -1].argmax(-1, keepdim=True)
                _ = int(token[0, 0])  # synchronise
                times.append(time.perf_counter() - t)
                tokens.append(int(token[0, 0]))
        return float(np.median(times[1:])), tokens

    reference = None
    for batch in (1, 32):
        for kind in ("dynamic", "static"):
            try:
                per_step, tokens = decode_loop(batch, kind)
                reference = reference or tokens
                emit(step=f"eager {kind} cache, batch {batch}", seconds_per_step=round(per_step, 4),
                     tokens_per_second=round(batch / per_step, 1), same_tokens=tokens == reference)
            except Exception as err:
                emit(step=f"eager {kind} cache, batch {batch}", error=f"{type(err).__name__}: {err}"[:600],
                     where=traceback.format_exc().strip().splitlines()[-3][:300])

    def raw_step(token, mask, cache, position, rope_deltas):
        return model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True,
                     cache_position=position, rope_deltas=rope_deltas).logits

    attempts = {"mindspore.jit(capture_mode='ast')": lambda: mindspore.jit(raw_step, capture_mode="ast"),
                "mindspore.jit(capture_mode='bytecode', fullgraph=True)":
                    lambda: mindspore.jit(raw_step, capture_mode="bytecode", fullgraph=True),
                "mindspore.jit(capture_mode='bytecode')": lambda: mindspore.jit(raw_step, capture_mode="bytecode"),
                "torch.compile (mindtorch)": lambda: torch.compile(raw_step),
                "model.compile() (mindtorch Module)": lambda: (model.compile(), raw_step)[1]}
    for name, make in attempts.items():
        started = time.perf_counter()
        try:
            fn = make()
            _, tokens = decode_loop(1, "static", fn)  # compiles (if it does) and checks the tokens
            compiled_in = time.perf_counter() - started
            for batch in (1, 32):  # eager and this step alternately, 3 rounds: the machine's load drifts
                eager, mine = [], []
                for _ in range(3):
                    eager.append(decode_loop(batch, "static")[0])
                    mine.append(decode_loop(batch, "static", fn)[0])
                emit(step=f"{name}, batch {batch}", seconds_per_step=round(float(np.median(mine)), 4),
                     eager_seconds_per_step=round(float(np.median(eager)), 4),
                     speedup=round(float(np.median(eager) / np.median(mine)), 3), same_tokens=tokens == reference,
                     first_call_seconds=round(compiled_in, 1), compiled=fn is not raw_step)
        except Exception as err:
            tb = traceback.format_exc().strip().splitlines()
            emit(step=name, error=f"{type(err).__name__}: {err}"[:1500],
                 where=[line.strip()[:200] for line in tb if line.strip().startswith("File")][-3:],
                 seconds_before_failure=round(time.perf_counter() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
