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
    argv = caption_argv({"question": HOSTILE, "bs": 2, "use_lora": True, "use_lora2": False,
                         "allowed_root": ["s3://a/", "s3://b/"]})
    assert argv == [f"--question={HOSTILE}", "--bs=2", "--use_lora", "--allowed_root=s3://a/",
                    "--allowed_root=s3://b/"]
    with pytest.raises(ValueError):
        caption_argv({"bs; rm -rf /": 1})


def _rendered(**caption_options) -> AscendCaptionOperator:
    op = AscendCaptionOperator(task_id="caption", meta_path="s3://b/-p/meta.csv", model_dir="/models/q",
                               output_uri="s3://b/-p/out.csv", caption_options=caption_options)
    return op


@pytest.mark.parametrize("owned", ["output", "pretrained_model_name_or_path", "meta_path", "skip_if_existing",
                                   "allow_pickled_weights", "allowed_root", "allowed_roots"])
def test_caption_options_may_not_override_what_the_operator_owns(owned):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match=f"caption_options may not set .*{owned}"):
        _rendered(**{owned: "s3://elsewhere/x.csv", "bs": 2})._script_args()


def _roots(op: AscendCaptionOperator) -> list[str]:
    from captioning_core.cli import build_parser

    return build_parser("qwen2vl").parse_args(op._script_args()).allowed_roots


def test_the_ranks_read_only_under_the_allowed_roots_by_default_the_meta_bucket(capfd):
    """Not given: the meta CSV's bucket; given (templated list): exactly those; ``[]``: anything, with a warning."""
    from airflow.sdk.exceptions import AirflowFailException

    assert _roots(_rendered(bs=2)) == ["s3://b/"]
    op = AscendCaptionOperator(task_id="c", meta_path="s3://b/meta/k/m.csv", model_dir="/m",
                               allowed_roots=["s3://b/{{ params.prefix }}/{{ ds }}/", "/mnt/{{ params.prefix }}"])
    op.render_template_fields({"ds": "2026-11-22", "params": {"prefix": "incoming"}})
    assert _roots(op) == ["s3://b/incoming/2026-11-22/", "/mnt/incoming"]
    op = AscendCaptionOperator(task_id="c", meta_path="s3://b/m.csv", model_dir="/m", allowed_roots=[])
    assert _roots(op) == []
    assert "allowed_roots is empty" in "".join(capfd.readouterr())  # the task log (structlog, to stderr)
    for bad in (["s3://b/incoming/../meta/"], ["relative/dir"], [""], "s3://b/incoming/"):
        op = AscendCaptionOperator(task_id="c", meta_path="s3://b/m.csv", model_dir="/m", allowed_roots=bad)
        with pytest.raises(AirflowFailException, match="allowed_roots"):
            op._script_args()


def test_leading_dashes_in_values_are_data_for_the_rank_parser():
    """A prompt, a meta path or an output that starts with '-' reaches the rank's argparse as a value."""
    from captioning_core.cli import build_parser

    op = _rendered(question="--output=s3://evil/x.csv", bs=2)
    op.meta_path = "-p.csv"
    args = build_parser("qwen2vl").parse_args(op._script_args())
    assert args.question == "--output=s3://evil/x.csv" and args.output == "s3://b/-p/out.csv"
    assert args.meta_path == "-p.csv" and args.pretrained_model_name_or_path == "/models/q"
    assert args.bs == 2 and args.skip_if_existing


def test_rank_environment_is_an_allow_list():
    from operators.msrun_hook import rank_environment

    worker = {"PATH": "/usr/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_ALL": "C", "PYTHONPATH": "/p",
              "LD_LIBRARY_PATH": "/l", "ASCEND_HOME_PATH": "/a", "HCCL_IF_IP": "10.0.0.1", "MS_ALLOC_CONF": "x",
              "CAPTION_LOG_LEVEL": "DEBUG", "AIRFLOW_CTX_TRY_NUMBER": "2",
              "AIRFLOW__CORE__FERNET_KEY": "fernet", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://u:p@h/db",
              "AIRFLOW_CONN_CURATION_DB": "postgresql://u:p@h/db", "AWS_SECRET_ACCESS_KEY": "worker-own",
              "PGPASSWORD": "pw", "SOME_TOKEN": "t", "CAPTION_FAULTS": "sigkill@0:1"}
    env = rank_environment(worker, {"AWS_SECRET_ACCESS_KEY": "from-conn", "CAPTION_X": "1"})
    assert env == {"PATH": "/usr/bin", "HOME": "/h", "LANG": "C.UTF-8", "LC_ALL": "C", "PYTHONPATH": "/p",
                   "LD_LIBRARY_PATH": "/l", "ASCEND_HOME_PATH": "/a", "HCCL_IF_IP": "10.0.0.1",
                   "MS_ALLOC_CONF": "x", "CAPTION_LOG_LEVEL": "DEBUG", "AIRFLOW_CTX_TRY_NUMBER": "2",
                   "AWS_SECRET_ACCESS_KEY": "from-conn", "CAPTION_X": "1"}
    assert rank_environment(worker, {}, allow_fault_injection=True)["CAPTION_FAULTS"] == "sigkill@0:1"


def test_operator_env_refuses_airflow_settings_and_unrequested_faults():
    from airflow.sdk.exceptions import AirflowFailException

    for env in ({"AIRFLOW__CORE__FERNET_KEY": "x"}, {"CAPTION_FAULTS": "sigkill@0:1"}):
        op = AscendCaptionOperator(task_id="c", meta_path="s3://b/m.csv", model_dir="/m", env=env,
                                   aws_conn_id=None)
        with pytest.raises(AirflowFailException, match="env may not set"):
            op._rank_env(None)
    op = AscendCaptionOperator(task_id="c", meta_path="s3://b/m.csv", model_dir="/m", aws_conn_id=None,
                               env={"CAPTION_FAULTS": "slow@0:1"}, allow_fault_injection=True)
    assert op._rank_env(None)["CAPTION_FAULTS"] == "slow@0:1"


def test_pickled_weights_need_an_explicit_option(tmp_path):
    from captioning_core.models.base import ModelDirError, check_model_dir

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelDirError, match="only pickled \\*.bin weights, which can execute code"):
        check_model_dir(str(tmp_path), allow_pickle=False)
    check_model_dir(str(tmp_path), allow_pickle=True)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    check_model_dir(str(tmp_path), allow_pickle=False)


def test_models_never_trust_remote_code_and_load_safetensors_only_by_default():
    import re as _re

    from testkit.airflow_env import REPO

    for name in ("qwen2_vl.py", "pllava.py"):
        source = (REPO / "captioning_core" / "models" / name).read_text()
        calls = _re.findall(r"\.from_pretrained\(([^)]*)\)", source)
        assert calls, name
        assert "trust_remote_code=True" not in source
    qwen = (REPO / "captioning_core" / "models" / "qwen2_vl.py").read_text()
    assert "use_safetensors=not pickled_weights_allowed()" in qwen


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


def _serialized_caption_task(**kwargs):
    """The caption task as the dag processor stores it and the API server reads it back."""
    import datetime

    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    with DAG("d", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        if "expand" in kwargs:
            AscendCaptionOperator.partial(task_id="caption", model_dir="/m").expand_kwargs(kwargs["expand"])
        else:
            AscendCaptionOperator(task_id="caption", model_dir="/m", **kwargs)
    return DagSerialization.from_dict(DagSerialization.to_dict(dag)).get_task("caption")


def test_gallery_scope_binds_outputs_to_the_serialized_task_or_the_configuration():
    import caption_gallery_scope as scope

    params = {"bucket": "b", "out": "s3://b/x/captions.csv", "n": 3}
    assert scope.template_prefix("s3://{{ params.bucket }}/t/{{ run_id }}/c.csv", params) == "s3://b/t/"
    assert scope.template_prefix("{{params.out}}", params) == "s3://b/x/captions.csv"
    assert scope.template_prefix("s3://{{ params.n }}/", params) == "s3://"  # only strings are substituted
    assert scope.template_prefix("s3://{{ params.bucket | lower }}/", params) == "s3://"  # filters are not run
    assert scope.template_prefix("s3://b/{% if 1 %}a{% endif %}", params) == "s3://b/"

    def derived(**kwargs) -> tuple[str, ...]:
        return scope.derived_prefixes(scope.task_fields(_serialized_caption_task(**kwargs)), params)

    assert derived(meta_path="s3://b/p/meta.csv", output_uri="s3://{{ params.bucket }}/t/{{ ds }}.csv") == (
        "s3://b/t/",)
    assert derived(meta_path="s3://b/p/{{ ds }}/meta.csv") == ("s3://b/p/",)  # the default output: beside it
    assert derived(meta_path="s3://b/p/meta.csv", output_uri="{{ params.out }}") == ("s3://b/x/captions.csv",)
    assert derived(meta_path="{{ params.meta }}") == ()  # no bucket named: nothing binds
    assert derived(meta_path="s3://{{ ti.xcom_pull('up') }}/meta.csv") == ()
    assert derived(expand=[{"meta_path": "s3://b/p/meta.csv"}]) == ()  # map inputs could name any output

    configured = scope.configured_prefixes('{"v": ["s3://b/meta/", "s3://", "s3://b"], "w": []}')
    assert configured == {"v": ("s3://b/meta/",), "w": ()}  # a prefix must name a bucket
    assert scope.configured_prefixes("") == {} and scope.configured_prefixes("[1]") is None
    assert scope.within("s3://b/t/run/c.csv", ("s3://b/t/",)) and not scope.within("s3://b/u/c.csv", ("s3://b/t/",))
    for sneaky in ("s3://b/t/../a/c.csv", "s3://b/t/./c.csv", "s3://b/t//c.csv"):
        assert not scope.within(sneaky, ("s3://b/t/",)), sneaky


def test_extra_links_point_at_the_gallery_view_of_the_task_instance():
    from airflow.models.taskinstancekey import TaskInstanceKey

    from operators.ascend_caption import CaptionGalleryLink, CaptionOutputLink

    op = AscendCaptionOperator(task_id="caption", meta_path="s3://b/p/meta.csv", model_dir="/m",
                               aws_conn_id="caption_s3")
    ti = TaskInstanceKey("video_curation", "caption", "manual__2026-11-21T00:00:00+00:00", 1, 3)
    assert CaptionGalleryLink().get_link(op, ti_key=ti) == ""  # nothing before the task ran
    op.output_uri = "s3://b/p/meta_caption_qwen2vl.csv"
    prefix = "/caption-gallery/video_curation/manual__2026-11-21T00%3A00%3A00%2B00%3A00/caption/3/caption_s3/b/"
    assert CaptionGalleryLink().get_link(op, ti_key=ti).endswith(
        prefix + "p/meta_caption_qwen2vl.csv.gallery/index.html")
    assert CaptionOutputLink().get_link(op, ti_key=ti).endswith(prefix + "p/meta_caption_qwen2vl.csv")


def test_an_abbreviated_owned_option_fails_the_task():
    from airflow.sdk.exceptions import AirflowFailException

    # `--out=` came after the operator's own `--output=` and argparse expanded it: the rank wrote elsewhere
    with pytest.raises(AirflowFailException, match="invalid caption options .*'out'"):
        _rendered(out="s3://elsewhere/x.csv")._script_args()
