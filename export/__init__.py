"""Building deployable artifacts of the fleet's model (``edgemole export``; format in :mod:`edgemole.artifact`).

- :mod:`export.program`: the trainable ExecuTorch program of a classifier (joint forward/backward, fast lowering);
- :mod:`export.causal`: the same for a causal LM (loss on response tokens);
- :mod:`export.onnx`: the ONNX inference model with the adapters as inputs;
- :mod:`export.artifact`: writes the folder (program, base weights, tokenizer, ONNX, manifest).

Everything is built with :func:`edgemole.model.build_classifier` and the shared adapter layers, so exported tensor
names and shapes match the wire protocol by construction.
"""
