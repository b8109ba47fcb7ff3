"""An ONNX model run by onnxruntime behind a torch module (the ``onnx`` model source)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OnnxModel"]


class OnnxModel(nn.Module):
    """An ONNX model run by onnxruntime, as a module that takes and returns torch tensors (on the
    input's device). It only embeds: no gradient flows through it, so it serves as a frozen model
    (the old model of a training, a FastFill target, embed/evaluate/adapter pairs), never as a
    model to train. The session is built from the bytes where the module is built (each Ray
    worker), with as many threads as torch has there."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        opts.inter_op_num_threads = 1
        want = ("CUDAExecutionProvider", "CPUExecutionProvider")  # CUDA where onnxruntime-gpu is installed
        providers = [p for p in want if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(data, sess_options=opts, providers=providers)
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        feed = np.ascontiguousarray(x.detach().float().cpu().numpy())
        out = self.session.run(None, {self.input: feed})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)
