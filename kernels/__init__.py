"""Triton kernels (each module also holds the PyTorch reference the tests compare against):

- tree_attention: tree-masked GQA attention over the static KV cache, split-K over [0, cache_len + W).
- draft_ops: fused_embed_fc (EAGLE fc over [embedding; feature]) and lm_head_topk (LM head GEMV + top-k + logsumexp).
- kv_commit: move an accepted tree path's K/V into contiguous cache slots of one layer, in one launch.

All are torch custom ops (fasteagle::*), usable inside torch.compile graphs and CUDA-graph capture.

Without CUDA the kernels can only run under the Triton interpreter, and `triton.jit` picks the interpreter from
TRITON_INTERPRET when a kernel is decorated (at import). So on a machine with no CUDA device, importing this
package defaults TRITON_INTERPRET=1, whatever module imported it first; an explicit TRITON_INTERPRET=0 is kept, and
then the public functions run their PyTorch references on CPU tensors.
"""
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
