"""HF transformers interop (scripts/hf_convert.py, hf_tokenizer.py, hf_export.py, hf_import.py):
logits of exported models equal ours in fp32, conversions round-trip bit for bit, the CLIs carry a
trained run to HF and back, and the exported tokenizer gives zhchat's ids on every kind of text."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from zhchat.models import t5_layers  # noqa: E402
from zhchat.models.decoder import DecoderConfig  # noqa: E402
from zhchat.models.decoder_model import DecoderOnlyModel  # noqa: E402
from zhchat.models.encdec_model import EncoderDecoderModel  # noqa: E402
from zhchat.models.t5 import T5Config  # noqa: E402
from zhchat.scripts import hf_convert, hf_export, hf_import, hf_tokenizer, infer  # noqa: E402
from zhchat.tasks.vocabulary import Vocabulary  # noqa: E402

ATOL = 1e-4
VOCAB = 3200  # the 3000-piece session tokenizer + 100 sentinels, padded


def random_params(model, seed: int) -> dict:
    """Random fp32 params of a model wrapper's tree (no init compile): norms 1 +- 0.2,
    embeddings std 1, relative-position tables std 0.5, kernels std 0.15."""
    shapes = jax.eval_shape(lambda: nn.unbox(model.init_params(
        jax.random.key(0), {"decoder_input_tokens": (1, 8)})))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        x = rng.standard_normal(s.shape)
        if name.endswith("['scale']"):
            return (1.0 + 0.2 * x).astype(np.float32)
        std = (0.5 if "rel_embedding" in name else 1.0 if name.endswith("['embedding']")
               else 0.15)
        return (std * x).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def assert_trees_equal(a, b) -> None:
    flat_a, flat_b = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (a, b))
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]),
                                      err_msg=jax.tree_util.keystr(k))


def hf_logits(hf_model, **inputs) -> np.ndarray:
    with torch.no_grad():
        return hf_model(**{k: torch.from_numpy(np.asarray(v)).long() for k, v in inputs.items()}
                        ).logits.numpy()


# ---- checkpoints: logits parity and round trips -----------------------------------------------
DECODERS = {
    "gqa_untied": dict(num_kv_heads=2, tie_embeddings=False),
    "tied": dict(num_kv_heads=4, tie_embeddings=True),
    "scanned_gqa": dict(num_kv_heads=1, tie_embeddings=False, scan_layers=True),
}


@pytest.mark.parametrize("variant", sorted(DECODERS))
def test_decoder_logits_equal_hf_llama_and_round_trip(variant, tmp_path):
    cfg = DecoderConfig(vocab_size=300, emb_dim=64, num_layers=2, num_heads=4, head_dim=16,
                        mlp_dim=96, dtype="float32", max_len=64, norm_eps=1e-5, rope_theta=500.0,
                        **DECODERS[variant])
    model = DecoderOnlyModel(config=cfg)
    params = random_params(model, seed=1)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    ours = np.asarray(jax.jit(model.module.apply)({"params": params}, jnp.asarray(tokens)))

    state_dict = hf_convert.decoder_to_hf(params, cfg)
    assert ("lm_head.weight" in state_dict) == (not cfg.tie_embeddings)
    hf_export.save_hf(str(tmp_path), hf_convert.llama_config(cfg), state_dict)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert hf.config.num_key_value_heads == cfg.num_kv_heads
    theirs = hf_logits(hf, input_ids=tokens)
    assert ours.std() > 0.5  # real logits, not a degenerate model
    np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)

    # ours -> HF -> ours, bit for bit, in the same layout and config
    back, back_cfg = hf_convert.decoder_from_hf(hf.state_dict(), hf.config,
                                                scan_layers=cfg.scan_layers)
    assert back_cfg == cfg
    assert_trees_equal(back, params)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_t5_teacher_forced_logits_equal_hf_on_a_padded_batch_and_round_trip(scan, tmp_path):
    cfg = T5Config(vocab_size=300, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                   num_encoder_layers=2, num_decoder_layers=3, relpos_buckets=16,
                   relpos_max_distance=40, dtype="float32", scan_layers=scan)
    model = EncoderDecoderModel(config=cfg)
    params = random_params(model, seed=2)
    rng = np.random.default_rng(0)
    enc = rng.integers(3, cfg.vocab_size, (3, 50)).astype(np.int32)
    enc[1, 30:] = 0  # right padding, unpacked (no segment ids): positions past 40 use far buckets
    enc[2, 5:] = 0
    dec = rng.integers(3, cfg.vocab_size, (3, 45)).astype(np.int32)
    dec[:, 0] = 0  # BOS
    dec[1, 20:] = 0
    ours = np.asarray(jax.jit(model.module.apply)({"params": params}, jnp.asarray(enc),
                                                  jnp.asarray(dec)))

    hf_export.save_hf(str(tmp_path), hf_convert.t5_config(cfg), hf_convert.t5_to_hf(params, cfg))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()  # untied, as T5 v1.1
    theirs = hf_logits(hf, input_ids=enc, attention_mask=enc != 0, decoder_input_ids=dec)
    assert ours.std() > 0.5
    np.testing.assert_allclose(theirs, ours, atol=ATOL, rtol=0)
    # built in memory (transformers ties a config-built T5's head: hf_model unties it)
    in_memory = hf_convert.hf_model(hf_convert.t5_config(cfg), hf_convert.t5_to_hf(params, cfg))
    np.testing.assert_array_equal(hf_logits(in_memory, input_ids=enc, attention_mask=enc != 0,
                                            decoder_input_ids=dec), theirs)

    back, back_cfg = hf_convert.t5_from_hf(hf.state_dict(), hf.config, scan_layers=scan)
    assert back_cfg == cfg
    assert_trees_equal(back, params)


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (16, 40)])
def test_relative_position_buckets_equal_hf(buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention
    keys, queries = np.arange(-400, 401, dtype=np.int32), np.arange(0, 3, dtype=np.int32)
    relative = keys[None, :] - queries[:, None]
    for bidirectional in (True, False):
        ours = np.asarray(t5_layers.relative_position_bucket(
            jnp.asarray(relative), bidirectional=bidirectional, num_buckets=buckets,
            max_distance=max_distance))
        theirs = T5Attention._relative_position_bucket(
            torch.from_numpy(relative).long(), bidirectional=bidirectional, num_buckets=buckets,
            max_distance=max_distance).numpy()
        np.testing.assert_array_equal(ours, theirs)
        # every bucket is reached (bidirectional: bar "key after the query at distance 0")
        assert len(np.unique(ours)) == buckets - bidirectional


def test_hf_state_dicts_round_trip_bit_exact():
    """HF -> ours -> HF gives the very arrays, for a random GQA Llama and an untied T5 v1.1."""
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
        rms_norm_eps=1e-5))
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=1,
        num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    t5.lm_head.weight = torch.nn.Parameter(torch.randn(128, 16))  # untied, as T5 v1.1 checkpoints
    for hf, from_hf, to_hf in ((llama, hf_convert.decoder_from_hf, hf_convert.decoder_to_hf),
                               (t5, hf_convert.t5_from_hf, hf_convert.t5_to_hf)):
        original = {k: v.numpy() for k, v in hf.state_dict().items()}
        for scan in (False, True):
            params, cfg = from_hf(original, hf.config, scan_layers=scan)
            again = to_hf(params, cfg)
            # every HF parameter, except T5's tied copies of `shared.weight`
            assert set(original) - set(again) <= {"encoder.embed_tokens.weight",
                                                  "decoder.embed_tokens.weight"}
            for name, array in again.items():
                np.testing.assert_array_equal(array, original[name], err_msg=name)


def test_tied_original_t5_imports_with_its_output_scale(tmp_path):
    """An HF T5 that ties lm_head to the embedding scales the decoder output by d_model**-0.5;
    the import folds that into logits_dense, so the logits still match."""
    torch.manual_seed(1)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2,
        feed_forward_proj="gated-gelu")).eval()
    assert hf.config.scale_decoder_outputs
    params, cfg = hf_convert.t5_from_hf(hf.state_dict(), hf.config)
    enc = np.array([[5, 6, 7, 1, 0, 0]], np.int32)
    dec = np.array([[0, 9, 10, 11]], np.int32)
    ours = np.asarray(jax.jit(EncoderDecoderModel(config=cfg).module.apply)(
        {"params": params}, jnp.asarray(enc), jnp.asarray(dec)))
    np.testing.assert_allclose(hf_logits(hf, input_ids=enc, attention_mask=enc != 0,
                                         decoder_input_ids=dec), ours, atol=ATOL, rtol=0)


def test_unconvertible_hf_models_are_refused_with_the_reason():
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                 num_attention_heads=2)
    biased = transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_bias=True, **small))
    with pytest.raises(ValueError, match="attention_bias"):
        hf_convert.decoder_from_hf(biased.state_dict(), biased.config)
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    extra = {**plain.state_dict(), "model.layers.0.self_attn.q_proj.bias": torch.zeros(16)}
    with pytest.raises(ValueError, match="without a zhchat counterpart"):
        hf_convert.decoder_from_hf(extra, plain.config)
    relu = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                                 num_heads=2, feed_forward_proj="relu")
    with pytest.raises(ValueError, match="gated-gelu"):
        hf_convert.t5_from_hf({}, relu)


# ---- the CLIs, end to end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    """A tiny decoder trained 2 steps on synthetic data: run dir with config.gin + checkpoint."""
    from zhchat.gin_configs import cli as gin_cli
    from zhchat.trainer import train
    run_dir = str(tmp_path_factory.mktemp("hf_run") / "run")
    gin.clear_config()
    gin_cli.parse_gin(["models/decoder_tiny.gin", "runs/pretrain.gin", "runs/synthetic_data.gin"],
                      [f"VOCAB_SIZE = {VOCAB}", f"RUN_DIR = '{run_dir}'", "BATCH_SIZE = 2",
                       "SEQ_LEN = 16", "NUM_STEPS = 2", "DecoderConfig.max_len = 64",
                       "Partitioner.num_devices = 1", "Partitioner.mesh_shape = (1, 1, 1)",
                       f"make_synthetic_iterator.vocab_size = {VOCAB}",
                       "train.progress_bar = False", "train.async_checkpointing = False"])
    try:
        train.train()
    finally:
        gin.clear_config()
    return run_dir


def _restore(run_dir):
    try:
        model, params, step = infer.load(run_dir, None, [], [], None)
    finally:
        gin.clear_config()
    return model, jax.device_get(params), step


def test_export_import_clis_carry_a_trained_run_to_hf_and_back(decoder_run, spm_models,
                                                               tmp_path, capsys, monkeypatch):
    spm = spm_models["bpe"]
    hf_dir, back_dir = str(tmp_path / "hf"), str(tmp_path / "back")
    assert hf_export.main([f"--run_dir={decoder_run}", f"--vocab={spm}", f"--out={hf_dir}"]) == 0
    assert "LlamaForCausalLM (step 2)" in capsys.readouterr().out
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(hf_dir))

    model, params, _ = _restore(decoder_run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf.generation_config.eos_token_id == [1, Vocabulary(spm).im_end_id]
    text = "子曰：学而时习之，不亦说乎？"
    ids = np.array([tok.encode(text)], np.int32)
    assert ids[0].tolist() == Vocabulary(spm).encode(text)
    ours = np.asarray(jax.jit(model.module.apply)({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(hf_logits(hf, input_ids=ids), ours, atol=ATOL, rtol=0)

    assert hf_import.main([f"--hf_dir={hf_dir}", f"--out_run_dir={back_dir}",
                           f"--vocab={spm}"]) == 0
    assert "wrote the decoder run" in capsys.readouterr().out
    imported, back_params, step = _restore(back_dir)
    assert step == 0 and imported.config == model.config
    assert_trees_equal(back_params, params)  # so its logits are ours exactly
    np.testing.assert_array_equal(np.asarray(jax.jit(imported.module.apply)(
        {"params": back_params}, jnp.asarray(ids))), ours)

    # the imported run serves infer like the original one (same greedy completions)
    outputs = []
    for run in (decoder_run, back_dir):
        monkeypatch.setattr(sys, "stdin", io.StringIO("子曰：\n"))
        assert infer.main([f"--run_dir={run}", f"--vocab={spm}", "--input=-",
                           "--max_decode_length=4"]) == 0
        gin.clear_config()
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("子曰：\t")


def test_t5_hf_folder_imports_and_exports_back_bit_exact(spm_models, tmp_path):
    """An HF-saved T5 v1.1 -> hf_import -> a zhchat run -> hf_export: the same weights."""
    torch.manual_seed(2)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2,
        num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        dropout_rate=0.0)).eval()
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16))
    src, run_dir, out = str(tmp_path / "src"), str(tmp_path / "run"), str(tmp_path / "out")
    hf.save_pretrained(src)
    assert hf_import.main([f"--hf_dir={src}", f"--out_run_dir={run_dir}"]) == 0
    assert "MODEL = @EncoderDecoderModel()" in open(os.path.join(run_dir, "config.gin")).read()
    model, params, _ = _restore(run_dir)  # the run as infer / chat load it
    enc, dec = np.array([[5, 6, 7, 1, 0]], np.int32), np.array([[0, 8, 9]], np.int32)
    logits = hf_logits(hf, input_ids=enc, attention_mask=enc != 0, decoder_input_ids=dec)
    np.testing.assert_allclose(np.asarray(jax.jit(model.module.apply)(
        {"params": params}, jnp.asarray(enc), jnp.asarray(dec))), logits, atol=ATOL, rtol=0)

    assert hf_export.main([f"--run_dir={run_dir}", f"--vocab={spm_models['unigram']}",
                           f"--out={out}"]) == 0
    again, original = hf_import.load_state_dict(out), hf.state_dict()
    assert set(original) - set(again) == {"encoder.embed_tokens.weight",
                                          "decoder.embed_tokens.weight"}  # tied copies
    for name, array in again.items():
        np.testing.assert_array_equal(array, original[name].numpy(), err_msg=name)
    exported = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(
        hf_logits(exported, input_ids=enc, attention_mask=enc != 0, decoder_input_ids=dec), logits)


def test_clis_validate_paths_architecture_and_vocab_size_first(decoder_run, spm_models,
                                                               other_spm_models, tmp_path, capsys):
    spm = spm_models["bpe"]
    assert hf_export.main([f"--run_dir={tmp_path / 'none'}", f"--vocab={spm}",
                           f"--out={tmp_path / 'o'}"]) == 2
    assert "run directory" in capsys.readouterr().err
    assert hf_export.main([f"--run_dir={decoder_run}", f"--vocab={other_spm_models['unigram']}",
                           f"--out={tmp_path / 'o'}"]) == 2  # 4100 ids for a 3200-row embedding
    assert "vocab size mismatch" in capsys.readouterr().err
    odd = tmp_path / "odd_run"
    (odd / "checkpoints").mkdir(parents=True)
    (odd / "config.gin").write_text("import zhchat.models.decoder_model\n"
                                    "MODEL = @DecoderConfig()\n")
    assert hf_export.main([f"--run_dir={odd}", f"--vocab={spm}", f"--out={tmp_path / 'o'}"]) == 2
    assert "unknown architecture DecoderConfig" in capsys.readouterr().err

    assert hf_import.main([f"--hf_dir={tmp_path / 'none'}", f"--out_run_dir={tmp_path / 'r'}"]) == 2
    assert "config.json" in capsys.readouterr().err
    fake = tmp_path / "fake_hf"  # weights that are never read: the checks come first
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"")
    (fake / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert hf_import.main([f"--hf_dir={fake}", f"--out_run_dir={tmp_path / 'r'}"]) == 2
    assert "unknown architecture: model_type 'gpt2'" in capsys.readouterr().err
    transformers.LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=24,
                             num_hidden_layers=1, num_attention_heads=2).save_pretrained(fake)
    assert hf_import.main([f"--hf_dir={fake}", f"--out_run_dir={tmp_path / 'r'}",
                           f"--vocab={spm}"]) == 2
    assert "vocab size mismatch" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ---- tokenizer -----------------------------------------------------------------------------
CHAT = ("<|im_start|>system\n你是一个乐于助人的助手。<|im_end|>\n<|im_start|>user\n长城有多长？"
        "<|im_end|>\n<|im_start|>assistant\n长城约两万一千公里。<|im_end|>\n")
TEXTS = [
    "中华人民共和国成立了。", "子曰：学而时习之，不亦说乎？", "全角\u3000空格与「引号」",
    "Hello, World! plain ASCII; (brackets) & symbols #1.", "mixed 中英 text 混排 with 数字 2024 年",
    "emoji 😀👍🏽👨\u200d👩\u200d👧 ok", "line one\nline two\n\n\nline five", "crlf\r\nline\r\n",
    "tab\tseparated\tcells", " leading space", "  two leading", "trailing  ", "a   b    c",
    "     ", " ", "", "\n", CHAT, "<|im_start|>user\n你好<|im_end|>", "<|im_end|>",
    "填空：<extra_id_0>，然后 <extra_id_1> 再<extra_id_99>结束", "<extra_id_5>", " <extra_id_5>",
    "a<extra_id_0>b",
]


def _corpus_lines(demo_data_dir, n: int) -> list[str]:
    lines = []
    for name in ("niutrans_modern_sample.jsonl.gz", "shu_books_sample.jsonl.gz"):
        with gzip.open(demo_data_dir / name, "rt", encoding="utf-8") as f:
            for row in f:
                lines += [s for s in json.loads(row)["text"].splitlines() if s.strip()]
    return lines[:n]


def _assert_same_ids(spm: str, hf_dir: str, texts: list[str]) -> list[str]:
    """Asserts HF ids == zhchat ids on `texts`, except exact Unigram score ties; returns those.

    SentencePiece's Unigram breaks a tie between the same pieces in another order (a run of six
    spaces: '▁▁▁▁▁' + '▁' or '▁' + '▁▁▁▁▁') by float32 rounding of its running path score, HF's
    (float64) keeps the earlier piece: same pieces, same score, same text, other order. The same
    holds for three line breaks ('\n\n' + '\n' vs '\n' + '\n\n')."""
    vocab = Vocabulary(spm)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert len(tok) == vocab.vocab_size
    from sentencepiece import sentencepiece_model_pb2 as pb
    unigram = hf_tokenizer.load_model_proto(spm).trainer_spec.model_type == pb.TrainerSpec.UNIGRAM
    ties = []
    for text in texts:
        ids, hf_ids = vocab.encode(text), tok.encode(text)
        if hf_ids != ids:
            assert unigram and sorted(hf_ids) == sorted(ids), (text, ids, hf_ids)
            ties.append(text)
        for row in (ids, hf_ids):
            assert tok.decode(row + [vocab.eos_id], skip_special_tokens=True) == vocab.decode(row)
    return ties


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_exported_tokenizer_gives_zhchat_ids(model_type, spm_models, demo_data_dir, tmp_path):
    spm = spm_models[model_type]
    paths = hf_convert.export_tokenizer(spm, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    vocab = Vocabulary(spm)
    texts = TEXTS + _corpus_lines(demo_data_dir, 300)
    ties = _assert_same_ids(spm, str(tmp_path), texts)
    # Unigram ties (see _assert_same_ids) occur only on runs of whitespace pieces: six '▁', or
    # '\n\n\n' = '\n\n' + '\n' or '\n' + '\n\n' (line breaks are user-defined pieces)
    assert ("     " in ties) if model_type == "unigram" else not ties
    assert all(re.search(r"(\s)\1\1", t) for t in ties), ties
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS + texts[-20:]:  # identity normalization: decoding gives the text back
        assert tok.decode(tok.encode(text)) == text == vocab.decode(vocab.encode(text))
    ids = tok.encode(CHAT)
    assert ids.count(vocab.im_start_id) == 3 and ids.count(vocab.im_end_id) == 3
    assert tok.convert_tokens_to_ids("▁<extra_id_0>") == vocab.sentinel_id(0) == len(tok) - 1
    assert tok.encode("<extra_id_7>") == [vocab.sentinel_id(7)]
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0 and tok.bos_token is None
    if model_type == "bpe":  # (Unigram: see hf_tokenizer's docstring on literal reserved pieces)
        assert tok.encode("</s>") == vocab.encode("</s>") != [1]  # text never becomes EOS


@pytest.fixture(scope="module")
def other_spm_models(tmp_path_factory, demo_data_dir):
    """SentencePiece models trained with settings zhchat's trainer does not use, to show the
    converter reads them from the proto: NFKC with whitespace removal and newline / space-run
    user-defined pieces (unigram), no dummy prefix and overlapping user-defined pieces (BPE)."""
    import sentencepiece as spm_lib
    out = tmp_path_factory.mktemp("other_spm")
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(_corpus_lines(demo_data_dir, 4000))
                      + "\nHello world, ASCII text: <tag> 1234.\n" * 50, encoding="utf-8")
    common = dict(input=str(corpus), vocab_size=4000, character_coverage=0.98,
                  byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
                  num_threads=2)
    spm_lib.SentencePieceTrainer.train(
        model_prefix=str(out / "unigram"), model_type="unigram", normalization_rule_name="nmt_nfkc",
        remove_extra_whitespaces=True, user_defined_symbols=["<|im_start|>", "<|im_end|>", "\n",
                                                             "▁▁"], **common)
    spm_lib.SentencePieceTrainer.train(
        model_prefix=str(out / "bpe"), model_type="bpe", normalization_rule_name="nfkc",
        add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>", "<|im", "\n\n", "\n"], **common)
    return {"unigram": str(out / "unigram.model"), "bpe": str(out / "bpe.model")}


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_tokenizer_settings_come_from_the_model_proto(model_type, other_spm_models,
                                                      demo_data_dir, tmp_path):
    spm = other_spm_models[model_type]
    hf_tokenizer.export_tokenizer(spm, str(tmp_path))
    texts = TEXTS + ["ＡＢＣ全角字母①", "多  个   空格\n\n段落\n", "a\n\n\nb", "<|im_end|>\n\n"]
    assert _assert_same_ids(spm, str(tmp_path), texts + _corpus_lines(demo_data_dir, 100)) == []
