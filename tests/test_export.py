"""``socratune export``: the merged model equals base + adapter, loads with plain transformers, and
the GGUF file reads back with llama.cpp-named tensors and the tokenizer.

    python -m pytest -q tests/test_export.py
"""

from __future__ import annotations

import pytest

from socratune.cli import main
from socratune.core.errors import ModelError
from socratune.core.rundir import RunDir

PROMPT = [{"role": "user", "content": "幸福とは何でしょうか？"}]


@pytest.fixture(scope="module")
def exported(default_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert main(["export", str(default_run), "--merged", str(out / "merged"), "--gguf", str(out / "tiny.gguf")]) == 0
    return out / "merged", out / "tiny.gguf"


def _prompt_ids(tokenizer):
    from socratune.generation.generate import prompt_texts

    return tokenizer(prompt_texts(tokenizer, [PROMPT])[0], add_special_tokens=False, return_tensors="pt")["input_ids"]


def test_merged_model_loads_with_plain_transformers_and_gives_base_plus_adapter_logits(exported, default_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir, _ = exported
    peft_model, tokenizer = default_model
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged_tokenizer.chat_template == tokenizer.chat_template
    assert merged.generation_config.eos_token_id == peft_model.generation_config.eos_token_id  # stops at end of turn
    ids = _prompt_ids(merged_tokenizer)
    assert ids.tolist() == _prompt_ids(tokenizer).tolist()
    with torch.no_grad():
        expected = peft_model(ids).logits
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with torch.no_grad(), peft_model.disable_adapter():  # and the adapter mattered: the base alone differs
        base_logits = peft_model(ids).logits
    assert (base_logits - expected).abs().max() > 1e-2


def test_gguf_reads_back_with_llama_tensors_and_the_tokenizer(exported, default_model):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir, gguf_path = exported
    _, tokenizer = default_model
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    config = merged.config
    reader = gguf.GGUFReader(gguf_path)
    field = {name: f.contents() for name, f in reader.fields.items()}

    assert field["general.architecture"] == "llama"
    assert field["llama.block_count"] == config.num_hidden_layers
    assert field["llama.attention.head_count_kv"] == config.num_key_value_heads
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(config.num_hidden_layers) for t in per_block}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected
    embed = tensors["token_embd.weight"]
    # GGUF lists dimensions innermost first
    assert list(reversed(embed.shape.tolist())) == [config.vocab_size, config.hidden_size]
    assert torch.equal(torch.from_numpy(embed.data.copy()), merged.model.embed_tokens.weight.detach())

    tokens = field["tokenizer.ggml.tokens"]
    assert field["tokenizer.ggml.model"] == "gpt2"
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(config.vocab_size)))
    control = {i for i, kind in enumerate(field["tokenizer.ggml.token_type"]) if kind == gguf.TokenType.CONTROL}
    assert control == set(tokenizer.all_special_ids)
    assert len(field["tokenizer.ggml.merges"]) > 0
    assert tokens[field["tokenizer.ggml.bos_token_id"]] == "<bos>"
    assert tokens[field["tokenizer.ggml.eos_token_id"]] == "<eos>"
    assert tokens[field["tokenizer.ggml.eot_token_id"]] == "<end_of_turn>"
    assert field["tokenizer.ggml.add_bos_token"] is False  # the chat template writes <bos> itself
    assert field["tokenizer.chat_template"] == tokenizer.chat_template

    # An independent reader of llama.cpp's layout: transformers' GGUF loader undoes the q/k row
    # order and rebuilds the tokenizer from the metadata; both must match the merged model.
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ids = _prompt_ids(tokenizer)
    assert _prompt_ids(gguf_tokenizer).tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids).logits, merged(ids).logits, atol=1e-5, rtol=0)


def test_gguf_export_writes_an_ollama_modelfile_that_prompts_as_the_run(exported, default_model):
    from socratune.generation.generate import prompt_texts
    from test_modelfile import go_render

    _, gguf_path = exported
    _, tokenizer = default_model
    lines = gguf_path.with_suffix(".Modelfile").read_text(encoding="utf-8").splitlines()
    assert "FROM ./tiny.gguf" in lines and 'PARAMETER stop "<end_of_turn>"' in lines
    template = "\n".join(lines).split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    conversation = [{"role": "system", "content": "君はソクラテスだ。"}, {"role": "user", "content": "正義とは？"},
                    {"role": "assistant", "content": "君はどう思うのかね？"},
                    {"role": "user", "content": "分かりません。"}]
    assert go_render(template, conversation) == prompt_texts(tokenizer, [conversation])[0]


def test_export_refuses_to_overwrite_without_force(default_run, tmp_path, capsys):
    taken, existing = tmp_path / "taken", tmp_path / "old.gguf"
    taken.mkdir()
    (taken / "precious.txt").write_text("keep me")
    existing.write_bytes(b"not yours")
    assert main(["export", str(default_run), "--merged", str(taken)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["export", str(default_run), "--gguf", str(existing)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (taken / "precious.txt").read_text() == "keep me" and existing.read_bytes() == b"not yours"

    oldest = RunDir(default_run).checkpoints()[0].name  # which ones are kept depends on train.select
    assert main(["export", str(default_run), "--merged", str(taken), "--force", "--checkpoint", oldest]) == 0
    assert (taken / "config.json").exists() and not (taken / "precious.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_a_qlora_run_is_merged_into_its_unquantized_base_in_the_compute_dtype(default_run_copy, default_model, tmp_path,
                                                                             capsys):
    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    config_path = default_run_copy / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    config["quant"].update(load_in_4bit=True, compute_dtype="bfloat16")  # as if trained with QLoRA
    config_path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    out = tmp_path / "merged"
    assert main(["export", str(default_run_copy), "--merged", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "QLoRA run" in printed and "not into 4-bit weights" in printed and "(bfloat16)" in printed
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    peft_model, tokenizer = default_model
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits.float(), peft_model(ids).logits, atol=0.1, rtol=0.05)


def test_gguf_export_refuses_a_model_it_cannot_express(tiny_tokenizer, tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from socratune.model.export import write_gguf

    config = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with pytest.raises(ModelError, match="convert_hf_to_gguf"):
        write_gguf(Gemma2ForCausalLM(config), tiny_tokenizer, tmp_path / "gemma.gguf", "gemma")
    assert not (tmp_path / "gemma.gguf").exists()
