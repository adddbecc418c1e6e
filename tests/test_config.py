"""Config loading: YAML + overrides, types, unknown keys, cross-field rules, error messages."""
from pathlib import Path

import pytest

from dlmjax.config import Config, ConfigError, load_config, replace

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_shipped_config_loads():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert paths, "configs/ has no YAML files"
    for path in paths:
        assert isinstance(load_config(path), Config)


def test_overrides_are_typed_and_applied():
    cfg = load_config(CONFIGS / "demo.yaml", ["train.steps=7", "optim.lr=3e-4", "model.tie_embeddings=true",
                                              "data.task=sudoku", "data.seq_len=40", "model.max_seq_len=40"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.tie_embeddings is True
    assert cfg.data.task == "sudoku" and cfg.data.seq_len == 40


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"train.steps=1.5 .*expected int"):
        load_config(None, ["train.steps=1.5"])


@pytest.mark.parametrize("override, pattern", [
    ("train.stepz=3", r"unknown key train.stepz; allowed keys in \[train\]: \[.*'steps'"),
    ("trian.steps=3", r"unknown section 'trian'"),
    ("train.steps=abc", r"train.steps='abc' has type str; expected int"),
    ("model.tie_embeddings=3", r"model.tie_embeddings=3 .*expected bool"),
    ("diffusion.objective=bogus", r"diffusion.objective='bogus' is not allowed; choose one of"),
    ("model.n_heads=3", r"model.d_model=\d+ must be divisible by model.n_heads=3"),
    ("model.n_kv_heads=3", r"model.n_kv_heads=3 must divide model.n_heads"),
    ("diffusion.mask_id=999", r"diffusion.mask_id=999 must be a token id in \[0, model.vocab_size=260\)"),
    ("data.seq_len=4096", r"data.seq_len=4096 exceeds model.max_seq_len"),
    ("data.task=sudoku", r"data.seq_len=16 is too short for data.task=sudoku: rows need at least 35"),
    ("optim.min_lr_ratio=2", r"optim.min_lr_ratio=2.0 must be in \[0, 1\]"),
    ("train.steps=0", r"train.steps=0 must be > 0"),
    ("trainsteps", r"must look like section.key=value"),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "demo.yaml", [override])


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="llada_sft needs prompts"):
        load_config(None, ["data.kind=text", "data.path=x.txt", "diffusion.objective=llada_sft"])
    with pytest.raises(ConfigError, match="data.path is empty"):
        load_config(None, ["data.kind=text", "diffusion.objective=llada"])
    with pytest.raises(ConfigError, match="objective=mdlm needs an alpha"):
        load_config(None, ["diffusion.objective=mdlm", "diffusion.schedule=llada"])
    with pytest.raises(ConfigError, match="at most one of data/fsdp/tensor may be -1"):
        load_config(None, ["mesh.data=-1", "mesh.fsdp=-1"])


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match="unknown key model.d_modle"):
        load_config(bad)
    bad.write_text("modle:\n  d_model: 64\n")
    with pytest.raises(ConfigError, match="unknown config section 'modle'"):
        load_config(bad)


def test_base_inheritance_merges_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  d_model: 64\n  n_layers: 2\ntrain:\n  steps: 10\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  n_layers: 3\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.steps) == (64, 3, 10)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")


def test_configs_are_frozen_and_round_trip():
    cfg = load_config(CONFIGS / "demo.yaml")
    with pytest.raises(Exception):
        cfg.train.steps = 3  # type: ignore[misc]
    from dlmjax.config import config_from_dict
    assert config_from_dict(cfg.to_dict()) == cfg
    assert replace(cfg, train={"steps": 3}).train.steps == 3


# ---- inputs that can't hurt a run ----------------------------------------------------------------------------

@pytest.mark.parametrize("override, field", [
    ("optim.lr=nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"), ("optim.lr=-1e-3", "optim.lr"),
    ("optim.b1=1.0", "optim.b1"), ("optim.b1=-0.1", "optim.b1"), ("optim.b2=1.5", "optim.b2"),
    ("optim.eps=0", "optim.eps"), ("optim.weight_decay=-0.01", "optim.weight_decay"),
    ("optim.grad_clip=inf", "optim.grad_clip"), ("optim.grad_clip=-1", "optim.grad_clip"),
    ("model.rope_theta=.nan", "model.rope_theta"), ("model.norm_eps=0", "model.norm_eps"),
    ("model.init_std=-0.02", "model.init_std"), ("diffusion.eps=nan", "diffusion.eps"),
    ("diffusion.clip_max=.inf", "diffusion.clip_max"), ("data.min_digits=4", "data.min_digits"),
    ("data.seq_len=0", "data.seq_len"), ("train.steps=0", "train.steps"), ("train.log_every=0", "train.log_every"),
])
def test_out_of_range_and_non_finite_values_are_refused(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "demo.yaml", [override])
    message = str(e.value)
    assert message.startswith(f"{field}=") and "\n" not in message, message


def test_non_finite_floats_are_refused_when_a_section_is_built_directly():
    from dlmjax.config import DiffusionConfig, ModelConfig, OptimConfig

    for build in (lambda: OptimConfig(lr=float("nan")), lambda: OptimConfig(b2=float("nan")),
                  lambda: ModelConfig(init_std=float("inf")), lambda: DiffusionConfig(clip_min=float("nan"))):
        with pytest.raises(ConfigError, match="finite|must be"):
            build()


def test_yaml_syntax_errors_name_the_file_and_the_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  d_model: 64\n  n_layers: [2\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    message = str(e.value)
    assert str(bad) in message and "line 4" in message and "\n" not in message, message
    (tmp_path / "child.yaml").write_text("base: broken.yaml\n")
    with pytest.raises(ConfigError, match="broken.yaml.*line 4"):
        load_config(tmp_path / "child.yaml")  # the file at fault is named, not the one that included it
    bad.write_bytes(b"model:\n  d_model: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
    bad.write_text("model: 64\n")
    with pytest.raises(ConfigError, match=r"section \[model\] must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"override 'train.steps=\[1': the value is not valid YAML"):
        load_config(None, ["train.steps=[1"])


def test_data_path_is_one_field_for_every_kind_and_the_old_name_still_reads():
    assert load_config(None, ["data.kind=text", "data.path=notes/", "diffusion.objective=mdlm",
                              "diffusion.schedule=linear"]).data.path == "notes/"
    from dlmjax.config import config_from_dict

    saved = load_config(None).to_dict()  # a checkpoint's config.json from before the rename
    saved["data"] = {**{k: v for k, v in saved["data"].items() if k != "path"}, "kind": "text", "text_path": "a.txt"}
    saved["diffusion"].update(objective="mdlm", schedule="linear")
    assert config_from_dict(saved).data.path == "a.txt"
    with pytest.raises(ConfigError, match="data.text_path is the old name of data.path"):
        config_from_dict({**saved, "data": {**saved["data"], "path": "b.txt"}})
