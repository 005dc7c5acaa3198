"""The embedded model: deterministic facts, well-formed lm-eval tasks, a tokenizer that round-trips."""

from __future__ import annotations

import json

import yaml

from quantbench.embedded import tiny


def test_world_is_deterministic_from_the_seed():
    a, b = tiny.World.generate(tiny.TinyRecipe()), tiny.World.generate(tiny.TinyRecipe())
    assert a.city == b.city and a.job == b.job
    assert tiny.World.generate(tiny.TinyRecipe(seed=1)).city != a.city


def test_recipe_key_changes_with_the_recipe():
    assert tiny.TinyRecipe().key() != tiny.TinyRecipe(train_steps=1).key()


def test_layer_sizes_suit_group_size_128_and_vllm_cpu_kernels():
    r = tiny.TinyRecipe()
    for size in (r.hidden_size, r.intermediate_size):
        assert size % 128 == 0


def test_task_docs_have_one_right_answer_among_four():
    world = tiny.World.generate(tiny.TinyRecipe())
    for task, docs in world.task_docs(0).items():
        assert len(docs) >= 300
        for d in docs:
            assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
            assert 0 <= d["answer"] < 4
    facts = world.task_docs(0)["tiny_facts"]
    person = world.people[0]
    q = next(d for d in facts if d["question"] == f"Q: Where does {person} live? A:")
    assert q["choices"][q["answer"]] == world.city[person]


def test_built_fixture_has_a_model_a_tokenizer_and_lm_eval_tasks(tiny_root):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_root / "model")
    assert config.model_type == "llama"
    tok = AutoTokenizer.from_pretrained(tiny_root / "model")
    ids = tok("Q: Where does Ada Moss live? A: Paris.", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    for task in ("tiny_facts", "tiny_arith"):
        spec = yaml.safe_load((tiny_root / "tasks" / f"{task}.yaml").read_text())
        assert spec["task"] == task and spec["output_type"] == "multiple_choice"
        data = spec["dataset_kwargs"]["data_files"]["test"]
        assert json.loads(open(data).readline())["choices"]


def test_no_evaluated_question_or_person_appears_in_the_calibration_text():
    """Calibration must not tune the quantizer on the test: no evaluated question, with or without its answer, and
    no person the tasks ask about, occurs in any calibration text; the model learned everything calibration says."""
    from omegaconf import OmegaConf

    from quantbench import calibration

    world = tiny.World.generate(tiny.TinyRecipe())
    texts = calibration.texts(
        OmegaConf.create(dict(dataset="embedded:tiny", num_samples=64, seq_len=512, seed=0)), cache_dir="/nonexistent"
    )
    corpus = "\n".join(texts)
    for docs in world.task_docs(0).values():
        for d in docs:
            assert d["question"] not in corpus, d["question"]
            assert f"{d['question']} {d['choices'][d['answer']]}" not in corpus
    assert not [p for p in world.people if p in corpus]
    assert set(world.calibration_facts()) <= set(world.facts())  # what calibration says, the model was taught
    assert "Q: What is 20 plus 3? A: 23." in world.calibration_facts()
    assert world.unasked and not set(world.unasked) & set(world.people)


def test_the_random_shape_tokenizer_is_the_embedded_one_padded_to_the_shapes_vocabulary():
    world = tiny.World.generate(tiny.TinyRecipe())
    small, big = tiny.build_tokenizer(world), tiny.build_tokenizer(world, vocab_size=5000)
    assert len(big) == 5000
    text = "Q: What is 21 plus 19? A: 40."
    assert small(text)["input_ids"] == big(text)["input_ids"]
    assert small.unk_token_id not in small(text)["input_ids"]
