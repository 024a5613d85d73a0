"""The MindSpore child process of tests/test_pllava_model.py: PLLaVA through mindnlp, every scenario at once.

MindSpore runs here, in one process of its own, so the test process keeps real PyTorch for the other tests; it
loads each (model dir, load options) once, answers every scenario's generation options, and counts which of
Hugging Face's decoding loops ran. Run as ``python -m testkit.pllava_driver`` with the request on stdin.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    """Read {"clips", "scenarios"} on stdin, print one RESULT line of JSON."""
    import dataclasses
    import logging
    from collections import Counter

    from captioning_core import runtime

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    spec = json.loads(sys.stdin.read())
    runtime.setup_device("CPU")
    runtime.import_mindnlp()
    from transformers.generation.utils import GenerationMixin

    from captioning_core.config import RunConfig
    from captioning_core.models.pllava import PllavaCaptioner, PllavaOptions

    calls: Counter = Counter()
    for method in ("_sample", "_beam_search"):  # count which decoding loop HF actually runs
        original = getattr(GenerationMixin, method)

        def spy(self, *args, _original=original, _method=method, **kwargs):
            calls[_method] += 1
            return _original(self, *args, **kwargs)

        setattr(GenerationMixin, method, spy)
    loaded: dict[str, tuple] = {}
    results = {}
    for name, scenario in spec["scenarios"].items():
        key = json.dumps([scenario["model_dir"], scenario["load"]], sort_keys=True)
        if key not in loaded:
            cfg = RunConfig(meta_path="meta.csv", model="pllava", device_target="CPU", max_new_tokens=10,
                            pretrained_model_name_or_path=scenario["model_dir"], model_options=scenario["load"])
            captioner = PllavaCaptioner(cfg)
            captioner.setup()
            loaded[key] = (captioner, [captioner.prepare(path) for path in spec["clips"]])
        captioner, items = loaded[key]
        captioner.opts = PllavaOptions(**{**scenario["load"], **scenario["gen"]})
        calls.clear()
        ids = captioner.generate(items)
        results[name] = {"captions": [captioner.decode(row) for row in ids], "ids": ids, "calls": dict(calls),
                         "report": dataclasses.asdict(captioner.load_report)}
    sys.stdout.write("RESULT " + json.dumps(results) + "\n")  # the protocol line the test reads
    sys.stdout.flush()


if __name__ == "__main__":
    main()
