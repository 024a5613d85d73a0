"""What a DAG's ``env`` may set for the ranks: an allow-list, so no variable goes past an operator gate.

The operator's parameters are its gates: ``allow_pickled_weights``, ``allow_fault_injection``, the S3
connection (``aws_conn_id``) and the partition lease. Each has an environment variable behind it, and a
variable the DAG could set itself would open the gate without the parameter (``CAPTION_ALLOW_PICKLED_WEIGHTS=1``
loads pickled weights, ``AWS_ENDPOINT_URL_S3`` beats the connection's endpoint, a forged ``CAPTION_LEASE``
fences nothing). Variables that change which code a rank loads (``LD_PRELOAD``, ``PYTHONPATH``, ``PATH``) are
not tuning either. So ``env`` is limited to tuning knobs: the runtime's own families (MindSpore, HCCL,
Ascend/CANN, glog), thread counts, locale and the stage's ``CAPTION_*`` settings other than the gated ones.
"""

from __future__ import annotations

from collections.abc import Mapping

from captioning_core.faults import ENV as FAULTS_ENV
from captioning_core.lease_fence import LEASE_ENV
from captioning_core.models.base import PICKLED_WEIGHTS_ENV

#: variable families a DAG may tune, by prefix ...
DAG_ENV_PREFIXES = ("MS_", "MINDSPORE_", "HCCL_", "ASCEND_", "ACL_", "CANN_", "GLOG_", "LC_", "CAPTION_")
#: ... and by exact name
DAG_ENV_NAMES = frozenset({"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TZ", "LANG",
                           "LANGUAGE", "TMPDIR", "PYTHONHASHSEED", "PYTHONUNBUFFERED", "PYTHONIOENCODING"})
#: stage variables behind an operator gate: name -> the parameter that sets it
GATED = {PICKLED_WEIGHTS_ENV: "allow_pickled_weights=True", FAULTS_ENV: "allow_fault_injection=True",
         LEASE_ENV: "the operator's own partition lease"}


def refusals(env: Mapping[str, str], *, allow_fault_injection: bool = False) -> list[str]:
    """Why each name of ``env`` a DAG may not set is refused, one ``NAME (reason)`` per name, sorted."""
    out = []
    for name in sorted(env):
        upper = name.upper()
        if upper.startswith("AIRFLOW"):
            out.append(f"{name} (Airflow settings never reach the ranks)")
        elif upper.startswith("AWS_"):
            out.append(f"{name} (S3 settings come from the Airflow connection, aws_conn_id)")
        elif name in GATED:
            if name != FAULTS_ENV or not allow_fault_injection:
                out.append(f"{name} (set by {GATED[name]})")
        elif name not in DAG_ENV_NAMES and not name.startswith(DAG_ENV_PREFIXES):
            out.append(f"{name} (not a tuning variable: the ranks' code, paths and credentials are not the "
                       f"DAG's to change)")
    return out
