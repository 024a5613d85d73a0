"""Child of item 12: what a rank pays before its first line of work, importing mindnlp one way or the other.

    python -m benchmarks.child_rank_import '{"skip": true}'

``skip`` true: ``runtime.import_mindnlp()`` (mindnlp's diffusers port left out); false: a plain
``import mindnlp``. The clock starts before captioning_core is imported. Prints one JSON line: seconds, and
whether diffusers got imported.
"""

from __future__ import annotations

import json
import sys
import time


def measure(skip: bool) -> dict:
    t = time.perf_counter()
    from captioning_core import runtime

    runtime.setup_device("CPU")
    if skip:
        runtime.import_mindnlp()
    else:
        import mindnlp  # noqa: F401
    from mindnlp import transformers  # noqa: F401
    return {"seconds": time.perf_counter() - t, "diffusers": "diffusers" in sys.modules}


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
