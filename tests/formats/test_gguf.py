"""GGUF output (formats/gguf.py, run/gguf.py, runtime/gguf.py): files read back with the `gguf`
package's own reader and dequantizers, llama-quantize's per-tensor rules, and our loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from quantize_llm.core import ggml  # noqa: E402
from quantize_llm.core.spec import QuantSpec  # noqa: E402
from quantize_llm.errors import OutputError, SpecError  # noqa: E402
from quantize_llm.formats import gguf as gf  # noqa: E402

WIDE = dict(hidden_size=256, intermediate_size=512)      # rows that fill 256-weight blocks


def write(src, out, scheme="Q4_K_M", **kw):
    from quantize_llm.run.execute import quantize

    return quantize(str(src), out, QuantSpec(method="rtn", format=f"gguf:{scheme}"), **kw)


def test_format_names():
    assert gf.parse_format("gguf") == "Q4_K_M"
    assert gf.parse_format("gguf:q3_k_m") == "Q3_K_M"
    assert gf.parse_format("gptq") is None
    with pytest.raises(SpecError, match="IQ2_XS is not a GGUF type"):
        gf.parse_format("gguf:IQ2_XS")


def test_llama_quantize_rules_for_the_mixes():
    """llama-quant.cpp: use_more_bits layers, the output head, the fallbacks for short rows."""
    n = 32
    more = [i for i in range(n) if gf.use_more_bits(i, n)]
    assert more[:6] == [0, 1, 2, 3, 6, 9] and more[-4:] == [28, 29, 30, 31]
    t = gf.tensor_type
    assert t("Q4_K_M", "blk.0.attn_v.weight", (256, 512), n, False) == "Q6_K"
    assert t("Q4_K_M", "blk.4.attn_v.weight", (256, 512), n, False) == "Q4_K"
    assert t("Q4_K_M", "blk.6.ffn_down.weight", (512, 1024), n, False) == "Q6_K"
    assert t("Q4_K_M", "blk.5.ffn_down.weight", (512, 1024), n, False) == "Q4_K"
    assert t("Q4_K_M", "blk.5.attn_q.weight", (512, 512), n, False) == "Q4_K"
    assert t("Q4_K_M", "output.weight", (1000, 512), n, False) == "Q6_K"
    assert t("Q4_K_M", "output.weight", (1000, 576), n, False) == "Q8_0"       # 576 % 256 != 0
    assert t("Q4_K_M", "token_embd.weight", (1000, 512), n, True) == "Q6_K"    # tied: the head's rule
    assert t("Q4_K_M", "token_embd.weight", (1000, 512), n, False) == "Q4_K"
    assert t("Q4_K_M", "blk.5.attn_q.weight", (576, 576), n, False) == "Q5_0"  # Q4_K's fallback
    assert t("Q4_K_M", "blk.0.attn_v.weight", (192, 576), n, False) == "Q8_0"  # Q6_K's fallback
    assert t("Q3_K_M", "blk.1.attn_v.weight", (256, 512), n, False) == "Q5_K"
    assert t("Q3_K_M", "blk.2.attn_v.weight", (256, 512), n, False) == "Q4_K"
    assert t("Q3_K_M", "blk.1.ffn_down.weight", (512, 1024), n, False) == "Q5_K"   # 1 < 32/16
    assert t("Q3_K_M", "blk.2.ffn_down.weight", (512, 1024), n, False) == "Q4_K"
    assert t("Q3_K_M", "blk.2.attn_output.weight", (512, 512), n, False) == "Q4_K"
    assert t("Q3_K_M", "blk.2.ffn_up.weight", (1024, 512), n, False) == "Q3_K"
    assert t("Q3_K_M", "blk.2.ffn_up.weight", (1024, 576), n, False) == "Q4_0"    # Q3_K's fallback
    assert t("Q4_0", "blk.2.ffn_up.weight", (1024, 48), n, False) == "F16"       # not even 32-blocks
    assert t("Q4_0", "output.weight", (1000, 512), n, False) == "Q6_K"
    assert t("Q8_0", "output.weight", (1000, 512), n, False) == "Q8_0"
    assert t("Q4_K_M", "blk.0.attn_norm.weight", (512,), n, False) == "F32"
    assert t("Q4_K_M", "blk.0.attn_q.bias", (512,), n, False) == "F32"


def test_rope_permutation_interleaves_the_halves_of_each_head():
    w = np.arange(16, dtype=np.float32).reshape(8, 2)       # two heads of head_dim 4
    p = gf.permute_rows(w, 2)
    assert p[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]    # rows 0,2,1,3 of each head (x2 = column 0)
    np.testing.assert_array_equal(gf.unpermute_rows(p, 2), w)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_file_read_back_by_the_gguf_package(tiny_model, tmp_path, arch):
    src = tiny_model(arch, config=WIDE)
    summary = write(src, tmp_path / "model")            # .gguf appended
    out = tmp_path / "model.gguf"
    assert summary.output == str(out) and out.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    reader = gguf.GGUFReader(str(out))
    fields = {k: f for k, f in reader.fields.items()}
    arch_name = gf.FAMILIES[arch][0]
    assert bytes(fields["general.architecture"].parts[-1]).decode() == arch_name
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                "attention.layer_norm_rms_epsilon"):
        assert f"{arch_name}.{key}" in fields, key
    assert int(fields[f"{arch_name}.block_count"].parts[-1][0]) == 2
    assert int(fields["general.file_type"].parts[-1][0]) == 15
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == 256
    from safetensors.torch import load_file

    source = {k: v.float().numpy() for k, v in load_file(str(src / "model.safetensors")).items()}
    names = gf.name_map(arch_name, 2)
    by_name = {t.name: t for t in reader.tensors}
    assert len(by_name) == len([k for k in source if not (k == "lm_head.weight" and "tied" in arch)])
    heads, kv = 4, 2
    for hf, w in source.items():
        t = by_name[gf.gguf_name(names, hf)]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if arch_name == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            w = gf.permute_rows(w, heads if ".q_proj." in hf else kv)
        kind = t.tensor_type.name
        want = w if kind == "F32" else ggml.quantize_rtn(kind, w).dequantize()
        np.testing.assert_array_equal(got, want, err_msg=hf)


@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q3_K_M"])
def test_loader_holds_the_dequantized_blocks(tiny_model, tmp_path, scheme):
    """load_quantized (and eval) of a GGUF file: the source model with each weight replaced by
    what gguf's dequantizer reads from the blocks, exactly."""
    from transformers import AutoModelForCausalLM

    from quantize_llm import load_quantized

    src = tiny_model("llama", config=WIDE)
    out = write(src, tmp_path / f"m-{scheme}.gguf", scheme).output
    model = load_quantized(out)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    reader = gguf.GGUFReader(out)
    names = gf.name_map("llama", 2)
    state = ref.state_dict()
    for t in reader.tensors:
        hf = next(k for k in state if gf.gguf_name(names, k) == t.name)
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(state[hf].shape)
        if ".q_proj." in hf or ".k_proj." in hf:
            w = gf.unpermute_rows(w, 4 if ".q_proj." in hf else 2)
        state[hf] = torch.from_numpy(np.ascontiguousarray(w))
    ref.load_state_dict(state)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_tied_head_is_not_written_and_short_rows_fall_back(tiny_model, tmp_path):
    from quantize_llm.run.gguf import tensor_types

    src = tiny_model("llama-tied")                         # hidden 64: no 256-weight blocks
    types = tensor_types(write(src, tmp_path / "t.gguf").output)
    assert "output.weight" not in types
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.1.attn_v.weight"] == "Q8_0"


def test_refusals(tiny_model, tmp_path):
    src = tiny_model("llama", config=WIDE)
    write(src, tmp_path / "x.gguf", "Q4_0")
    with pytest.raises(OutputError, match="already exists"):
        write(src, tmp_path / "x.gguf", "Q4_0")
    write(src, tmp_path / "x.gguf", "Q8_0", overwrite=True)
    for arch in ("phi3", "opt"):
        with pytest.raises(SpecError, match="GGUF output is not supported for model_type"):
            write(tiny_model(arch), tmp_path / f"{arch}.gguf")
    from quantize_llm.run.execute import quantize

    with pytest.raises(SpecError, match="written by rtn, gptq and awq, not nf4"):
        quantize(str(src), tmp_path / "g.gguf", QuantSpec(method="nf4", format="gguf"))
    assert not (tmp_path / "phi3.gguf").exists()


def test_cli_inspect_and_eval(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from quantize_llm.cli import app

    src = tiny_model("qwen2", config=WIDE)
    runner = CliRunner()
    out = tmp_path / "q.gguf"
    res = runner.invoke(app, ["rtn", str(src), "-o", str(out), "--format", "gguf:Q4_K_M"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    assert "Q4_K b256" in res.output and "ggml blocks" in res.output
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    res = runner.invoke(app, ["eval", str(out), "--dataset", str(text), "--baseline", str(src), "--windows", "2",
                              "--seqlen", "128"])
    assert res.exit_code == 0, res.output
    assert "KL to baseline" in res.output


@pytest.mark.parametrize("scheme", ["Q4_K_M", "Q3_K_M", "Q4_0"])
def test_gptq_rounding_is_closer_to_the_float_model_than_llama_cpps(tiny_model, tmp_path, calib_file, scheme):
    """gptq --format gguf: the same tensor types as rtn's file, the tensors outside the blocks the
    same bytes, the blocks' Linears solved on the calibration text: the logits on that text are
    nearer the float model's than with llama.cpp's reference rounding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantize_llm import load_quantized
    from quantize_llm.calibration.data import CalibrationSpec
    from quantize_llm.run.execute import quantize
    from quantize_llm.run.gguf import tensor_types

    src = tiny_model("llama", config=WIDE)
    rtn = write(src, tmp_path / "rtn.gguf", scheme).output
    events: list = []
    g = quantize(str(src), tmp_path / "gptq.gguf", QuantSpec(method="gptq", format=f"gguf:{scheme}"),
                 calibration=CalibrationSpec(source=str(calib_file), nsamples=16, seqlen=64),
                 on_event=lambda kind, data: events.append((kind, data))).output
    assert tensor_types(g) == tensor_types(rtn)
    theirs = {t.name: t for t in gguf.GGUFReader(rtn).tensors}
    solved = 0
    for t in gguf.GGUFReader(g).tensors:
        same = np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data))
        inside = t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name
        assert same != inside, t.name                   # only the blocks' Linears differ
        solved += inside
    assert solved == 2 * 7
    blocks = [data for kind, data in events if kind == "block"]
    assert len(blocks) == 2 and all(layer["metrics"]["rel_error"] > 0 for b in blocks for layer in b["layers"])

    ids = AutoTokenizer.from_pretrained(src)(calib_file.read_text()[:2000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        err = {name: float((load_quantized(path)(ids).logits - ref).norm() / ref.norm())
               for name, path in (("rtn", rtn), ("gptq", g))}
    assert err["gptq"] < 0.9 * err["rtn"], err


@pytest.mark.parametrize("then, scheme", [("rtn", "Q4_0"), ("gptq", "Q4_K_M")])
def test_awq_scales_onto_the_grids_with_folded_norms(tiny_model, tmp_path, calib_file, then, scheme):
    """awq --format gguf: the scale search rounds with llama.cpp's quantizer of each Linear's type,
    the scales are folded into the norms (written as folded: they differ from the source's) and
    the Linears; on the calibration text the first block's output (--then rtn: random weights
    leave the scales little to find, so the block, where the search looks) or the logits (--then
    gptq) are nearer the float model's than with llama.cpp's plain rounding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantize_llm import load_quantized
    from quantize_llm.algorithms.awq import AWQOptions
    from quantize_llm.calibration.data import CalibrationSpec
    from quantize_llm.run.execute import quantize
    from quantize_llm.run.gguf import tensor_types

    src = tiny_model("qwen2", config=WIDE)                 # q/k/v biases: folded with v_proj's rows
    rtn = write(src, tmp_path / "rtn.gguf", scheme).output
    a = quantize(str(src), tmp_path / "awq.gguf", QuantSpec(method="awq", format=f"gguf:{scheme}"),
                 options=AWQOptions(then=then), calibration=CalibrationSpec(source=str(calib_file), nsamples=16,
                                                                             seqlen=64)).output
    assert tensor_types(a) == tensor_types(rtn)
    theirs = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(rtn).tensors}
    ours = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(a).tensors}
    assert not np.array_equal(ours["blk.0.attn_norm.weight"], theirs["blk.0.attn_norm.weight"])   # folded
    assert np.array_equal(ours["token_embd.weight"], theirs["token_embd.weight"])
    ids = AutoTokenizer.from_pretrained(src)(calib_file.read_text()[:2000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids, output_hidden_states=True)
        err = {}
        for name, path in (("rtn", rtn), ("awq", a)):
            got = load_quantized(path)(ids, output_hidden_states=True)
            err[name] = float((got.hidden_states[1] - ref.hidden_states[1]).norm() / ref.hidden_states[1].norm()) \
                if then == "rtn" else float((got.logits - ref.logits).norm() / ref.logits.norm())
    assert err["awq"] < (0.99 if then == "rtn" else 0.9) * err["rtn"], err   # measured 0.984 and below 0.9


GEMMA = dict(WIDE, vocab_size=320, query_pre_attn_scalar=16)


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_gemma_files_store_shifted_norms_and_read_back(tiny_model, tmp_path, sentencepiece_model, arch):
    """Gemma families: norms stored as weight + 1 (llama.cpp scales by the stored value), the
    SentencePiece vocabulary with its scores and types, the Gemma 2/3 keys; our reader gives the
    checkpoint's tensors back."""
    import sentencepiece
    from safetensors.torch import load_file

    src = tiny_model(arch, config=dict(GEMMA, query_pre_attn_scalar=16) if arch != "gemma" else dict(WIDE, vocab_size=320),
                     tokenizer=False)
    sentencepiece_model(src, 320)
    out = write(src, tmp_path / "g.gguf", "Q8_0").output
    reader = gguf.GGUFReader(out)
    field = {f.name: f for f in reader.fields.values()}
    arch_name = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}[arch]
    assert bytes(field["general.architecture"].parts[-1]).decode() == arch_name
    assert bytes(field["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    tokens = [bytes(field["tokenizer.ggml.tokens"].parts[i]).decode() for i in field["tokenizer.ggml.tokens"].data]
    scores = [float(field["tokenizer.ggml.scores"].parts[i][0]) for i in field["tokenizer.ggml.scores"].data]
    assert tokens[:320] == [sp.id_to_piece(i) for i in range(320)]
    assert scores[10] == sp.get_score(10)
    source = load_file(str(src / "model.safetensors"))
    stored = {t.name: t for t in reader.tensors}
    np.testing.assert_allclose(np.asarray(stored["blk.0.attn_norm.weight"].data),
                               source["model.layers.0.input_layernorm.weight"].float().numpy() + 1, rtol=0, atol=1e-6)
    if arch != "gemma":
        assert "blk.1.post_ffw_norm.weight" in stored
        keys = set(field)
        assert {f"{arch_name}.attention.sliding_window", f"{arch_name}.attention.sliding_window_pattern",
                f"{arch_name}.rope.freq_base_swa"} <= keys
        if arch == "gemma2":
            assert f"{arch_name}.attn_logit_softcapping" in keys
    config, tensors, _ = gf.read_gguf(out)
    np.testing.assert_allclose(tensors["model.layers.1.post_attention_layernorm.weight"],
                               source["model.layers.1.post_attention_layernorm.weight"].float().numpy(), atol=1e-6)


def test_gemma_refusals(tiny_model, tmp_path, sentencepiece_model):
    src = tiny_model("gemma2", config=dict(GEMMA, query_pre_attn_scalar=256), tokenizer=False)
    sentencepiece_model(src, 320)
    with pytest.raises(SpecError, match=r"llama.cpp scales this model's queries by 1/sqrt\(16\)"):
        write(src, tmp_path / "g.gguf", "Q8_0")
    assert not (tmp_path / "g.gguf").exists()
    scaled = {"model_type": "gemma3_text", "num_hidden_layers": 34, "hidden_size": 2560, "num_attention_heads": 8,
              "head_dim": 256, "query_pre_attn_scalar": 256,
              "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    assert gf.family(scaled) == ("gemma3", False)           # Gemma 3 4B's settings
    assert gf.rope_scaling(scaled, "gemma3") == gf.RopeScaling("linear", 8.0)
    scaled["rope_parameters"]["sliding_attention"]["rope_type"] = "linear"   # llama.cpp keeps those at scale 1
    with pytest.raises(SpecError, match="does not write rope scaling 'linear' on its sliding_attention layers"):
        gf.family(scaled)
    scaled["rope_parameters"]["sliding_attention"]["rope_type"] = "default"
    scaled["rope_parameters"]["full_attention"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    with pytest.raises(SpecError, match="does not write rope scaling 'yarn'"):
        gf.family(scaled)
    scaled["rope_parameters"]["full_attention"] = {"rope_type": "default", "rope_theta": 1e6}
    assert gf.family(scaled) == ("gemma3", False) and gf.rope_scaling(scaled, "gemma3") is None
    assert gf.rope_theta(scaled) == 1e6 and gf.rope_theta(scaled, "sliding_attention") == 1e4
    config = {"model_type": "gemma3", "num_hidden_layers": 2}
    with pytest.raises(SpecError, match="model_type 'gemma3'") as exc:
        gf.family(config)
    assert "gemma3_text" in (exc.value.hint or "")


@pytest.mark.parametrize("bits", [4, 8])
def test_convert_writes_exactly_the_checkpoints_values(tiny_model, tmp_path, bits):
    """convert --format gguf: a 4/8-bit symmetric group-32 checkpoint becomes Q4_0/Q8_0 blocks
    whose values (the gguf package's dequantizer) are the checkpoint's (our reader's), bit for
    bit; the other tensors exact too."""
    from quantize_llm.formats.reading import QuantizedModules
    from quantize_llm.models.load import CheckpointReader
    from quantize_llm.run.execute import quantize
    from quantize_llm.run.gguf import convert_gguf

    src = tiny_model("llama", config=WIDE)
    ckpt = tmp_path / "ckpt"
    quantize(str(src), ckpt, QuantSpec(method="rtn", bits=bits, group_size=32, sym=True))
    out = convert_gguf(str(ckpt), tmp_path / "c.gguf").output
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == ("Q4_0" if bits == 4 else "Q8_0")
    config, tensors, _ = gf.read_gguf(out)
    with CheckpointReader(ckpt) as reader:
        modules = QuantizedModules(reader)
        for prefix in modules.prefixes:
            want = modules.decode(prefix).dequantize(torch.float32).numpy()
            np.testing.assert_array_equal(tensors[f"{prefix}.weight"], want)
        np.testing.assert_array_equal(tensors["model.embed_tokens.weight"],
                                      reader.read("model.embed_tokens.weight").float().numpy())


def test_convert_refuses_what_has_no_exact_block(tiny_model, tmp_path):
    from quantize_llm.run.execute import quantize
    from quantize_llm.run.gguf import convert_gguf

    src = tiny_model("llama", config=WIDE)
    for name, spec in [("g128", QuantSpec(method="rtn", bits=4, group_size=128, sym=True)),
                       ("asym", QuantSpec(method="rtn", bits=4, group_size=32, sym=False))]:
        quantize(str(src), tmp_path / name, spec)
        with pytest.raises(SpecError, match="cannot be converted to GGUF exactly"):
            convert_gguf(str(tmp_path / name), tmp_path / f"{name}.gguf")
        assert not (tmp_path / f"{name}.gguf").exists()
    with pytest.raises(SpecError, match="is not quantized"):
        convert_gguf(str(src), tmp_path / "float.gguf")


def test_multimodal_gemma3_is_written_as_its_language_model(tmp_path, sentencepiece_model):
    """Gemma3ForConditionalGeneration: the GGUF holds its language model only (no vision tensor),
    and that model's logits on text are the multimodal model's (Q8_0 rounding apart)."""
    from conftest import build_gemma3_multimodal

    from quantize_llm import load_quantized

    src = tmp_path / "gemma3-mm"
    model = build_gemma3_multimodal(src)
    sentencepiece_model(src, 320)
    out = write(src, tmp_path / "g.gguf", "Q8_0").output
    names = [t.name for t in gguf.GGUFReader(out).tensors]
    assert "blk.1.attn_q_norm.weight" in names and not any("vision" in n or "mm" in n for n in names)
    ids = torch.tensor([[5, 17, 200, 33, 90, 256, 1, 77]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = load_quantized(out)(ids).logits
    assert float((got - want).norm() / want.norm()) < 0.02


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_multimodal_gemma3_calibrates_as_its_language_model(tmp_path, calib_file, method):
    """gptq/awq to GGUF of a Gemma3ForConditionalGeneration: calibrated through the whole model on
    text, the tensors are those of the same run on its language model saved as a Gemma3ForCausalLM."""
    from conftest import build_gemma3_multimodal, byte_tokenizer
    from transformers import Gemma3ForCausalLM

    from quantize_llm.calibration.data import CalibrationSpec
    from quantize_llm.run.execute import quantize

    src = tmp_path / "gemma3-mm"
    model = build_gemma3_multimodal(src)
    byte_tokenizer().save_pretrained(src)
    text = tmp_path / "gemma3-text"
    causal = Gemma3ForCausalLM(model.config.text_config)
    causal.model.load_state_dict(model.model.language_model.state_dict())
    causal.lm_head.weight.data.copy_(model.lm_head.weight.data)
    causal.save_pretrained(text)
    byte_tokenizer().save_pretrained(text)
    cal = CalibrationSpec(source=str(calib_file), nsamples=4, seqlen=32)
    files = {}
    for name, folder in (("mm", src), ("text", text)):
        out = quantize(str(folder), tmp_path / f"{name}.gguf", QuantSpec(method=method, format="gguf:Q4_K_M"),
                       calibration=cal).output
        files[name] = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(out).tensors}
    assert set(files["mm"]) == set(files["text"]) and "blk.1.ffn_down.weight" in files["mm"]
    assert [n for n in files["mm"] if files["mm"][n] != files["text"][n]] == []


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192, "rope_theta": 500000.0},   # Llama 3.1's
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 10000.0},
])
def test_llama3_rope_divisors_are_transformers_frequencies(rope):
    """rope_freqs holds, per rotation frequency, how much transformers' llama3 rotation divides it."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=131072,
                         rope_parameters=dict(rope))
    plain = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                        rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]})
    scaled_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    scaling = gf.rope_scaling(config.to_dict(), "llama")
    assert scaling is not None and scaling.kind == "llama3" and scaling.freq_factors.shape == (32,)
    np.testing.assert_allclose(base_freq.numpy() / scaling.freq_factors, scaled_freq.double().numpy(), rtol=1e-5)
    assert scaling.freq_factors.min() >= 1.0 and scaling.freq_factors.max() == rope["factor"]
    assert gf.rope_scaling(plain.to_dict(), "llama") is None
    with pytest.raises(SpecError, match="does not write rope scaling 'llama3' for qwen2"):
        gf.rope_scaling(config.to_dict(), "qwen2")
