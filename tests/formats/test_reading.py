"""Which modules of a checkpoint are quantized: those storing one of their format's marker tensors."""
from quantize_llm.formats.bnb import BnbFormat
from quantize_llm.formats.gptq import GPTQFormat
from quantize_llm.formats.reading import marked_module, quantized_modules


def test_gptq_modules_in_file_order_with_their_tensors():
    names = ["model.layers.1.mlp.down_proj.qweight", "model.layers.1.mlp.down_proj.scales",
             "model.layers.1.mlp.down_proj.qzeros", "model.layers.1.mlp.down_proj.g_idx",
             "model.layers.1.mlp.down_proj.bias", "lm_head.weight", "model.norm.weight",
             "model.layers.0.self_attn.q_proj.scales", "model.layers.0.self_attn.q_proj.qweight",
             "model.layers.0.qweight_proj.weight", "model.layers.0.self_attn.q_proj.qzeros"]
    assert quantized_modules(names, GPTQFormat) == {
        "model.layers.1.mlp.down_proj": {
            "qweight": "model.layers.1.mlp.down_proj.qweight", "qzeros": "model.layers.1.mlp.down_proj.qzeros",
            "scales": "model.layers.1.mlp.down_proj.scales", "g_idx": "model.layers.1.mlp.down_proj.g_idx"},
        "model.layers.0.self_attn.q_proj": {
            "qweight": "model.layers.0.self_attn.q_proj.qweight", "qzeros": "model.layers.0.self_attn.q_proj.qzeros",
            "scales": "model.layers.0.self_attn.q_proj.scales"},
    }
    assert list(quantized_modules(names, GPTQFormat)) == ["model.layers.1.mlp.down_proj",
                                                          "model.layers.0.self_attn.q_proj"]


def test_markers_with_dots_and_names_that_only_contain_one():
    state = "weight.quant_state.bitsandbytes__nf4"
    assert marked_module(f"model.layers.0.mlp.up_proj.{state}", BnbFormat.markers) == "model.layers.0.mlp.up_proj"
    assert marked_module("model.layers.0.mlp.up_proj.weight", BnbFormat.markers) is None
    assert marked_module("model.layers.0.mlp.up_proj.weight.absmax", BnbFormat.markers) is None
    assert marked_module("qweight", ("qweight",)) is None                   # no module in front of it
    assert marked_module("model.layers.0.xqweight", ("qweight",)) is None
