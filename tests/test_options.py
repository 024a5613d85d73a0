"""The option specs (options.py): every option declares its role once, the fingerprint puts a value where its
role says, and the one environment default reaches the command line but not the README."""

from __future__ import annotations

import dataclasses

import pytest

from captioning_core import arguments, fingerprint, options, options_doc
from captioning_core.config import RunConfig
from captioning_core.models import CAPTIONERS, captioner_class
from captioning_core.models.base import Captioner
from captioning_core.options import GENERATION, PROMPT, SAMPLING, option


@dataclasses.dataclass(frozen=True)
class ToyOptions:
    frames: int = option(4, help="frames per video", role=SAMPLING)
    top_p: float = option(1.0, help="nucleus sampling mass", role=GENERATION)
    template: str = option("plain", help="prompt template", role=PROMPT, choices=("plain", "chat"))


class ToyCaptioner(Captioner):
    """A captioner registered only by these tests, to add options the way a new model would."""

    name = "toy"
    options_cls = ToyOptions

    def prepare(self, local_path: str):
        return local_path

    def setup(self) -> None:
        pass

    def generate(self, batch):
        return [[] for _ in batch]

    def decode(self, token_ids) -> str:
        return ""


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(CAPTIONERS, "toy", f"{__name__}:ToyCaptioner")
    return "toy"


def test_every_option_of_every_captioner_declares_a_role():
    for spec in options.specs(RunConfig):
        assert spec.role in options.ROLES, spec.name
    for model in CAPTIONERS:
        specs = options.specs(captioner_class(model).options_cls)
        assert specs and all(s.role in options.ROLES for s in specs), model


def test_a_field_without_a_spec_is_refused():
    @dataclasses.dataclass
    class Undeclared:
        top_k: int = 50

    with pytest.raises(TypeError, match="Undeclared.top_k has no option spec"):
        options.specs(Undeclared)
    with pytest.raises(ValueError, match="role must be one of"):
        option(1, help="x", role="quality")


def test_a_new_model_option_lands_in_the_fingerprint_part_its_role_names(toy):
    argv = ["m.csv", "--pretrained_model_name_or_path", "/nowhere", "--dtype", "float32"]
    base = arguments.for_script_args(toy, argv)
    assert base["generation"] == {"max_new_tokens": 200, "top_p": 1}
    assert base["prompt"] == {"question": "Describe the video in details", "template": "plain"}
    assert base["sampling"] == {"frames": 4}
    changed = arguments.for_script_args(toy, [*argv, "--top_p", "0.9"])
    assert changed["generation"]["top_p"] == 0.9 and changed["sampling"] == base["sampling"]
    assert changed["id"] != base["id"]
    with pytest.raises(SystemExit):  # choices come from the spec too
        arguments.build_parser(toy).parse_args([*argv, "--template", "other"])


def test_pllava_options_keep_their_parts():
    argv = ["m.csv", "--pretrained_model_name_or_path", "/nowhere", "--dtype", "float32"]
    fp = arguments.for_script_args("pllava", argv)
    assert set(fp["generation"]) == {"max_new_tokens", "num_beams", "temperature", "seed"}
    assert set(fp["prompt"]) == {"question", "conv_mode"}
    assert set(fp["checkpoint"]["options"]) == {"use_lora", "weight_dir", "lora_alpha"}
    assert set(fp["sampling"]) == {"num_frames", "pooling_shape"}


def test_device_target_default_comes_from_the_environment_on_the_command_line_only(monkeypatch):
    monkeypatch.delenv("CAPTION_DEVICE_TARGET", raising=False)
    tables = options_doc.tables()
    monkeypatch.setenv("CAPTION_DEVICE_TARGET", "CPU")
    assert arguments.build_parser("qwen2vl").parse_args(["m.csv"]).device_target == "CPU"
    assert arguments.build_parser("qwen2vl", environ={}).parse_args(["m.csv"]).device_target == "Ascend"
    assert RunConfig(meta_path="m.csv", model="qwen2vl", pretrained_model_name_or_path="/m").device_target == "Ascend"
    assert options_doc.tables() == tables  # the README shows the declared default, whatever this shell has set
    assert "(default from $CAPTION_DEVICE_TARGET, else Ascend)" in tables["shared"]


def test_the_operator_owns_what_it_puts_on_the_argv():
    from operators.ascend_caption import OWNED_OPTIONS, AscendCaptionOperator

    op = AscendCaptionOperator(task_id="c", meta_path="s3://b/m.csv", model_dir="/m", output_uri="s3://b/o.csv",
                               caption_options={"bs": 2})
    flags = {a.split("=")[0].lstrip("-") for a in op._script_args()[:-2]} - {"bs"}
    assert flags == {"pretrained_model_name_or_path", "output", "skip_if_existing", "allowed_root"}
    assert flags | {"meta_path"} <= OWNED_OPTIONS
    # by field name and by flag: either spelling in caption_options would reach --allowed_root
    assert arguments.owned_options() == flags | {"meta_path", "allowed_roots"}


def test_the_operator_parses_once_and_fingerprints_as_the_ranks_do():
    from operators.ascend_caption import AscendCaptionOperator

    op = AscendCaptionOperator(task_id="c", meta_path="s3://b/m.csv", model_dir="/m", output_uri="s3://b/o.csv",
                               caption_options={"question": "What moves?", "fps": 2})
    first = op._caption_args()
    assert op._caption_args()[1] is first[1]  # the same parse, not a new one
    assert op._caption_config() is op._caption_config()
    assert fingerprint.compute(op._caption_config()) == arguments.for_script_args("qwen2vl", op._script_args())
    op.caption_options = {"question": "What else?"}  # other inputs: parsed again
    assert op._caption_config().question == "What else?"
