"""A value different from its default for every caption-script option.

The CLI tests show each option reaches the run config with it, and the fingerprint tests show which options
change the fingerprint with it: one table, so an option added to the scripts is added here once.
"""

from __future__ import annotations

CHANGED = {"pretrained_model_name_or_path": "/m", "question": "What happens?", "max_new_tokens": "17",
           "bs": "3", "batch_tokens": "4096", "output": "s3://b/o.csv", "device_target": "CPU",
           "dtype": "bfloat16", "gather": "allgather", "pad_length": "512", "max_row_attempts": "5",
           "video_root": "s3://b/v", "allowed_roots": "s3://b/", "prefetch_workers": "4",
           "prefetch_batches": "5", "log_every": "2.5", "height": "224", "width": "336", "fps": "3",
           "min_pixels": "6272", "max_video_tokens": "9000", "prefetch_bytes": "1000000",
           "journal_flush_rows": "7", "journal_flush_seconds": "3", "max_consecutive_errors": "2",
           "decode_timeout": "30", "max_decode_bytes": "1048576",
           "engine": "compiled"}
