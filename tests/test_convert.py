"""Hugging Face import / export (`t5x_like.convert`) against transformers itself.

Random HF models from small configs (no hub) are saved with `save_pretrained` as
safetensors, then imported: logits equal HF's to 1e-4 in float32 with padding, and the
decoder-only ones decode (KV cache, ragged prompts) exactly HF's greedy `generate`.
Export -> `from_pretrained` gives HF's logits bit for bit; import -> export reproduces
every original tensor bit for bit under the same names. Sharded checkpoints (index)
import; streaming into an 8-device mesh gives the same values in the target shardings
while reading only slices; errors name the tensor or value. One end-to-end run: convert
a tiny HF Llama, then `python -m t5x_like.main --run_mode=infer` on it, then export back.

Skipped where torch / transformers are not installed (the `test` extra installs them).
"""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import PAD, TOL, cached_greedy, token_ids, torch, transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from partitioning import MeshConfig, Partitioner, make_mesh
from t5x_like import convert
from t5x_like.convert import __main__ as convert_cli
from t5x_like.convert import hf_io
from t5x_like.data import vocabularies

REPO = pathlib.Path(__file__).resolve().parent.parent

_T5 = {"vocab_size": 96, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4,
       "dropout_rate": 0.0, "pad_token_id": PAD, "eos_token_id": 1, "decoder_start_token_id": 0}
_LLAMA = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
          "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "bos_token_id": None,
          "eos_token_id": None, "pad_token_id": PAD}
_BERT = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 48, "max_position_embeddings": 40, "hidden_dropout_prob": 0.0,
         "attention_probs_dropout_prob": 0.0, "pad_token_id": PAD}


def _configs():
    t = transformers
    return {
        "t5_v1_1": (t.T5ForConditionalGeneration, t.T5Config(
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, **_T5)),
        "t5_v1_0": (t.T5ForConditionalGeneration, t.T5Config(feed_forward_proj="relu", **_T5)),
        "mt5_gated_silu": (t.MT5ForConditionalGeneration, t.MT5Config(  # mT5 class, UL2's MLP
            feed_forward_proj="gated-silu", tie_word_embeddings=False, **_T5)),
        "gpt2": (t.GPT2LMHeadModel, t.GPT2Config(
            vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=32,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
            eos_token_id=None, pad_token_id=PAD)),
        "llama": (t.LlamaForCausalLM, t.LlamaConfig(rope_theta=500.0, **_LLAMA)),
        "mistral": (t.MistralForCausalLM, t.MistralConfig(sliding_window=4, **_LLAMA)),
        "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config(tie_word_embeddings=True, **_LLAMA)),
        # 4 experts, top-2, every layer sparse; a window too (Mixtral's attention is Mistral's).
        "mixtral": (t.MixtralForCausalLM, t.MixtralConfig(
            num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
            router_aux_loss_coef=0.02, **_LLAMA)),
        "bert_mlm": (t.BertForMaskedLM, t.BertConfig(**_BERT)),
        "bert_cls": (t.BertForSequenceClassification, t.BertConfig(num_labels=3, **_BERT)),
    }


DECODER_ONLY = ("gpt2", "llama", "mistral", "qwen2", "mixtral")


def _randomize(hf, name: str) -> None:
    """Unit-scale weights, norms around 1, nonzero biases: every tensor moves the logits."""
    with torch.no_grad():
        for pname, p in hf.named_parameters():  # tied parameters are listed once
            if p.ndim == 1 and ("norm" in pname.lower() or "ln_" in pname):
                p.uniform_(0.5, 1.5) if pname.endswith("weight") else p.normal_(0.0, 0.1)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
            elif "embed" in pname or "wte" in pname or "wpe" in pname or "shared" in pname:
                p.normal_(0.0, 1.0)
            else:  # GPT-2's Conv1D is [in, out], torch Linear [out, in] (+ experts [E, ...])
                fan_in = p.shape[0] if name == "gpt2" else p.shape[-1]
                p.normal_(0.0, fan_in**-0.5)


def _hf_model(name: str, seed: int = 3):
    cls, config = _configs()[name]
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = cls(config).eval()
    if name in ("t5_v1_1", "mt5_gated_silu"):
        # Released v1.1 / mT5 checkpoints have their own lm_head; transformers >= 5 ties it
        # at construction: untie it (see tests/test_hf_parity.py).
        hf.lm_head = torch.nn.Linear(32, 96, bias=False)
    _randomize(hf, name)
    return hf


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (HF model, its save_pretrained safetensors directory)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in _configs():
        hf = _hf_model(name)
        hf.save_pretrained(root / name)
        out[name] = (hf, root / name)
    return out


@pytest.fixture(scope="module")
def imported(hf_dirs):
    """name -> (HFModel, params on one device)."""
    return {name: convert.load_hf(d) for name, (_, d) in hf_dirs.items()}


def _tokens(vocab: int, lengths, width: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(2, vocab, (len(lengths), width))
    valid = np.arange(width)[None] < np.asarray(lengths)[:, None]
    return np.where(valid, tokens, PAD).astype(np.int32), valid


def _hf_logits(hf, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(HF logits, mask of the positions compared) on each family's padded batch."""
    with torch.no_grad():
        if name.startswith(("t5", "mt5")):
            enc, valid = _tokens(96, [20, 13, 6], 20)
            dec, _ = _tokens(96, [12, 12, 12], 12, seed=1)
            dec[:, 0] = 0
            out = hf(input_ids=token_ids(enc), attention_mask=token_ids(valid),
                     decoder_input_ids=token_ids(dec)).logits.numpy()
            return out, np.ones(out.shape[:2], bool)
        if name in DECODER_ONLY:
            tokens, valid = _tokens(96, [20, 13, 6], 20)
            out = hf(input_ids=token_ids(tokens), attention_mask=token_ids(valid))
            return out.logits.numpy(), valid
        tokens, valid = _tokens(99, [24, 17, 9], 24)
        types = (np.arange(24)[None] >= np.array([[10], [6], [4]])).astype(np.int32)
        out = hf(input_ids=token_ids(tokens), attention_mask=token_ids(valid),
                 token_type_ids=token_ids(types)).logits.numpy()
        return out, (np.ones(out.shape[:2], bool) if out.ndim == 3 else np.ones(3, bool))


@nnx.jit
def _t5_forward(net, enc, dec):
    return net(enc, dec)


@nnx.jit
def _lm_forward(net, tokens, segment_ids):
    return net(tokens, segment_ids=segment_ids)


@nnx.jit
def _bert_forward(net, tokens, types):
    hidden = net.encode(tokens, token_type_ids=types)
    if net.config.num_classes:
        return net.classification_logits(hidden)
    return net.mlm_logits(hidden)


def _our_logits(net, name: str) -> np.ndarray:
    if name.startswith(("t5", "mt5")):
        enc, _ = _tokens(96, [20, 13, 6], 20)
        dec, _ = _tokens(96, [12, 12, 12], 12, seed=1)
        dec[:, 0] = 0
        return np.asarray(_t5_forward(net, jnp.asarray(enc), jnp.asarray(dec)))
    if name in DECODER_ONLY:
        tokens, valid = _tokens(96, [20, 13, 6], 20)
        return np.asarray(_lm_forward(net, jnp.asarray(tokens), jnp.asarray(valid, jnp.int32)))
    tokens, _ = _tokens(99, [24, 17, 9], 24)
    types = (np.arange(24)[None] >= np.array([[10], [6], [4]])).astype(np.int32)
    return np.asarray(_bert_forward(net, jnp.asarray(tokens), jnp.asarray(types)))


@pytest.mark.parametrize("name", list(_configs()))
def test_imported_logits_match_hugging_face(name, hf_dirs, imported):
    hf, _ = hf_dirs[name]
    model, params = imported[name]
    assert model.hf_class == type(hf).__name__
    want, valid = _hf_logits(hf, name)
    got = _our_logits(convert.network(model.config, params), name)
    assert got.shape == want.shape and got.dtype == np.float32
    # Padded positions are never read (HF's and our padded queries see different keys).
    np.testing.assert_allclose(got[valid], want[valid], rtol=TOL, atol=TOL)



@pytest.mark.parametrize("name", DECODER_ONLY)
def test_imported_cached_greedy_decoding_matches_generate(name, hf_dirs, imported):
    """One right-padded prefill rewound to each prompt's length, then one token per
    step, equals HF's greedy generate on the same prompts left-padded."""
    hf, _ = hf_dirs[name]
    model, params = imported[name]
    net = convert.network(model.config, params)
    lengths, new = np.array([7, 3, 5]), 10  # past the sliding windows (4, 6)
    right, _ = _tokens(96, lengths, 7, seed=2)
    left = np.full_like(right, PAD)
    for r, n in enumerate(lengths):
        left[r, 7 - n:] = right[r, :n]
    with torch.no_grad():
        out = hf.generate(input_ids=token_ids(left), attention_mask=token_ids(left != PAD),
                          do_sample=False, num_beams=1, max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=PAD, eos_token_id=None)
    want = out.numpy()[:, 7:]
    tokens, _ = cached_greedy(net, right, lengths, new)
    np.testing.assert_array_equal(tokens, want)
    assert len({tuple(row) for row in want}) == 3  # the rows differ


def _tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118  (a safe_open handle)
                out[key] = f.get_tensor(key)
    return out


@pytest.fixture(scope="module")
def exported(imported, tmp_path_factory):
    """name -> directory of our export of the imported model."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, (model, params) in imported.items():
        convert.save_hf(model.config, params, root / name, base_hf_config=model.hf_config)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", list(_configs()))
def test_round_trip_reproduces_every_tensor_bitwise(name, hf_dirs, exported):
    want, got = _tensors(hf_dirs[name][1]), _tensors(exported[name])
    assert sorted(got) == sorted(want)  # same names; tied copies left out alike
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("name", list(_configs()))
def test_export_reloads_in_hugging_face_with_the_same_logits(name, hf_dirs, exported):
    hf, _ = hf_dirs[name]
    reloaded = type(hf).from_pretrained(exported[name], attn_implementation="eager").eval()
    want, _ = _hf_logits(hf, name)
    got, _ = _hf_logits(reloaded, name)
    np.testing.assert_array_equal(got, want)


def test_sharded_index_import_and_export(hf_dirs, imported, tmp_path):
    hf, _ = hf_dirs["llama"]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / hf_io.INDEX_FILE).is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    _, params = convert.load_hf(tmp_path / "sharded")
    jax.tree.map(np.testing.assert_array_equal, params, imported["llama"][1])
    # Our export above a small max_shard_size: shards + index that HF reads.
    model, params = imported["llama"]
    files = convert.save_hf(model.config, params, tmp_path / "out", max_shard_size="16KB")
    assert len(files) > 2 and (tmp_path / "out" / hf_io.INDEX_FILE).is_file()
    index = json.loads((tmp_path / "out" / hf_io.INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(files)
    reloaded = type(hf).from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    np.testing.assert_array_equal(_hf_logits(reloaded, "llama")[0], _hf_logits(hf, "llama")[0])


def test_streaming_into_an_8_device_mesh_reads_only_slices(hf_dirs, imported, monkeypatch):
    """fsdp=2 x model=4: every parameter lands in its target sharding with the values of
    the one-device import, and a sharded parameter's devices each read only a slice."""
    partitioner = Partitioner(make_mesh(MeshConfig(data=1, fsdp=2, model=4)), "fsdp_tp")
    reads: dict[str, list[int]] = {}
    original = hf_io.HFCheckpoint.read

    def spy(self, name, index=None):
        out = original(self, name, index)
        reads.setdefault(name, []).append(out.size)
        return out

    monkeypatch.setattr(hf_io.HFCheckpoint, "read", spy)
    model, params = convert.load_hf(hf_dirs["llama"][1], partitioner=partitioner)
    target = convert.abstract_params(model.config, partitioner)
    jax.tree.map(lambda p, t: (p.shape, p.sharding) == (t.shape, t.sharding) or pytest.fail(
        f"{p.shape} {p.sharding} != {t.shape} {t.sharding}"), params, target)
    jax.tree.map(np.testing.assert_array_equal, params, imported["llama"][1])

    def blocks(x):
        return {tuple((i.start, i.stop) for i in s.index) for s in x.addressable_shards}

    # Each distinct block is read once, as a slice: 8 of lm_head [D, V] (fsdp x model),
    # 2 of the norm scale [D] and of the key kernel [D, K=2, H] (K does not divide
    # model=4, so 4 devices share each block).
    for name, param, count in (
            ("lm_head.weight", params["logits_dense"]["kernel"], 8),
            ("model.norm.weight", params["decoder_norm"]["scale"], 2),
            ("model.layers.0.self_attn.k_proj.weight",
             params["layers"][0]["self_attention"]["key"]["kernel"], 2)):
        assert len(blocks(param)) == count, name
        assert reads[name] == [param.size // count] * count, name


# --- errors -------------------------------------------------------------------------------


def _copy(src: pathlib.Path, dst: pathlib.Path, **config_changes) -> pathlib.Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unsupported_architectures_are_named(hf_dirs, tmp_path):
    llama = hf_dirs["llama"][1]
    with pytest.raises(convert.ConversionError, match="model_type 'falcon'"):
        convert.read_hf_config(_copy(llama, tmp_path / "a", model_type="falcon"))
    with pytest.raises(convert.ConversionError, match=r"architectures \['LlamaForTokenClass"):
        convert.read_hf_config(_copy(llama, tmp_path / "b",
                                     architectures=["LlamaForTokenClassification"]))
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(convert.ConversionError, match="rope_scaling type 'llama3'"):
        convert.read_hf_config(_copy(llama, tmp_path / "c", rope_parameters=rope))
    with pytest.raises(convert.ConversionError, match="attention_bias=True"):
        convert.read_hf_config(_copy(llama, tmp_path / "d", attention_bias=True))


def test_missing_tensor_and_shape_mismatch_are_named(hf_dirs, tmp_path):
    src = hf_dirs["llama"][1]
    broken = _copy(src, tmp_path / "missing")
    tensors = _tensors(broken)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(convert.ConversionError,
                       match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing.*"
                             r"layers/1/mlp/wi_1/kernel"):
        convert.load_hf(broken)
    wrong = _copy(src, tmp_path / "shape", intermediate_size=40)
    with pytest.raises(convert.ConversionError,
                       match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
                             r"\(48, 32\).*implies \(40, 32\)"):
        convert.load_hf(wrong)
    fewer = _copy(src, tmp_path / "layers", num_hidden_layers=1)
    with pytest.raises(convert.ConversionError, match=r"unexpected tensors \['model.layers.1"):
        convert.load_hf(fewer)


def test_pickle_only_directory_is_refused_unread(hf_dirs, tmp_path):
    d = tmp_path / "pickle"
    d.mkdir()
    shutil.copyfile(hf_dirs["gpt2"][1] / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(convert.ConversionError,
                       match=r"found \['pytorch_model\.bin'\]\): only safetensors are read"):
        convert.load_hf(d)


def test_tied_tensor_that_differs_is_refused(hf_dirs, tmp_path):
    d = _copy(hf_dirs["qwen2"][1], tmp_path / "tied")  # tie_word_embeddings=True
    tensors = _tensors(d)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(convert.ConversionError,
                       match=r"'lm_head\.weight' must equal 'model\.embed_tokens\.weight'"):
        convert.load_hf(d)


# --- vocabulary and the CLI ---------------------------------------------------------------


def test_tokenizer_json_vocabulary(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "</s>", "<unk>", "to", "be", "or", "not"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    vocab = vocabularies.hf_vocabulary(str(tmp_path))
    assert isinstance(vocab, vocabularies.HfTokenizerVocabulary)
    assert (vocab.vocab_size, vocab.eos_id) == (7, 1)
    assert list(vocab.encode("to be or not to be")) == [3, 4, 5, 6, 3, 4]
    assert vocab.decode([3, 4, 1, 5]) == "to be"  # through EOS, special tokens dropped
    import tensorflow as tf

    ids = vocab.encode_tf(tf.constant("not to be"))
    assert ids.numpy().tolist() == [6, 3, 4]
    assert vocab.decode_tf(tf.constant([[3, 4, 0], [5, 6, 1]])).numpy().tolist() == [
        b"to be", b"or not"]


@pytest.mark.usefixtures("clean_gin")
def test_cli_convert_then_infer_then_export(tmp_path):
    """A tiny HF Llama over the shipped SentencePiece model -> MODEL_DIR -> the normal
    CLI's infer run (subprocess) -> --to_hf -> transformers gives the same logits."""
    config = transformers.LlamaConfig(**dict(_LLAMA, vocab_size=8192, hidden_size=16,
                                             num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=64))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    shutil.copyfile(vocabularies.SHAKESPEARE_SPM_PATH, tmp_path / "hf" / "tokenizer.model")
    model_dir = tmp_path / "model"
    assert convert_cli.main(["--from_hf", str(tmp_path / "hf"), "--to", str(model_dir)]) == 0
    assert (model_dir / "checkpoints" / "0" / "state").is_dir()
    assert "vocabularies.hf_vocabulary" in (model_dir / "model.gin").read_text()

    subprocess.run(
        [sys.executable, "-m", "t5x_like.main", "--run_mode=infer",
         f"--gin_file={model_dir / 'model.gin'}", "--gin_file=gin/runs/infer.gin",
         "--gin.MIXTURE_OR_TASK_NAME=shakespeare_lm",
         "--gin.TASK_FEATURE_LENGTHS={'targets': 16}", "--gin.PROMPT_LENGTH=4",
         f"--gin.CHECKPOINT_PATH={model_dir / 'checkpoints'}",
         f"--gin.INFER_OUTPUT_DIR={tmp_path / 'infer'}", "--gin.MAX_BATCHES=1",
         "--gin.BATCH_SIZE=8", "--log_level=WARNING"],
        cwd=REPO, check=True, timeout=300)
    lines = (tmp_path / "infer" / "shakespeare_lm-validation.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    # Text through the converted model's own tokenizer (here the shipped SentencePiece
    # model); a random model may emit EOS at once, so not every prediction has text.
    assert len(records) == 8 and any(r["input"] and r["prediction"] for r in records)

    out = tmp_path / "hf_out"
    assert convert_cli.main(["--model_dir", str(model_dir), "--to_hf", str(out)]) == 0
    assert (out / "tokenizer.model").is_file()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(
        out, attn_implementation="eager").eval()
    tokens = token_ids(np.random.RandomState(0).randint(1, 8192, (2, 12)))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(input_ids=tokens).logits.numpy(),
                                      hf(input_ids=tokens).logits.numpy())


def test_stacked_parts_stream_and_write_back(tmp_path):
    """A parameter stacked from several HF tensors (`Part.index`, as MoE experts are):
    each device's block comes from the right tensors, and writing gives them back."""
    from jax.sharding import NamedSharding, PartitionSpec

    from t5x_like.convert import registry

    rng = np.random.RandomState(0)
    hf = {f"experts.{e}.w1.weight": rng.randn(8, 4).astype(np.float32) for e in range(4)}
    (tmp_path / "config.json").write_text("{}")
    save_file(hf, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    layout = registry.Layout(tuple(
        registry.tensor(f"experts.{e}.w1.weight", registry.Part(("wi",), (e,)), transpose=True)
        for e in range(4)))
    want = np.stack([w.T for w in hf.values()])  # [E, D, F]
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, model=4))
    for spec in (PartitionSpec("data", None, "model"), PartitionSpec(None, "data", None)):
        target = {"wi": jax.ShapeDtypeStruct(want.shape, np.float32,
                                             sharding=NamedSharding(mesh, spec))}
        with hf_io.HFCheckpoint(tmp_path) as ckpt:
            params = hf_io.load_params(ckpt, layout, target)
        assert params["wi"].sharding.spec == spec
        np.testing.assert_array_equal(np.asarray(params["wi"]), want)
    hf_io.write_params(layout, params, target, tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, _tensors(tmp_path / "out"), hf)


# --- Mixtral (sparse MoE) -----------------------------------------------------------------


def test_mixtral_config_is_dropless_renormalised_top_k(hf_dirs, imported, tmp_path):
    """HF's routing as our MoeConfig, and the test model really uses every expert."""
    from models.moe import MoeConfig

    model, _ = imported["mixtral"]
    # HF's router_aux_loss_coef scales one loss pooled over the layers that is k at
    # uniform routing; ours is 1 per layer, summed: weight = coef * k / layers.
    assert model.config.moe == MoeConfig(
        num_experts=4, num_experts_per_token=2, routing="token_choice", renormalize=True,
        dispatch="dropless", load_balance_loss_weight=0.02 * 2 / 2, router_z_loss_weight=0.0)
    assert model.config.sliding_window == 6 and model.config.kv_heads == 2
    deeper = convert.read_hf_config(_copy(hf_dirs["mixtral"][1], tmp_path / "d",
                                          num_hidden_layers=8, num_experts_per_tok=3))
    assert deeper.config.moe.load_balance_loss_weight == pytest.approx(0.02 * 3 / 8)
    exported = convert.architectures.MIXTRAL.config_to_hf(deeper.config, "MixtralForCausalLM")
    assert exported["router_aux_loss_coef"] == pytest.approx(0.02)
    hf, _ = hf_dirs["mixtral"]
    tokens, _ = _tokens(96, [20, 13, 6], 20)
    with torch.no_grad():
        routers = hf(input_ids=token_ids(tokens), output_router_logits=True).router_logits
    for layer in routers:  # [B * T, E]: every expert is some token's top-2 choice
        assert set(layer.topk(2, dim=-1).indices.flatten().tolist()) == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def mixtral_fused(hf_dirs, tmp_path_factory):
    """The test Mixtral in transformers >= 5's in-memory (fused experts) tensor names."""
    from safetensors.torch import save_file as torch_save_file

    hf, src = hf_dirs["mixtral"]
    d = tmp_path_factory.mktemp("mixtral_fused")
    shutil.copyfile(src / "config.json", d / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 32)  # [E, 2F, D]
    torch_save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_mixtral_fused_expert_layout_imports_and_writes_the_same(
        hf_dirs, imported, mixtral_fused, tmp_path):
    """Hub layout (per-expert w1/w2/w3, what save_pretrained writes) and the fused one
    (gate_up_proj [E, 2F, D], down_proj [E, D, F]) give the same parameters; writing the
    fused table reproduces transformers' own fused tensors bit for bit."""
    hub = _tensors(hf_dirs["mixtral"][1])
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in hub
    model, params = imported["mixtral"]
    _, fused_params = convert.load_hf(mixtral_fused)
    jax.tree.map(np.testing.assert_array_equal, fused_params, params)
    fused_layout = convert.architectures.MIXTRAL.layout(model.config).alternatives[0]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    hf_io.write_params(fused_layout, params, abstract, tmp_path)
    want = _tensors(mixtral_fused)
    got = _tensors(tmp_path)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_mixtral_streams_into_an_expert_sharded_mesh(layout, hf_dirs, imported, mixtral_fused):
    """expert=2 x fsdp=2 x model=2: expert kernels [E, D, F] split on all three axes land
    in their target shardings with the one-device values, from either layout."""
    partitioner = Partitioner(make_mesh(MeshConfig(data=1, fsdp=2, expert=2, model=2)),
                              "fsdp_tp")
    src = hf_dirs["mixtral"][1] if layout == "hub" else mixtral_fused
    model, params = convert.load_hf(src, partitioner=partitioner)
    target = convert.abstract_params(model.config, partitioner)
    jax.tree.map(lambda p, t: (p.shape, p.sharding) == (t.shape, t.sharding) or pytest.fail(
        f"{p.shape} {p.sharding} != {t.shape} {t.sharding}"), params, target)
    wi_0 = params["layers"][1]["mlp"]["experts"]["wi_0"]["kernel"]
    assert len({tuple((i.start, i.stop) for i in s.index)
                for s in wi_0.addressable_shards}) == 8  # 8 distinct blocks
    jax.tree.map(np.testing.assert_array_equal, params, imported["mixtral"][1])


def test_mixtral_model_gin_rebuilds_the_config(hf_dirs, imported, tmp_path):
    """--from_hf writes `moe = @moe.MoeConfig()` and its bindings; gin gives back the
    imported config, and the MoE config picks the Mixtral entry (never Llama) on export."""
    model, _ = imported["mixtral"]
    gin_path = convert.convert_hf_to_model_dir(hf_dirs["mixtral"][1], tmp_path / "model")
    assert "moe = @moe.MoeConfig()" in gin_path.read_text()
    assert convert_cli._network_config([str(gin_path)], []) == model.config
    assert convert.registry.for_config(model.config).name == "mixtral"
    with pytest.raises(convert.ConversionError, match="architecture 'llama' cannot represent"):
        convert.save_hf(model.config, imported["mixtral"][1], tmp_path / "x",
                        architecture="llama")


def test_mixtral_unrepresentable_values_are_named(hf_dirs, imported, tmp_path):
    import dataclasses

    src = hf_dirs["mixtral"][1]
    with pytest.raises(convert.ConversionError, match="num_experts_per_tok=1 is not supported"):
        convert.read_hf_config(_copy(src, tmp_path / "a", num_experts_per_tok=1))
    with pytest.raises(convert.ConversionError, match=r"router_jitter_noise=0\.1 is not supported"):
        convert.read_hf_config(_copy(src, tmp_path / "b", router_jitter_noise=0.1))
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(convert.ConversionError, match="rope_scaling type 'yarn'"):
        convert.read_hf_config(_copy(src, tmp_path / "c", rope_parameters=rope))
    model, params = imported["mixtral"]
    capacity = dataclasses.replace(model.config, moe=dataclasses.replace(
        model.config.moe, dispatch="capacity"))
    with pytest.raises(convert.ConversionError,
                       match=r"MoeConfig.dispatch='capacity' has no Hugging Face Mixtral.*"
                             r"set dispatch='dropless'"):
        convert.save_hf(capacity, params, tmp_path / "out")
