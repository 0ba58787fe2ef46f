"""Recognition side by side: onnxprune's head analysis vs onnxscript's optimize_for_ort.

    python benchmarks/attention_forms.py build/minilm_legacy.onnx build/minilm_dynamo.onnx

For each model: attention blocks (Softmax nodes), blocks onnxprune recognises and its time,
and which attention ops onnxscript.rewriter.ort_fusions.optimize_for_ort fuses and its time.
"""

from __future__ import annotations

import collections
import sys
import time

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from onnxprune.attention.remove_heads import recognise_blocks


def main(paths: list[str]) -> None:
    for path in paths:
        model = ir.load(path)
        start = time.perf_counter()
        blocks = recognise_blocks(model)
        ours = time.perf_counter() - start
        softmax = sum(1 for n in model.graph if n.op_type == "Softmax")
        fused_model = ir.load(path)
        start = time.perf_counter()
        error = ""
        try:
            optimize_for_ort(fused_model)
        except Exception as e:  # a failing fusion is a result here
            error = f" ({type(e).__name__}: {str(e)[:80]})"
        theirs = time.perf_counter() - start
        ops = collections.Counter(n.op_type for n in fused_model.graph
                                  if n.domain == "com.microsoft" and "Attention" in n.op_type)
        print(f"{path.split('/')[-1]}: softmax {softmax}; onnxprune "
              f"{sum(b.prunable for b in blocks)}/{len(blocks)} in {ours:.2f}s; "
              f"optimize_for_ort {dict(ops) or 'no attention fused'} in {theirs:.2f}s{error}")


if __name__ == "__main__":
    main(sys.argv[1:])
