"""TorchServe handlers and the preprocessing that serving, evaluation and training share.

Nothing here imports ``training`` or ``model_defs``: a handler runs the TorchScript file in
its ``.mar`` and reads the model's spec from it.
"""
