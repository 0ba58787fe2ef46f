"""The graphs users export: random-init transformers models through onnxprune, one row each.

    python benchmarks/zoo.py                       # two layers, real hidden sizes
    python benchmarks/zoo.py --small               # smallest configs (what the tests run)
    python benchmarks/zoo.py --only llama-gqa,bert --exporters dynamo --attention sdpa

Every architecture is built from its transformers config with random weights (nothing is
downloaded), with transformers' default attention (sdpa) and with eager, and exported with
both torch exporters (legacy: dynamo=False, opset 17; dynamo: dynamo=True, opset 18).
Each export gets one row:

- prunable %: share of the MatMul/Gemm weight parameters that FFN channel groups or
  recognised attention heads can remove (a parameter counted once);
- heads: attention blocks recognised / found, and the first decline reason;
- removed: parameters removed by ``--sparsity 0.5 --heads 0.25`` (data-free), the written
  model checked with onnx.checker and run in onnxruntime;
- exact: the largest output difference after zeroing the outgoing rows of 25 % of every
  recognised block's heads and then removing exactly those heads (should be ~1e-6).

Files go to build/zoo/. Nothing here needs a network.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXPORTERS = ("legacy", "dynamo")
ATTENTIONS = ("sdpa", "eager")
OPSET = {"legacy": 17, "dynamo": 18}
BATCH, SEQ = 2, 7


@dataclass(frozen=True)
class Arch:
    """How to build one architecture: its config (small or real widths) and inputs."""

    name: str
    build: Callable[[bool, str], object]  # (small, attention) -> torch module
    inputs: Callable[[object], dict[str, np.ndarray]]  # config-aware example inputs
    dynamic: tuple[str, ...]  # inputs whose axes 0 and 1 are dynamic
    cache: bool = False  # exported with its key/value cache as inputs and outputs


def _text_inputs(vocab: int, *, token_type: bool = False, mask: bool = True
                 ) -> Callable[[object], dict[str, np.ndarray]]:
    def make(_: object) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        feeds = {"input_ids": rng.integers(3, vocab, (BATCH, SEQ)).astype(np.int64)}
        if mask:
            m = np.ones((BATCH, SEQ), np.int64)
            m[1, -2:] = 0
            feeds["attention_mask"] = m
        if token_type:
            feeds["token_type_ids"] = np.zeros((BATCH, SEQ), np.int64)
        return feeds
    return make


class _Hidden:
    """Wraps a transformers model so that the export returns last_hidden_state only."""

    @staticmethod
    def wrap(model: object, names: Sequence[str]) -> object:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, a: torch.Tensor, b: torch.Tensor | None = None,
                        c: torch.Tensor | None = None) -> torch.Tensor:
                kwargs = dict(zip(names, (a, b, c)[:len(names)], strict=True))
                out = self.inner(**kwargs, **({"use_cache": False} if _decoder(model) else {}))
                return out[0]

        return Wrapped().eval()


PAST = 5  # cached positions fed to the "-kv" decoders


def _cache_inputs(model: object) -> dict[str, np.ndarray]:
    """A prompt continued after PAST cached positions: ids, the mask over past + new
    positions, and past key/value [batch, kv_heads, PAST, head_size] per layer."""
    cfg = model.config  # type: ignore[attr-defined]
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    size = cfg.hidden_size // cfg.num_attention_heads
    feeds = TEXT(model)
    rng = np.random.default_rng(1)
    mask = np.ones((BATCH, PAST + SEQ), np.int64)
    mask[1, :2] = 0  # a left-padded row
    feeds["attention_mask"] = mask
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal(
                (BATCH, kv, PAST, size)).astype(np.float32)
    return feeds


class _Cached:
    """Wraps a decoder so that the export takes the past key/values as inputs and returns
    the hidden states and the present key/values (what generation loops feed back)."""

    @staticmethod
    def wrap(model: object, layers: int) -> object:
        import torch
        from transformers import DynamicCache

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, ids: torch.Tensor, mask: torch.Tensor,
                        *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
                cache = DynamicCache(config=self.inner.config)  # type: ignore[attr-defined]
                for i in range(layers):
                    cache.update(past[2 * i], past[2 * i + 1], i)
                out = self.inner(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                 use_cache=True)
                present = []
                for layer in out.past_key_values.layers:
                    present += [layer.keys, layer.values]
                return (out[0], *present)

        if layers == 2:  # the dynamo exporter wants named arguments, not *past
            class Two(Wrapped):
                def forward(self, ids: torch.Tensor, mask: torch.Tensor,  # type: ignore[override]
                            k0: torch.Tensor, v0: torch.Tensor, k1: torch.Tensor,
                            v1: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    return super().forward(ids, mask, k0, v0, k1, v1)
            return Two().eval()
        return Wrapped().eval()


def _decoder(model: object) -> bool:
    return getattr(getattr(model, "config", None), "is_decoder", False) or type(
        model).__name__ in ("LlamaModel", "Qwen2Model", "MistralModel", "Phi3Model",
                            "GPT2Model")


def _widths(small: bool, hidden: int, heads: int, inter: int) -> dict[str, int]:
    if small:
        return {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}
    return {"hidden_size": hidden, "num_attention_heads": heads, "intermediate_size": inter}


def _bert_like(cls_name: str, config_name: str, **extra: object
               ) -> Callable[[bool, str], object]:
    def build(small: bool, attention: str) -> object:
        import transformers

        cfg = getattr(transformers, config_name)(
            num_hidden_layers=2, vocab_size=1000, **_widths(small, 768, 12, 3072), **extra,
            attn_implementation=attention)
        return getattr(transformers, cls_name)(cfg)
    return build


def _decoder_build(cls_name: str, config_name: str, kv_heads: int | None, **extra: object
                   ) -> Callable[[bool, str], object]:
    def build(small: bool, attention: str) -> object:
        import transformers

        w = _widths(small, 1024, 16, 2816)
        kv = None if kv_heads is None else (2 if small else kv_heads)
        if kv is not None and small:  # 8 query heads over 2 K/V heads: groups of 4
            w = {**w, "hidden_size": 64, "num_attention_heads": 8}
        cfg = getattr(transformers, config_name)(
            num_hidden_layers=2, vocab_size=1000, max_position_embeddings=128, **w,
            **({"num_key_value_heads": kv} if kv is not None else {}), **extra,
            attn_implementation=attention)
        return getattr(transformers, cls_name)(cfg)
    return build


def _gpt2(small: bool, attention: str) -> object:
    import transformers

    w = _widths(small, 768, 12, 3072)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=w["hidden_size"], n_head=w[
        "num_attention_heads"], n_inner=w["intermediate_size"], vocab_size=1000,
        n_positions=128, attn_implementation=attention)
    return transformers.GPT2Model(cfg)


def _distilbert(small: bool, attention: str) -> object:
    import transformers

    w = _widths(small, 768, 12, 3072)
    cfg = transformers.DistilBertConfig(n_layers=2, dim=w["hidden_size"], n_heads=w[
        "num_attention_heads"], hidden_dim=w["intermediate_size"], vocab_size=1000,
        attn_implementation=attention)
    return transformers.DistilBertModel(cfg)


def _t5(small: bool, attention: str) -> object:
    import transformers

    w = _widths(small, 512, 8, 2048)
    cfg = transformers.T5Config(num_layers=2, d_model=w["hidden_size"], num_heads=w[
        "num_attention_heads"], d_kv=w["hidden_size"] // w["num_attention_heads"],
        d_ff=w["intermediate_size"], vocab_size=1000, feed_forward_proj="gated-gelu",
        attn_implementation=attention)
    return transformers.T5EncoderModel(cfg)


def _vit(small: bool, attention: str) -> object:
    import transformers

    cfg = transformers.ViTConfig(num_hidden_layers=2, image_size=32, patch_size=8,
                                 **_widths(small, 768, 12, 3072), attn_implementation=attention)
    return transformers.ViTModel(cfg, add_pooling_layer=False)


def _clip_text(small: bool, attention: str) -> object:
    import transformers

    cfg = transformers.CLIPTextConfig(num_hidden_layers=2, vocab_size=1000,
                                      max_position_embeddings=32,
                                      **_widths(small, 512, 8, 2048),
                                      attn_implementation=attention)
    return transformers.CLIPTextModel(cfg)


def _whisper(small: bool, attention: str) -> object:
    import transformers

    w = _widths(small, 384, 6, 1536)
    cfg = transformers.WhisperConfig(
        encoder_layers=2, decoder_layers=1, d_model=w["hidden_size"],
        encoder_attention_heads=w["num_attention_heads"],
        decoder_attention_heads=w["num_attention_heads"],
        encoder_ffn_dim=w["intermediate_size"], decoder_ffn_dim=w["intermediate_size"],
        num_mel_bins=16, max_source_positions=8, vocab_size=1000, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        attn_implementation=attention)
    return transformers.WhisperModel(cfg).get_encoder()


def _pixels(_: object) -> dict[str, np.ndarray]:
    return {"pixel_values": np.random.default_rng(0).standard_normal(
        (BATCH, 3, 32, 32)).astype(np.float32)}


def _features(_: object) -> dict[str, np.ndarray]:
    return {"input_features": np.random.default_rng(0).standard_normal(
        (BATCH, 16, 16)).astype(np.float32)}


TEXT = _text_inputs(1000)
ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("bert", _bert_like("BertModel", "BertConfig"), _text_inputs(1000, token_type=True),
         ("input_ids", "attention_mask", "token_type_ids")),
    Arch("distilbert", _distilbert, TEXT, ("input_ids", "attention_mask")),
    Arch("roberta", _bert_like("RobertaModel", "RobertaConfig", pad_token_id=1), TEXT,
         ("input_ids", "attention_mask")),
    Arch("albert", _bert_like("AlbertModel", "AlbertConfig", embedding_size=128), TEXT,
         ("input_ids", "attention_mask")),
    Arch("gpt2", _gpt2, TEXT, ("input_ids", "attention_mask")),
    Arch("llama-gqa", _decoder_build("LlamaModel", "LlamaConfig", 4), TEXT,
         ("input_ids", "attention_mask")),
    Arch("llama-mha", _decoder_build("LlamaModel", "LlamaConfig", None), TEXT,
         ("input_ids", "attention_mask")),
    Arch("qwen2", _decoder_build("Qwen2Model", "Qwen2Config", 4), TEXT,
         ("input_ids", "attention_mask")),
    Arch("mistral", _decoder_build("MistralModel", "MistralConfig", 4), TEXT,
         ("input_ids", "attention_mask")),
    Arch("phi3", _decoder_build("Phi3Model", "Phi3Config", None, pad_token_id=0), TEXT,
         ("input_ids", "attention_mask")),
    Arch("llama-gqa-kv", _decoder_build("LlamaModel", "LlamaConfig", 4), _cache_inputs,
         ("input_ids", "attention_mask"), cache=True),
    Arch("llama-mha-kv", _decoder_build("LlamaModel", "LlamaConfig", None), _cache_inputs,
         ("input_ids", "attention_mask"), cache=True),
    Arch("vit", _vit, _pixels, ("pixel_values",)),
    Arch("clip-text", _clip_text, TEXT, ("input_ids", "attention_mask")),
    Arch("whisper-encoder", _whisper, _features, ("input_features",)),
    Arch("t5-encoder", _t5, TEXT, ("input_ids", "attention_mask")),
)}


def export(arch: Arch, exporter: str, attention: str, small: bool, out: Path) -> Path:
    """Builds the random-init model and exports it; returns the .onnx path."""
    import torch

    torch.manual_seed(0)
    model = arch.build(small, attention)
    model.eval()  # type: ignore[attr-defined]
    feeds = arch.inputs(model)
    names = list(feeds)
    outputs = ["hidden"]
    if arch.cache:
        layers = model.config.num_hidden_layers  # type: ignore[attr-defined]
        wrapped = _Cached.wrap(model, layers)
        outputs += [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    else:
        wrapped = _Hidden.wrap(model, names)
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with torch.no_grad():
        if exporter == "legacy":
            axes = {n: {0: "batch", 1: "sequence"} if n in arch.dynamic and n not in (
                "pixel_values", "input_features") else {0: "batch"} for n in names}
            if arch.cache:  # the mask covers the cached and the new positions
                axes["attention_mask"] = {0: "batch", 1: "total"}
                axes.update({n: {0: "batch", 2: "past"} for n in names if n.startswith("past_")})
            torch.onnx.export(wrapped, args, str(tmp), dynamo=False, opset_version=17,
                              input_names=names, output_names=outputs,
                              dynamic_axes=axes)
        else:
            dim = torch.export.Dim
            batch, seq = dim("batch", min=1, max=64), dim("sequence", min=2, max=64)
            shapes = tuple({0: batch, 1: seq} if n not in ("pixel_values", "input_features")
                           else {0: batch} for n in names)
            if arch.cache:  # past and total lengths are related: let the exporter say how
                auto = dim.DYNAMIC
                shapes = tuple({0: auto, 2: auto} if n.startswith("past_") else {0: auto, 1: auto}
                               for n in names)
            program = torch.onnx.export(wrapped, args, dynamo=True, opset_version=18,
                                        input_names=names, output_names=outputs,
                                        dynamic_shapes=shapes, optimize=True)
            program.save(str(tmp), external_data=False)
    tmp.replace(out)
    np.savez(out.with_suffix(".npz"), **feeds)
    return out


# -- analysis ---------------------------------------------------------------------------------
@dataclass
class Row:
    arch: str
    exporter: str
    attention: str
    prunable: float = 0.0
    heads: str = ""
    reason: str = ""
    removed: int = 0
    runs: str = ""
    exact: float | None = None
    error: str = ""
    gqa: str = ""  # per layer, grouped-query only: "q 8->6 kv 2->2 (query-heads)"

    def cells(self) -> list[str]:
        exact = "-" if self.exact is None else f"{self.exact:.1e}"
        return [self.arch, self.exporter, self.attention, f"{self.prunable:.0%}", self.heads,
                str(self.removed), self.runs, exact, self.gqa or "-",
                (self.error or self.reason)[:90]]


HEADER = ["arch", "exporter", "attention", "prunable", "heads", "removed", "runs", "exact",
          "GQA heads/layer", "declined because / error"]


def _run(path: Path | bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    from onnxprune.core import cache_slices

    session = ort.InferenceSession(path if isinstance(path, bytes) else str(path),
                                   providers=["CPUExecutionProvider"])
    want = {i.name for i in session.get_inputs()}
    # heads removed with their key/value cache: the pruned model reads the kept slice
    kept = cache_slices.parse(session.get_modelmeta().custom_metadata_map.get(cache_slices.KEY))
    feeds = cache_slices.slice_arrays(feeds, kept)
    return session.run(None, {k: v for k, v in feeds.items() if k in want})[0]


def prunable_share(model: object) -> tuple[float, list[object]]:
    """Share of MatMul/Gemm weight parameters that a channel group or a head can remove."""
    import onnx_ir as ir

    from onnxprune.attention.remove_heads import recognise_blocks
    from onnxprune.channels.groups import find_channel_groups
    from onnxprune.core.weights import const_array

    assert isinstance(model, ir.Model)
    weights: dict[ir.Value, int] = {}
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1:
            arr = const_array(node.inputs[1])
            if arr is not None and arr.ndim == 2:
                weights[node.inputs[1]] = arr.size  # type: ignore[index]
    covered: set[ir.Value] = set()
    try:
        groups = find_channel_groups(model)
    except AssertionError:  # an internal error of the channel analysis: counted as nothing
        groups = []
    for g in groups:
        if g.skip_reason is None:
            covered.update(u.weight for u in (*g.producers, *g.consumers))
    blocks = recognise_blocks(model)
    for b in blocks:
        if b.prunable:
            covered.update(p.use.weight for p in b.projections)
            covered.add(b.output.weight)  # type: ignore[union-attr]
    total = sum(weights.values())
    return (sum(n for v, n in weights.items() if v in covered) / total if total else 0.0,
            blocks)


def exactness(path: Path, feeds: dict[str, np.ndarray]) -> float | None:
    """Zero the output rows of 25 % of each block's heads, then remove exactly those heads;
    returns max |zeroed - pruned| (None when no block is recognised)."""
    import onnx_ir as ir

    from onnxprune.attention.remove_heads import RemoveHeadsPass, recognise_blocks
    from onnxprune.attention.slicing import head_columns
    from onnxprune.core.weights import const_array, set_const_array

    model = ir.load(str(path))
    blocks = [b for b in recognise_blocks(model) if b.prunable]
    if not blocks:
        return None
    keep: dict[str, list[int]] = {}
    for b in blocks:
        drop = max(1, b.num_heads // 4)
        kept = list(range(drop, b.num_heads))
        keep[b.name] = kept
        o = b.output
        assert o is not None
        w = np.array(const_array(o.weight))
        rows = head_columns(range(drop), b.out_head_size)
        index = [slice(None)] * 2
        index[o.reduce_axis] = rows  # type: ignore[call-overload]
        w[tuple(index)] = 0
        set_const_array(o.weight, w)
    zeroed = ir.to_proto(model).SerializeToString()
    RemoveHeadsPass(fraction=0.0, keep=keep)(model)  # type: ignore[arg-type]
    pruned = ir.to_proto(model).SerializeToString()
    return float(np.max(np.abs(_run(zeroed, feeds) - _run(pruned, feeds))))


def analyse(path: Path, row: Row) -> Row:
    import onnx
    import onnx_ir as ir

    from onnxprune.api import PruneConfig
    from onnxprune.recipe.run import prune_model

    feeds = dict(np.load(path.with_suffix(".npz")))
    model = ir.load(str(path))
    row.prunable, blocks = prunable_share(model)
    ok = [b for b in blocks if b.prunable]
    row.heads = f"{len(ok)}/{len(blocks)}"
    row.reason = next((b.skip_reason or "" for b in blocks if not b.prunable), "")
    before = _count(model)
    model = ir.load(str(path))
    try:
        report = prune_model(model, PruneConfig(sparsity=0.5, heads=0.25))  # type: ignore[call-arg]
        row.gqa = _gqa_heads(report)
    except Exception as e:  # a refusal is a row, not a crash
        row.error = f"prune: {type(e).__name__}: {e}"
    row.removed = before - _count(model)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.onnx"
        ir.save(model, str(out))
        try:
            onnx.checker.check_model(str(out), full_check=True)
            _run(out, feeds)
            row.runs = "yes"
        except Exception as e:
            row.runs = "NO"
            row.error = row.error or f"{type(e).__name__}: {str(e)[:200]}"
    try:
        row.exact = exactness(path, feeds)
    except Exception as e:
        row.error = row.error or f"exactness: {type(e).__name__}: {e}"
    return row


def _gqa_heads(report: object) -> str:
    """Query and K/V heads before -> after of the grouped-query blocks, one entry per
    distinct outcome (layers usually agree)."""
    seen: list[str] = []
    for res in getattr(report, "passes", {}).values():
        for b in (res.get("blocks", []) if isinstance(res, dict) else []):
            q, kv = b.get("query_heads"), b.get("kv_heads")
            if not q or not kv or q[0] == kv[0]:
                continue
            cell = f"q {q[0]}->{q[1]} kv {kv[0]}->{kv[1]} ({b.get('granularity')})"
            if cell not in seen:
                seen.append(cell)
    return "; ".join(seen)


def _count(model: object) -> int:
    from onnxprune.core.accounting import model_stats

    return model_stats(model).parameters  # type: ignore[arg-type]


def run(names: Sequence[str], exporters: Sequence[str], attentions: Sequence[str], *,
        small: bool, build: Path, log: Callable[[str], None] = print) -> list[Row]:
    rows = []
    for name in names:
        for attention in attentions:
            for exporter in exporters:
                row = Row(name, exporter, attention)
                path = build / f"{name}_{attention}_{exporter}{'_small' if small else ''}.onnx"
                try:
                    if not path.exists():
                        export(ARCHS[name], exporter, attention, small, path)
                    analyse(path, row)
                except Exception as e:
                    row.error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                    if os.environ.get("ZOO_TRACEBACK"):
                        traceback.print_exc()
                rows.append(row)
                log(" | ".join(row.cells()))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="smallest configs (hidden 32)")
    p.add_argument("--only", default="", help="comma-separated architectures")
    p.add_argument("--exporters", default="legacy,dynamo")
    p.add_argument("--attention", default="sdpa,eager")
    p.add_argument("--build", type=Path, default=ROOT / "build" / "zoo")
    opts = p.parse_args(argv)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    names = [n for n in opts.only.split(",") if n] or list(ARCHS)
    print(" | ".join(HEADER))
    rows = run(names, opts.exporters.split(","), opts.attention.split(","), small=opts.small,
               build=opts.build)
    bad = [r for r in rows if r.error or r.runs != "yes"]
    print(f"{len(rows)} rows, {len(bad)} with an error or a model that does not run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
