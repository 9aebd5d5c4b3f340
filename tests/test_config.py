"""Config schema, YAML loading, dotted overrides and the `dsoft config` command."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsoft_dist.cli import main
from dsoft_dist.config import config_from_dict, dump_config, load_config
from dsoft_dist.errors import USER_ERROR_EXIT, ConfigError
from dsoft_dist.registry import LOSSES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_round_trips(path):
    cfg = load_config(path)
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("data,pattern", [
    ({"head": {"scal": 32}}, r"unknown key 'head.scal'; did you mean 'head.scale'"),
    ({"heads": {}}, r"unknown key 'heads'"),
    ({"head": {"scale": -1.0}}, r"head.scale=-1.0 is invalid"),
    ({"head": {"sample_rate": 0}}, r"head.sample_rate=0.0 is invalid: must be in \(0, 1\]"),
    ({"head": {"sample_rate": 1.5}}, r"head.sample_rate=1.5 is invalid"),
    ({"head": {"scale": "big"}}, r"head.scale='big' is invalid: expected float"),
    ({"data": {"batch_size": 2.5}}, r"data.batch_size=2.5 is invalid: expected int"),
    ({"optimizer": {"nesterov": "yes"}}, r"optimizer.nesterov='yes' is invalid: expected true or false"),
    ({"head": {"negatives": "some"}}, r"head.negatives='some' is invalid: use one of all, batch, random, partial, nearest"),
    ({"eval": {"fars": [0.1, 2.0]}}, r"eval.fars=\[0.1, 2.0\] is invalid"),
    ({"data": {"num_classes": 1}, "parallel": {"nproc": 2}}, r"data.num_classes=1 is invalid"),
    ({"head": {"loss": "d_softmax", "m2": 0.5}}, r"head.m2=0.5 is invalid: head.loss=d_softmax takes no margin"),
    ({"head": {"loss": "arcface", "end_point": 1.0}},
     r"head.end_point=1.0 is invalid: head.loss=arcface has no intra and inter term; remove it \(--set "
     r"head.end_point=null\) or use loss=d_softmax"),
    ({"head": {"loss": "cosface", "inter_weight": 0.75}}, r"head.inter_weight=0.75 is invalid: head.loss=cosface has"),
    ({"data": {"source": "webdataset"}}, r"data.shards='' is invalid"),
    ({"data": {"synthetic_mode": "vectors"}, "model": {"name": "mlp", "in_features": 128},
      "eval": {"synthetic_identities": 10}}, r"eval.synthetic_identities=10 is invalid: the synthetic verification"),
])
def test_bad_values_name_the_key(tmp_path, data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(_write(tmp_path, data))


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["head.sample_rate=0.015625", "head.negatives=random", "eval.bins=[a.bin, b.bin]",
                             "optimizer.nesterov=true", "head.scale=32"])
    assert cfg.head.sample_rate == 0.015625 and cfg.head.negatives == "random"
    assert cfg.eval.bins == ["a.bin", "b.bin"] and cfg.optimizer.nesterov is True
    assert cfg.head.scale == 32.0 and isinstance(cfg.head.scale, float)
    with pytest.raises(ConfigError, match="override 'head.scale' is invalid"):
        load_config(None, ["head.scale"])


def test_a_float_in_exponent_form_is_a_float():
    """YAML 1.1 reads 1e-6 (no dot) as a string; a float key takes it as the number it is, and a word stays
    an error naming the key."""
    cfg = load_config(None, ["checkpoint.every_minutes=1e-6", "optimizer.lr=2e-3"])
    assert cfg.checkpoint.every_minutes == 1e-6 and cfg.optimizer.lr == 2e-3
    with pytest.raises(ConfigError, match="optimizer.lr='fast' is invalid: expected float"):
        load_config(None, ["optimizer.lr=fast"])


def test_d_softmax_presets_resolve_from_the_loss_table_and_a_given_value_replaces_them():
    """d_softmax: d = 1 with the inter weight 1 -> 0; d_softmax_paper: the paper's d = 0.9, constant; null
    inter_weight_end is the constant weight, not the preset; a margin loss holds neither key."""
    def head(*sets):
        h = load_config(None, list(sets)).head
        return h.end_point, h.inter_weight, h.inter_weight_end

    assert head() == (1.0, 1.0, 0.0)
    assert head("head.loss=d_softmax_paper") == (0.9, 1.0, None)
    assert head("head.inter_weight_end=null") == (1.0, 1.0, None)
    assert head("head.loss=d_softmax_paper", "head.end_point=0.95", "head.inter_weight_end=0.25") == (0.95, 1.0, 0.25)
    assert head("head.end_point=null") == (1.0, 1.0, 0.0)  # null end point: the preset, as a null margin is
    assert head("head.loss=arcface") == (None, 1.0, None)
    demo = ROOT / "configs" / "demo.yaml"  # its inter weight ends at 0.5: a margin loss on it drops that key
    with pytest.raises(ConfigError, match=r"inter_weight_end=0.5 is invalid: .* \(--set head.inter_weight_end=null\)"):
        load_config(demo, ["head.loss=arcface"])
    assert load_config(demo, ["head.loss=arcface", "head.inter_weight_end=null"]).head.margins() == (1.0, 0.5, 0.0)
    for name in ("d_softmax", "d_softmax_paper", "arcface"):  # the resolved values dump and load as themselves
        cfg = load_config(None, [f"head.loss={name}"])
        assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_a_saved_config_from_before_the_presets_loads_as_the_run_it_was():
    """Every config saved before the presets held d = 0.9, w = 1 (and, later, inter_weight_end null) whatever
    its loss; one without inter_weight_end trained the paper's constant weight."""
    from dsoft_dist.config.loader import saved_config_from_dict

    former = {"end_point": 0.9, "inter_weight": 1.0, "inter_weight_end": None}
    arc = saved_config_from_dict({"head": {"loss": "arcface", **former}}).head
    assert (arc.loss, arc.end_point, arc.inter_weight_end) == ("arcface", None, None)
    with pytest.raises(ConfigError, match="head.loss=arcface has no intra and inter term"):
        config_from_dict({"head": {"loss": "arcface", **former}})  # as a user's config it is refused
    old = saved_config_from_dict({"head": {"loss": "d_softmax", "end_point": 0.9, "inter_weight": 1.0}}).head
    assert (old.end_point, old.inter_weight_end) == (0.9, None)
    with pytest.raises(ConfigError, match="head.end_point=0.8 is invalid: head.loss=arcface"):
        saved_config_from_dict({"head": {"loss": "arcface", "end_point": 0.8}})  # not a former default


def test_margin_presets_resolve_from_the_loss_table():
    for name in LOSSES.names():
        margins = LOSSES.get(name).margins
        cfg = load_config(None, [f"head.loss={name}"])
        assert cfg.head.margins() == (margins["m1"], margins["m2"], margins["m3"])
    assert load_config(None, ["head.loss=arcface"]).head.margins() == (1.0, 0.5, 0.0)
    assert load_config(None, ["head.loss=margin"]).head.margins() == (1.0, 0.0, 0.0)
    assert load_config(None, ["head.loss=margin", "head.m3=0.2"]).head.margins() == (1.0, 0.0, 0.2)
    assert load_config(None, ["head.loss=arcface", "head.m2=0.4"]).head.margins() == (1.0, 0.4, 0.0)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("head: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_config_check_and_show(tmp_path, capsys):
    good = str(ROOT / "configs" / "demo.yaml")
    assert main(["config", "check", good]) == 0
    assert main(["config", "show", good, "--set", "head.scale=16"]) == 0
    assert "scale: 16.0" in capsys.readouterr().out
    for data, key in ([{"head": {"bogus": 1}}, "head.bogus"], [{"head": {"scale": -3}}, "head.scale"],
                      [{"head": {"sample_rate": 0}}, "head.sample_rate"],
                      [{"head": {"sample_rate": 2}}, "head.sample_rate"]):
        assert main(["config", "check", _write(tmp_path, data)]) == USER_ERROR_EXIT  # 2, as every user error
        assert key in capsys.readouterr().err


def test_sample_rate_takes_a_fraction_as_dsoft_plan_does(tmp_path):
    from dsoft_dist.plan.cli import sample_rates

    from_yaml = load_config(_write(tmp_path, {"head": {"sample_rate": "1/64"}}))
    from_set = load_config(ROOT / "configs" / "demo.yaml", ["head.sample_rate=1/64"])
    assert from_yaml.head.sample_rate == from_set.head.sample_rate == 0.015625
    assert load_config(overrides=["head.sample_rate=0.25"]).head.sample_rate == 0.25  # decimals still work
    assert sample_rates("1/64,0.25") == [0.015625, 0.25]  # dsoft plan --sample-rate: the same parser
    with pytest.raises(ConfigError, match=r"head.sample_rate='1/0' is invalid: give a number or a fraction a/b"):
        load_config(overrides=["head.sample_rate=1/0"])
    with pytest.raises(ConfigError, match=r"head.sample_rate=2.0 is invalid: must be in \(0, 1\]"):
        load_config(overrides=["head.sample_rate=4/2"])
    with pytest.raises(ConfigError, match="head.scale='1/2' is invalid: expected float"):  # only the rate takes a/b
        load_config(overrides=["head.scale=1/2"])


def test_warmup_longer_than_the_run_says_what_to_set():
    with pytest.raises(ConfigError, match=r"schedule.warmup_steps=20 is invalid: .* set it to at most 10, e.g. "
                                          r"--set schedule.warmup_steps=1 "):
        load_config(ROOT / "configs" / "demo.yaml", ["schedule.steps=10"])


def test_config_show_demo_prints_the_embedded_config_anywhere(tmp_path, monkeypatch, capsys):
    from dsoft_dist.config.demo import DEMO_CONFIG

    monkeypatch.chdir(tmp_path)  # outside the repository: no configs/ here
    assert main(["config", "show", "demo", "--set", "head.scale=16"]) == 0
    shown = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    assert shown == config_from_dict({**DEMO_CONFIG, "head": {**DEMO_CONFIG["head"], "scale": 16.0}})
    assert main(["config", "check", "demo"]) == 0 and capsys.readouterr().out == "demo: OK\n"


def test_console_script_help_lists_real_subcommands():
    out = subprocess.run([sys.executable, "-m", "dsoft_dist.cli", "--help"], capture_output=True, text=True, check=True)
    assert "config" in out.stdout and "demo" in out.stdout


def test_dsoft_bench_runs_the_head_benchmark(capsys):
    assert main(["bench", "head", "--classes", "300", "--dim", "16", "--batch", "8", "--sample-rates", "1", "0.5",
                 "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "random" in out


def test_dsoft_bench_runs_the_data_benchmark(capsys):
    assert main(["bench", "data", "--samples", "128", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "bare decode loop (pillow)" in out and "pipeline, 0 workers" in out
