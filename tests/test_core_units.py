"""Pure units: sharding, journal resolution, config validation, path safety."""

from __future__ import annotations

import pytest

from captioning_core import journal, sharding
from captioning_core.config import RunConfig, default_output
from captioning_core.journal import RowResult
from captioning_core.paths import UnsafePathError, resolve_video


@pytest.mark.parametrize("world", [1, 2, 3, 7])
@pytest.mark.parametrize("n", [0, 1, 5, 12, 101])
def test_sharding_is_disjoint_covering_and_deterministic(n, world):
    shards = [sharding.rows_for_rank(n, sharding.RankInfo(r, world)) for r in range(world)]
    flat = [row for shard in shards for row in shard]
    assert sorted(flat) == list(range(n))
    assert len(flat) == len(set(flat))
    assert shards == [sharding.rows_for_rank(n, sharding.RankInfo(r, world)) for r in range(world)]


def test_rank_from_msrun_env():
    assert sharding.rank_from_env({"RANK_ID": "1", "RANK_SIZE": "2"}) == sharding.RankInfo(1, 2)
    assert sharding.rank_from_env({}) == sharding.RankInfo(0, 1)


def test_journal_roundtrip_and_best_record(tmp_path):
    prefix = str(tmp_path / "out.csv.parts")
    paths = ["a.mp4", "b.mp4", "a.mp4"]
    w1 = journal.PartWriter(prefix, rank=0)
    w1.write(
        [RowResult(0, "a.mp4", "failed", error="boom", attempts=1), RowResult(1, "b.mp4", "ok", "cap b")]
    )
    w2 = journal.PartWriter(prefix, rank=1)
    w2.write(
        [
            RowResult(0, "a.mp4", "ok", "cap a", attempts=2),
            RowResult(2, "a.mp4", "transient", error="x", attempts=3),
        ]
    )
    w2.write([RowResult(2, "WRONG.mp4", "ok", "stale record from another partition")])
    got = journal.load(prefix, paths)
    assert got[0].text == "cap a" and got[0].attempts == 2
    assert got[1].text == "cap b"
    assert got[2].status == "transient" and got[2].attempts == 3
    assert journal.is_final(got[2], max_attempts=3) and not journal.is_final(got[2], max_attempts=4)
    assert journal.is_final(RowResult(2, "a.mp4", "failed", error="no video stream"), max_attempts=4)  # data: final
    assert journal.as_published(got[2]).status == "failed" and "gave up after 3 attempts: x" in journal.as_published(
        got[2]).error
    journal.compact(prefix, got)
    assert journal.load(prefix, paths) == got
    assert len([p for p in (tmp_path / "out.csv.parts").iterdir() if p.suffix == ".jsonl"]) == 1


def test_unicode_and_newlines_survive_the_journal(tmp_path):
    prefix = str(tmp_path / "p")
    rec = RowResult(0, "vidéo 1 ✓.mp4", "ok", 'line1\nline2, "quoted"')
    journal.PartWriter(prefix, 0).write([rec])
    assert journal.load(prefix, [rec.path]) == {0: rec}


def _cfg(**kw):
    base = dict(
        meta_path="s3://b/p/meta.csv", model="qwen2vl", pretrained_model_name_or_path="m", device_target="CPU"
    )
    base.update(kw)
    return RunConfig(**base)


def test_config_defaults_and_validation():
    cfg = _cfg()
    assert cfg.output == "s3://b/p/meta_caption_qwen2vl.csv"
    assert cfg.dtype == "float32"
    assert _cfg(device_target="Ascend").dtype == "float16"
    assert default_output("/d/meta.csv", "pllava") == "/d/meta_caption_pllava.csv"
    for bad in (
        dict(bs=0),
        dict(device_target="GPU"),
        dict(gather="x"),
        dict(question=" "),
        dict(gather="allgather", pad_length=10, max_new_tokens=200),
        dict(max_row_attempts=0),
    ):
        with pytest.raises(ValueError):
            _cfg(**bad)


def test_video_paths_resolve_and_reject_escapes(tmp_path):
    cfg = _cfg(meta_path=str(tmp_path / "meta.csv"))
    assert resolve_video("clips/a b.mp4", cfg) == str(tmp_path / "clips" / "a b.mp4")
    s3cfg = _cfg()
    assert resolve_video("x/y.mp4", s3cfg) == "s3://b/p/x/y.mp4"
    assert resolve_video("s3://other/k.mp4", s3cfg) == "s3://other/k.mp4"
    for bad in ("../etc/passwd", "a/../../b.mp4", "s3://b/p/../secret.mp4", "", "a\x00b"):
        with pytest.raises(UnsafePathError):
            resolve_video(bad, s3cfg)
    # `..` is refused as written, absolute or not, with or without roots: never normalised into a path
    for climbing in ("/data/videos/../../proc/self/environ", "/data/videos/..", "s3://b/p/..\\q.mp4"):
        for cfg_ in (s3cfg, _cfg(allowed_roots=["/data/videos", "s3://b/p/"])):
            with pytest.raises(UnsafePathError, match="'..' is not allowed"):
                resolve_video(climbing, cfg_)
    jailed = _cfg(meta_path=str(tmp_path / "meta.csv"), allowed_roots=[str(tmp_path)])
    assert resolve_video("ok.mp4", jailed)
    with pytest.raises(UnsafePathError):
        resolve_video("/etc/hostname", jailed)
    (tmp_path / "out").symlink_to("/etc")
    with pytest.raises(UnsafePathError, match="outside the allowed roots"):  # a symlink out of a root is outside
        resolve_video(str(tmp_path / "out" / "hostname"), jailed)
    s3_jailed = _cfg(allowed_roots=["s3://b/p/"])
    assert resolve_video("s3://b/p/x.mp4", s3_jailed) == "s3://b/p/x.mp4"
    for outside in ("s3://other-bucket/p/x.mp4", "s3://b/px/x.mp4", "s3://b/x.mp4", "/etc/passwd"):
        with pytest.raises(UnsafePathError, match="outside the allowed roots"):
            resolve_video(outside, s3_jailed)


def test_allowed_roots_must_be_absolute_and_must_not_climb():
    assert _cfg(allowed_roots=["s3://b", "s3://b/p/", "/data/videos"]).allowed_roots
    for bad in ("s3://b/p/../q/", "/data/../etc", "videos", "", "s3:///p"):
        with pytest.raises(ValueError):
            _cfg(allowed_roots=[bad])


def test_model_dir_problems_are_named_up_front(tmp_path):
    from captioning_core.models.base import ModelDirError, check_model_dir

    with pytest.raises(ModelDirError, match="not found"):
        check_model_dir(str(tmp_path / "nope"))
    model = tmp_path / "m"
    model.mkdir()
    with pytest.raises(ModelDirError, match=r"config\.json.*weights.*tokenizer"):
        check_model_dir(str(model))
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    (model / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    (model / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ModelDirError, match="model-00002-of-00002"):
        check_model_dir(str(model))
    (model / "model-00002-of-00002.safetensors").write_bytes(b"")
    check_model_dir(str(model))


def test_fault_plan_targets_a_rank_and_optionally_one_airflow_try():
    from captioning_core.faults import FaultPlan

    spec = {"CAPTION_FAULTS": "sigkill@1:2/try1, oom@0:3+5, slow@1:0.5"}
    assert FaultPlan.from_env(0, spec) == FaultPlan(oom_rows={3, 5})
    assert FaultPlan.from_env(1, spec) == FaultPlan(sleep_per_batch=0.5)  # not in an Airflow try: no kill
    assert FaultPlan.from_env(1, {**spec, "AIRFLOW_CTX_TRY_NUMBER": "1"}).kill_after_rows == 2
    assert FaultPlan.from_env(1, {**spec, "AIRFLOW_CTX_TRY_NUMBER": "2"}).kill_after_rows is None
    with pytest.raises(MemoryError, match=r"rows \[3\]"):
        FaultPlan.from_env(0, spec).before_generate([2, 3])
    for bad in ("explode@0:1", "sigkill@0:1/second"):
        with pytest.raises(ValueError, match="CAPTION_FAULTS"):
            FaultPlan.from_env(0, {"CAPTION_FAULTS": bad})


def test_fault_kinds_for_the_retry_drills_parse_with_any_rank_and_try():
    from captioning_core.faults import FaultPlan

    env = {"CAPTION_FAULTS": "runtime@*/try1,crash_publish@1", "AIRFLOW_CTX_TRY_NUMBER": "1"}
    assert FaultPlan.from_env(0, env).runtime_error and FaultPlan.from_env(1, env).runtime_error
    assert not FaultPlan.from_env(0, env).crash_before_output and FaultPlan.from_env(1, env).crash_before_output
    assert not FaultPlan.from_env(0, {**env, "AIRFLOW_CTX_TRY_NUMBER": "2"}).runtime_error
    assert FaultPlan.from_env(1, {"CAPTION_FAULTS": "sigkill@1:2/try1", "AIRFLOW_CTX_TRY_NUMBER": "1"}).kill_after_rows == 2
    with pytest.raises(RuntimeError, match="injected model-runtime error"):
        FaultPlan(runtime_error=True).before_generate([0])


def test_import_mindnlp_leaves_the_diffusers_port_out_and_says_so_on_use():
    """A rank's start-up skips mindnlp's diffusers port (benchmark 12); transformers still comes through
    mindtorch, and touching the skipped module names it. In a fresh interpreter: mindnlp replaces torch."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys
from captioning_core import runtime
runtime.setup_device("CPU")
runtime.import_mindnlp()
import torch
from mindnlp import transformers
assert "diffusers" not in sys.modules, "diffusers was imported"
assert torch.__name__ == "mindtorch" or "mindtorch" in torch.__file__, torch.__file__
assert hasattr(transformers, "Qwen2VLForConditionalGeneration")
try:
    sys.modules["mindnlp"].diffusers.DiffusionPipeline
except AttributeError as err:
    print(err)
"""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mindnlp.diffusers is not loaded by the captioning stage" in proc.stdout


def test_changed_rows_compares_the_metas_video_etag_with_the_outputs():
    import gzip

    from captioning_core.output_identity import changed_rows

    meta = b"path,video_etag\ns3://b/a.mp4,e1\ns3://b/b.mp4,e2\ns3://b/c.mp4,\n"
    made = b"path,video_etag,text,caption_status,caption_error\ns3://b/a.mp4,e1,x,ok,\ns3://b/b.mp4,e0,y,ok,\n" \
           b"s3://b/c.mp4,e9,z,ok,\n"
    assert changed_rows(meta, made) == [1]  # c names no identity: whatever the output says is fine
    assert changed_rows(b"\xef\xbb\xbf" + meta, gzip.compress(made), "m.csv", "o.csv.gz") == [1]
    assert changed_rows(b"path\ns3://b/a.mp4\n", made) == []  # a meta without the column names none
    assert changed_rows(meta, b"path,video_etag\ns3://b/a.mp4,e1\n") == [0, 1, 2]  # not this meta's output
    assert changed_rows(meta, b"path,text\ns3://b/a.mp4,x\ns3://b/b.mp4,y\ns3://b/c.mp4,z\n") == [0, 1]


def test_journal_records_of_another_video_are_not_reused(tmp_path):
    paths = ["a.mp4", "b.mp4", "c.mp4"]
    writer = journal.PartWriter(str(tmp_path / "parts"), 0)
    writer.write([RowResult(0, "a.mp4", "ok", "red", video_etag="e1"), RowResult(1, "b.mp4", "ok", "green",
                  video_etag="e0"), RowResult(2, "c.mp4", "ok", "blue")])
    assert sorted(journal.load(str(tmp_path / "parts"), paths)) == [0, 1, 2]  # no identities: as before
    got = journal.load(str(tmp_path / "parts"), paths, identities=["e1", "e2", ""])
    assert sorted(got) == [0, 2] and got[0].video_etag == "e1"
    assert RowResult.from_json(got[0].to_json()) == got[0]
