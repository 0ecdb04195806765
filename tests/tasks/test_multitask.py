"""Multitask prompt tasks: postprocessors map verbalizations back to labels (unknown text -> invalid),
accuracy / macro-F1 numbers, every dataset's templates over real records, the registered tasks and
the temperature-scaled mixtures (rates and the inspect CLI's realized proportions)."""

import io

import gin
import jax
import numpy as np
import pytest

from zhchat.tasks import eval_metrics, multitask_prompts
from zhchat.tasks.eval_metrics import INVALID, label_postprocessor


def ex(*choices):
    return {"choices": eval_metrics.CHOICE_SEP.join(choices).encode()}


@pytest.mark.parametrize("text,choices,label", [
    ("正面", ("正面", "负面"), "正面"),
    ("负面。<|im_end|>", ("正面", "负面"), "负面"),
    ("答案：蕴含", ("蕴含", "中立", "矛盾"), "蕴含"),
    ("这两句话的意思不同", ("相同", "不同"), "不同"),
    ("不是", ("是", "不是"), "不是"),
    (" 体育\n", tuple(multitask_prompts.TNEWS_LABELS.values()), "体育"),
    ("我不知道", ("正面", "负面"), INVALID),
    ("正面还是负面", ("正面", "负面"), INVALID),
    ("", ("是", "否"), INVALID),
])
def test_postprocessor_maps_text_to_labels(text, choices, label):
    assert label_postprocessor(text, example=ex(*choices)) == label
    assert label_postprocessor(text.encode(), example=ex(*choices)) == label


def test_every_verbalization_maps_back():
    for task, spec in multitask_prompts.PROMPTS.items():
        if spec.verbalizer:
            values = list(dict.fromkeys(spec.verbalizer.values()))
            for v in values:
                assert label_postprocessor(v, example=ex(*values)) == v, task
    assert label_postprocessor(b"\xe6\xad\xa3\xe9\x9d\xa2", example=ex("x"), is_target=True) == "正面"


def test_accuracy_and_macro_f1_numbers():
    targets = ["是", "是", "否", "否"]
    preds = ["是", INVALID, "否", "是"]
    assert eval_metrics.accuracy(targets, preds) == {"accuracy": 50.0}
    # F1(是) = 2*1/(2+1+1) = 0.5; F1(否) = 2*1/(2+0+1) = 2/3
    assert eval_metrics.macro_f1(targets, preds)["macro_f1"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)
    assert eval_metrics.invalid_rate(targets, preds) == {"invalid_rate": 25.0}
    with pytest.raises(ValueError, match="targets but"):
        eval_metrics.accuracy(["a"], [])


@pytest.fixture(scope="module")
def prompt_tasks(spm_models, shared_data_dir):
    import gin

    from zhchat.tasks import lm
    names = lm.parse_gin(["tasks/multitask.gin"], [f"VOCAB_PATH = '{spm_models['bpe']}'",
                                                   "PROMPT_INPUTS_LENGTH = 512"])
    gin.clear_config()
    return names


def test_registered_prompt_tasks_yield_verbalized_examples(prompt_tasks, spm_models):
    from zhchat.tasks import multitask, sft
    from zhchat.tasks.vocabulary import Vocabulary
    vocab = Vocabulary(spm_models["bpe"])
    assert prompt_tasks == [f"zh_prompt_{d}" for d in multitask.DATASETS] + ["zh_multitask"]
    for name in prompt_tasks[:-1]:
        examples = list(sft.iter_examples(name, "validation", log=False))
        assert len(examples) >= 120, name  # of 159-3671; long CSL abstracts may not fit
        templates = set()
        for e in examples[:60]:
            choices = eval_metrics.choices_of(e)
            assert e["targets_pretokenized"] in choices, name
            # generating exactly the target (with the chat end token) scores as the label
            assert label_postprocessor(vocab.decode(e["targets"]), example=e) == \
                e["targets_pretokenized"]
            assert vocab.decode(e["inputs"]) == e["inputs_pretokenized"]
            templates.add(e["inputs_pretokenized"].split("\n")[1][:4])
        assert len(templates) >= 2, (name, templates)  # several templates in use


def test_bad_prompt_records_are_counted():
    spec = multitask_prompts.PROMPTS
    with pytest.raises(ValueError, match="unknown label"):
        multitask_prompts.build_prompt("eprstmt", {"sentence": "好", "label": "Neutral"}, 0)
    with pytest.raises(KeyError):
        multitask_prompts.build_prompt("ocnli", {"sentence1": "a", "label": "neutral"}, 0)
    with pytest.raises(TypeError):
        spec["tnews"].fields({"sentence": 3, "label_desc": "news_car"})
    prompt, answer, choices = multitask_prompts.build_prompt(
        "c3", {"passage": "男：你好", "question": "谁在说话？", "choices": ["男", "女"],
               "answer": "男"}, 1)
    assert answer == "男" and choices == ["男", "女"] and "男，女" in prompt


def test_mixture_rates_are_temperature_scaled_and_inspect_shows_them(prompt_tasks):
    from zhchat.scripts import inspect
    from zhchat.tasks import mixtures
    rates = mixtures.mixture_rates("zh_multitask")
    assert sum(rates.values()) == pytest.approx(1.0)
    n = {t: mixtures.task_size(t, "train", "examples") for t in rates}
    assert n["zh_prompt_tnews"] > 1000 and n["zh_prompt_bustm"] < 200
    ratio = rates["zh_prompt_tnews"] / rates["zh_prompt_bustm"]
    assert ratio == pytest.approx((n["zh_prompt_tnews"] / n["zh_prompt_bustm"]) ** 0.5)
    out = io.StringIO()
    result = inspect.inspect_task("zh_multitask", split="validation", sequence_length=None,
                                  num_examples=1, stats_examples=300, seed=0, out=out)
    assert "realized task proportions" in out.getvalue()
    assert set(result["proportions"]) <= set(rates) and len(result["proportions"]) >= 5


class _Oracle:
    """A stand-in generator that answers each prompt with the task's target tokens: checks the
    evaluator's wiring (batching, decoding, postprocessing, metric_fns) end to end."""

    def __init__(self, answers):
        self.config = type("C", (), {"max_len": 1024})()
        self.answers = answers

    def predict_batch(self, params, batch, rng, *, max_decode_length):
        rows = [self.answers[tuple(int(t) for t in r if t)] for r in
                np.asarray(batch["decoder_input_tokens"])]
        out = np.zeros((len(rows), max_decode_length), np.int32)
        for i, r in enumerate(rows):
            out[i, :min(len(r), max_decode_length)] = r[:max_decode_length]
        return out


def test_seqio_eval_scores_generations_with_the_task_metrics(prompt_tasks, spm_models):
    from zhchat.models.decoder_model import DecoderOnlyModel
    from zhchat.tasks import seqio_eval, sft
    from zhchat.gin_configs import cli as gin_cli
    examples = list(sft.iter_examples("zh_prompt_eprstmt", "validation", log=False))[:24]
    oracle = _Oracle({tuple(e["inputs"]): e["targets"] for e in examples})
    perfect = seqio_eval.evaluate_task("zh_prompt_eprstmt", model=oracle, params=None,
                                       max_examples=24, batch_size=8)
    assert perfect == {"num_examples": 24.0, "accuracy": 100.0, "macro_f1": 100.0,
                       "invalid_rate": 0.0}
    gin.clear_config()
    gin_cli.parse_gin(["models/decoder_tiny.gin"], ["VOCAB_SIZE = 3200"])
    model = gin_cli.evaluate_macro("MODEL")
    gin.clear_config()
    assert isinstance(model, DecoderOnlyModel)
    params = nn_unbox(model.init_params(jax.random.key(0), {"decoder_input_tokens": (1, 8)}))
    hook = seqio_eval.make_eval_hook(tasks=["zh_prompt_eprstmt"], model=model, max_examples=8,
                                     batch_size=8, max_decode_length=4)
    random_model = hook(0, params)
    assert random_model["zh_prompt_eprstmt/num_examples"] == 8.0
    assert 0.0 <= random_model["zh_prompt_eprstmt/accuracy"] <= 100.0
    assert random_model["zh_prompt_eprstmt/invalid_rate"] > 50.0  # an untrained model names no label


def nn_unbox(tree):
    from flax import linen as nn
    return nn.unbox(tree)
