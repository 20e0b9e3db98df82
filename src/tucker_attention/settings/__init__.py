"""The typed settings of the commands that run Hugging Face models, importable without transformers
(the command line builds its flags from them): ``convert`` (:class:`~.convert.ConvertConfig`,
``ConvertError``) and ``distill`` (:class:`~.distill.DistillConfig`, ``DistillError``, the registry
of distillation losses). Training's own settings are :mod:`tucker_attention.training.config`."""
