"""The config tree: strict keys and types, overrides, and errors that name the key and the fix."""

from __future__ import annotations

import pytest
import yaml

from megatron_harpe.config import Config, ModelConfig, load_config, save_config
from megatron_harpe.position.config import PositionConfig

LLAMA2_7B = dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008, vocab_size=32000)


def config_tree(**sections) -> dict:
    tree = {
        "model": dict(LLAMA2_7B),
        "position": {"type": "harpe", "bases": [1e6 + 1e5 * h for h in range(32)]},
        "data": {"prefixes": ["corpus_text_document"], "seq_length": 131072},
        "train": {"train_tokens": 10**9, "global_batch_size": 32},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return tree


def load(tmp_path, tree, overrides=None) -> Config:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_config(path, overrides)


def test_valid_config_loads_and_round_trips(tmp_path):
    cfg = load(tmp_path, config_tree(), ["train.lr=1e-5", "parallel.tensor=8", "parallel.context=4"]).validate(
        world_size=64
    )
    assert cfg.train.lr == 1e-5 and cfg.parallel.tensor == 8 and cfg.parallel.context == 4
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml").validate(world_size=64)
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.num_attention_heads=30"], "model.num_attention_heads"),
        (["parallel.tensor=3"], "parallel.tensor=3 does not divide"),
        (["parallel.context=3"], "not divisible by 2 x parallel.context"),
        (["position.bases=[1.0e6, 2.0e6]"], "position.bases has 2 values"),
        (["position.bases=[-1.0, " + ", ".join(["1.0e6"] * 31) + "]"], "position.bases"),
        (["train.micro_batch_size=3"], "train.global_batch_size=32 is not a multiple"),
        (["train.lr_schedule=linear"], "train.lr_schedule"),
        (["position.type=rope"], "position.type='rope'"),
        (["train.recompute=partial"], "train.recompute='partial'"),
        (["train.recompute=full", "train.recompute_method=every"], "train.recompute_method='every'"),
        (["train.recompute=selective", "train.recompute_method=block"], "apply to train.recompute: full only"),
        (["train.recompute_num_layers=4"], "apply to train.recompute: full only"),
        (["train.recompute=full", "train.recompute_num_layers=5"], "does not divide model.num_layers=32"),
        (["train.recompute=full", "train.recompute_method=block", "train.recompute_num_layers=33"], "between 1 and"),
        (["train.recompute=selective", "train.recompute_modules=[layernorm]"], "train.recompute_modules"),
        (["train.recompute=full", "train.recompute_modules=[mlp]"], "selective only"),
        (
            ["eval.interval=100", "data.tokenizer=t.model", "eval.tasks=[passkey, needles]"],
            "eval.tasks: unknown task 'needles'",
        ),
        (
            ["eval.interval=100", "data.tokenizer=t.model", "eval.tasks=[ppl]"],
            "ppl need.* tools/evaluate.py --ppl-data",
        ),
        (["eval.interval=100", "data.tokenizer=t.model", "eval.tasks=[qa_1]"], "qa_1 need.*--qa-squad"),
        (["eval.interval=100"], "eval.interval needs a tokenizer"),
        (["eval.interval=100", "data.tokenizer=t.model", "eval.max_new_tokens=0"], "eval.max_new_tokens=0"),
        (["eval.interval=100", "data.tokenizer=t.model", "eval.lengths=[4096, 0]"], "eval.lengths"),
    ],
)
def test_impossible_configs_name_the_key(tmp_path, overrides, message):
    with pytest.raises(
        ValueError, match=message.replace("[", r"\[").replace("(", r"\(") if ".*" not in message else message
    ):
        load(tmp_path, config_tree(), overrides).validate(world_size=32)


def test_unknown_keys_and_wrong_types_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*leanring_rate.*valid keys"):
        load(tmp_path, config_tree(train={"leanring_rate": 1e-5}))
    with pytest.raises(ValueError, match="train.global_batch_size must be an integer"):
        load(tmp_path, config_tree(train={"global_batch_size": "many"}))
    with pytest.raises(ValueError, match="unknown config key.*optimiser"):
        load(tmp_path, {"optimiser": {}})


def test_gqa_takes_one_base_per_kv_group_and_rejects_per_query_head_lists():
    gqa = ModelConfig(num_layers=1, hidden_size=256, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=64)
    per_group = PositionConfig(type="harpe", bases=[1e4, 1e6]).resolve(gqa)
    assert per_group.query_head_bases(gqa) == [1e4] * 4 + [1e6] * 4
    assert per_group.key_head_bases(gqa) == [1e4, 1e6]
    eight = [1e4 * (h + 1) for h in range(8)]
    with pytest.raises(ValueError, match="one base per k/v group.*gqa_bases: per_query_head"):
        PositionConfig(type="harpe", bases=list(eight)).resolve(gqa)
    per_query = PositionConfig(type="harpe", bases=list(eight), gqa_bases="per_query_head").resolve(gqa)
    assert per_query.key_head_bases(gqa) == eight and per_query.expands_keys(gqa)


def test_strategy_is_resolved_once_into_explicit_bases(tmp_path):
    cfg = load(tmp_path, config_tree(position={"type": "harpe", "bases": None, "strategy": "paper"})).validate()
    assert len(cfg.position.bases) == 32 and cfg.position.bases[0] == 1.0e6
    save_config(cfg, tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert saved["position"]["bases"] == cfg.position.bases  # bases travel with the config
    edited = dict(saved, position=dict(saved["position"], strategy="uniform", base_min=1.0, base_max=2.0))
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    assert load_config(tmp_path / "edited.yaml").validate().position.bases == cfg.position.bases


def test_baselines_reject_per_head_bases():
    model = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=64)
    with pytest.raises(ValueError, match="position.bases/strategy are for type harpe"):
        PositionConfig(type="abf", bases=[1.0] * 4).resolve(model)
    yarn = PositionConfig(type="yarn", scaling_factor=8).resolve(model)
    assert yarn.original_max_position == model.max_position_embeddings
