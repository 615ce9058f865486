"""Building deployable artifacts of the fleet's model: the ExecuTorch trainable program (``.pte`` with its
frozen base weights in ``.ptd``), an ONNX inference model and their manifest.

Not built yet: ``edgemole export`` arrives with the on-device training milestone. It will build the model with
:func:`edgemole.model.build_classifier`, so that exported tensor names and shapes match the wire protocol.
"""
