"""AscendCaptionOperator: templating, argv building, and values that must arrive literally."""

from __future__ import annotations

import pytest

from operators.ascend_caption import AscendCaptionOperator, caption_argv
from operators.msrun_hook import MsrunHook, MsrunSpec, port_for

HOSTILE = "x'; rm -rf / #$(touch /tmp/pwned)`id` && echo \"$HOME\" | cat > /dev/null ; *"


def test_template_fields_render():
    op = AscendCaptionOperator(
        task_id="caption", meta_path="s3://b/{{ params.prefix }}/{{ ds }}/meta.csv", model="{{ params.model }}",
        model_dir="/models/{{ params.model }}", caption_options={"question": "{{ params.q }}", "bs": 2},
        log_dir="/logs/{{ ds_nodash }}", env={"X": "{{ params.q }}"}, worker_num="{{ params.n }}")
    op.render_template_fields({"ds": "2026-11-22", "ds_nodash": "20261122",
                               "params": {"prefix": "p", "model": "pllava", "q": "what?", "n": 4}})
    assert op.meta_path == "s3://b/p/2026-11-22/meta.csv"
    assert op.model == "pllava" and op.model_dir == "/models/pllava"
    assert op.caption_options == {"question": "what?", "bs": 2}
    assert op.log_dir == "/logs/20261122" and op.env == {"X": "what?"}
    assert op.worker_num == "4"
    assert set(AscendCaptionOperator.template_fields) >= {"meta_path", "model", "model_dir", "output_uri",
                                                         "caption_options", "msrun_options", "log_dir", "env"}


def test_templated_dicts_render_natively_when_mapped():
    """Under mapping the operator is built before rendering: a dict field may still be a template string."""
    import datetime

    from airflow.sdk import DAG

    with DAG("d", schedule=None, start_date=datetime.datetime(2026, 1, 1), render_template_as_native_obj=True):
        op = AscendCaptionOperator(task_id="c", meta_path="s3://b/m.csv", model_dir="/m",
                                   caption_options="{{ params.opts }}", worker_num="{{ params.n }}")
    op.render_template_fields({"params": {"opts": {"bs": 2, "question": HOSTILE}, "n": 4}})
    assert op.caption_options == {"bs": 2, "question": HOSTILE} and op.worker_num == 4


def test_caption_argv_is_a_list_of_literal_values():
    argv = caption_argv({"question": HOSTILE, "bs": 2, "skip_if_existing": True, "use_lora": False,
                         "allowed_root": ["s3://a/", "s3://b/"]})
    assert argv == ["--question", HOSTILE, "--bs", "2", "--skip_if_existing", "--allowed_root", "s3://a/",
                    "--allowed_root", "s3://b/"]
    with pytest.raises(ValueError):
        caption_argv({"bs; rm -rf /": 1})


def test_msrun_argv_and_validation(tmp_path):
    spec = MsrunSpec(script="/x/caption_qwen2vl.py", script_args=["s3://b/k.csv", "--question", HOSTILE],
                     log_dir=str(tmp_path / "log"), worker_num=4, local_worker_num=2, node_rank=1,
                     master_addr="10.0.0.5", master_port=30000)
    argv = MsrunHook(spec, python="/venv/bin/python").build_argv()
    assert argv[0] == "/venv/bin/msrun"
    assert "--worker_num=4" in argv and "--local_worker_num=2" in argv and "--node_rank=1" in argv
    assert "--master_addr=10.0.0.5" in argv and "--master_port=30000" in argv and "--join=True" in argv
    assert argv[-4:] == ["/x/caption_qwen2vl.py", "s3://b/k.csv", "--question", HOSTILE]
    for bad in (dict(log_dir="/tmp/a;b"), dict(log_dir="$(id)"), dict(master_addr="h;x"),
                dict(worker_num=2, local_worker_num=3), dict(worker_num=4, local_worker_num=2)):
        with pytest.raises(ValueError):
            MsrunSpec(script="s.py", **{"log_dir": "l", **bad})


def test_master_port_is_stable_per_task_and_spread():
    ports = {port_for(f"dag/run/caption/{i}") for i in range(200)}
    assert port_for("dag/run/caption/3") == port_for("dag/run/caption/3")
    assert len(ports) > 190 and all(20000 <= p < 60000 for p in ports)


def test_gallery_view_only_serves_caption_objects():
    from caption_gallery_plugin import allowed_key

    assert allowed_key("p/meta_caption_qwen2vl.csv.gallery/index.html")
    assert allowed_key("p/meta_caption_qwen2vl.csv.gallery/thumbs/00000001.jpg")
    assert allowed_key("p/meta_caption_qwen2vl.csv") and allowed_key("p/meta_caption_qwen2vl.csv.summary.json")
    for key in ("p/meta.csv", "p/videos/a.mp4", "p/x.gallery/../../secret.csv", "/etc/passwd",
                "p/meta_caption_qwen2vl.csv.parts/x.jsonl", "p/meta_caption_qwen2vl.csv.lease"):
        assert not allowed_key(key), key


def test_extra_links_point_at_the_gallery_view():
    from operators.ascend_caption import CaptionGalleryLink, CaptionOutputLink

    op = AscendCaptionOperator(task_id="caption", meta_path="s3://b/p/meta.csv", model_dir="/m",
                               aws_conn_id="caption_s3")
    assert CaptionGalleryLink().get_link(op, ti_key=None) == ""  # nothing before the task ran
    op.output_uri = "s3://b/p/meta_caption_qwen2vl.csv"
    assert CaptionGalleryLink().get_link(op, ti_key=None).endswith(
        "/caption-gallery/caption_s3/b/p/meta_caption_qwen2vl.csv.gallery/index.html")
    assert CaptionOutputLink().get_link(op, ti_key=None).endswith("/caption-gallery/caption_s3/b/p/meta_caption_qwen2vl.csv")
